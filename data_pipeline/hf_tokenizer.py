"""A Hugging Face tokenizer folder behind Crucible's tokenizer interface (data_pipeline/tokenizer.py).

The folder's tokenizer.json and tokenizer_config.json are loaded from local files by transformers as a
fast tokenizer. A conversation is rendered by the folder's own Jinja chat template (or the file given
as --chat-template) and tokenized exactly as `apply_chat_template(messages, tokenize=True)` does
(rendered text, no bos/eos added, the template's special tokens read as control tokens). Its loss mask
marks each assistant turn's content and the token that closes the turn (<|im_end|>, <|eot_id|>, </s>):

    {% generation %} marks in the template ─► their character spans (transformers' own tracker)
    no marks ─► prompt_i = render(messages[:i], generation prompt)        must be a prefix of the chat
                turn_i   = render(messages[:i+1])
                span_i   = end of prompt_i .. end of the closing token after the content, read in
                           turn_i when it is a prefix of the chat, else located in the chat's rendering
                           (Qwen3 drops an earlier turn's reasoning block, so a turn renders differently
                           once it is not the last)
    spans ─► token mask: a token is trained when its offsets overlap a span (transformers' rule for
             generation blocks, so a token merging header and content counts as in their masks)

A chat whose spans cannot be derived is refused before it is tokenized, naming the template and the
turn: a wrong mask would train silently on prompts, which nothing downstream could notice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_pipeline.files import write_files_atomically
from data_pipeline.records import DataError, RenderedChat

ID_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""The files that define the ids (tokenizer_config.json without its chat_template), hashed in this order."""
TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers 5 keeps a folder's chat template; it wins over tokenizer_config.json's."""
GENERATION_CONFIG = "generation_config.json"

# transformers' own test for a template with generation marks (render_jinja_template).
_GENERATION_MARK = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
_PROBE_ANSWER = "Crucible probe answer 7431"


class HFTokenizer:
    """A fast Hugging Face tokenizer with the attributes and methods of `data_pipeline.tokenizer.Tokenizer`."""

    def __init__(self, path: Path, tok, template: str | None, template_name: str):
        self.path = path
        self._tok = tok
        self.chat_template = template
        """The active Jinja template (None: the folder has none and none was given)."""
        self.chat_template_name = template_name
        self.sha256 = _digest(path)
        self.vocab_size = len(tok)
        self.bos_id = _bos_id(tok)
        if tok.eos_token_id is None:
            raise DataError(
                f"{path / 'tokenizer_config.json'}: no eos_token; set it to the token that ends a text "
                "(Crucible ends every pretraining document with it)"
            )
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) to the template.
        self._template_kwargs = dict(tok.special_tokens_map)
        self._marked = template is not None and _GENERATION_MARK.search(template) is not None
        self._close = self._closing_token() if template is not None else None
        self.control_strings = tuple(t.content for t in tok.added_tokens_decoder.values() if t.special)
        """Strings the template's rendering turns into control tokens wherever they stand, a
        message's content included (apply_chat_template tokenizes the rendered text)."""
        self._openers = [t for t in self.control_strings if t != self._close]
        self._gen_prompt = self._generation_prompt() if template is not None else ""
        self.stop_ids = self._stop_ids()

    @classmethod
    def load(cls, path: str | os.PathLike, chat_template: str | os.PathLike | None = None) -> HFTokenizer:
        """Load a Hugging Face tokenizer folder from local files.

        Args:
            path: the folder (tokenizer.json + tokenizer_config.json, as a model's folder has them).
            chat_template: a Jinja file whose template replaces the folder's own (--chat-template).
        Returns:
            The tokenizer.
        Raises:
            DataError: a slow-only tokenizer (no tokenizer.json; the message names its class), a folder
                transformers cannot load, no eos token, or an unreadable template file.
        """
        path = Path(path)
        config = path / "tokenizer_config.json"
        if not (path / "tokenizer.json").is_file():
            kind = _read_json(config).get("tokenizer_class", "of no named class") if config.is_file() else "unknown"
            raise DataError(
                f"{path}: no tokenizer.json, only a slow tokenizer ({kind}); Crucible loads fast tokenizers only. "
                f"Convert it once where transformers can (sentencepiece or tiktoken installed): "
                f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}') writes tokenizer.json"
            )
        from transformers import (
            AutoTokenizer,
        )  # here: importing it takes seconds, and Crucible's own tokenizer needs none

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
            raise DataError(f"{path}: transformers cannot load this tokenizer ({type(e).__name__}: {e})") from e
        if not tok.is_fast:
            raise DataError(f"{path}: {type(tok).__name__} is a slow tokenizer; Crucible loads fast tokenizers only")
        if chat_template is not None:
            file = Path(chat_template)
            try:
                template = file.read_text(encoding="utf-8")
            except OSError as e:
                raise DataError(f"--chat-template {file}: cannot read it ({e.strerror or e})") from e
            name = f"--chat-template {file}"
        else:
            template = tok.chat_template
            if isinstance(template, dict):  # several named templates: the default one renders chats
                template = template.get("default")
            name = str(path / TEMPLATE_FILE) if (path / TEMPLATE_FILE).is_file() else f"the chat_template of {config}"
            if template is None:
                name = f"{path} (no chat_template)"
        return cls(path, tok, template, name)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: no bos/eos added, and a special-token string in it stays text.

        Args:
            text: a document.
        Returns:
            Its ids.
        """
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, special tokens written out.

        Args:
            ids: token ids.
        Returns:
            The text.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> RenderedChat:
        """The conversation rendered by the chat template, with the loss mask of its assistant turns.

        Args:
            messages: `{"role", "content"}` dicts in order.
            add_generation_prompt: end with the header that asks for the next assistant turn.
        Returns:
            ids (those of apply_chat_template(messages, tokenize=True)), which of them are trained (each
            assistant turn's content and the token that closes it) and the trained tokens per turn.
        Raises:
            DataError: no chat template, an empty conversation, the template cannot render it, or the
                masks cannot be derived (naming the template and the turn).
        """
        if self.chat_template is None:
            raise DataError(
                f"{self.path} has no chat_template: prepare the data with --chat-template FILE (which the dataset's "
                "tokenizer/, its checkpoints and exports then carry)"
            )
        if not messages:
            raise DataError(f"{self.chat_template_name}: an empty conversation has nothing to render")
        # As apply_chat_template does: plain dicts, keys whose value is None dropped.
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if self._marked:
            text, spans = self._render(messages, add_generation_prompt, marks=True)
            if len(spans) != len(turns):
                raise self._refusal(
                    len(spans),
                    turns[len(spans)] if len(spans) < len(turns) else -1,
                    f"the template marks {len(spans)} {{% generation %}} blocks for {len(turns)} assistant turns",
                )
        else:
            text, _ = self._render(messages, add_generation_prompt)
            spans = []
            for k, i in enumerate(turns):
                start, end = self._turn_span(messages, k, i, text)
                if spans and start < spans[-1][1]:
                    raise self._refusal(k, i, "it begins before the previous assistant turn ends")
                spans.append((start, end))
        encoding = self._tok(text, add_special_tokens=False)
        owners = _span_owners(encoding.encodings[0].offsets, spans)
        turn_tokens = [0] * len(spans)
        for owner in owners:
            if owner >= 0:
                turn_tokens[owner] += 1
        return RenderedChat(
            ids=list(encoding["input_ids"]), trained=[owner >= 0 for owner in owners], turn_tokens=turn_tokens
        )

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the files that define this tokenizer, with the active chat template, into out_dir.

        tokenizer.json, special_tokens_map.json and added_tokens.json are copied as they are (so the
        saved folder has the same sha256); tokenizer_config.json gets the active template under
        chat_template, and chat_template.jinja (which transformers 5 reads first) holds it too. Each
        file is replaced whole; an id-defining file this tokenizer lacks is removed, others are left
        alone. A generation_config.json with just the stop ids goes beside them, so that a copy
        (a dataset's tokenizer/, a checkpoint's) stops generation where the model folder does; an
        export writes its own over it, with the same ids.

        Args:
            out_dir: the folder (created if missing).
        Returns:
            out_dir, which `HFTokenizer.load` and `AutoTokenizer.from_pretrained` both read.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[Path, str | bytes] = {}
        for name in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
            if (self.path / name).is_file():
                files[out / name] = (self.path / name).read_bytes()
        config_file = self.path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        config.pop("chat_template", None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            files[out / TEMPLATE_FILE] = self.chat_template
        files[out / "tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        files[out / GENERATION_CONFIG] = json.dumps({"eos_token_id": list(self.stop_ids)}, indent=2) + "\n"
        write_files_atomically(files)
        # A stale file from another tokenizer would change the ids (or the template) of the saved one.
        for name in ("special_tokens_map.json", "added_tokens.json", TEMPLATE_FILE):
            if out / name not in files:
                (out / name).unlink(missing_ok=True)
        return out

    def _render(self, messages: list[dict], add_generation_prompt: bool, marks: bool = False):
        """(text, generation spans or None) of the template applied as apply_chat_template applies it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, spans = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                return_assistant_tokens_mask=marks,
                add_generation_prompt=add_generation_prompt,
                **self._template_kwargs,
            )
        except Exception as e:  # a template raises whatever its Jinja does (raise_exception, TypeError, ...)
            raise DataError(f"{self.chat_template_name} cannot render this conversation: {e}") from e
        return texts[0], (spans[0] if marks else None)

    def _turn_span(self, messages: list[dict], k: int, i: int, chat: str) -> tuple[int, int]:
        """Characters of chat that assistant turn k (messages[i]) is trained on."""
        start = self._prompt_end(messages, k, i, chat)
        try:
            turn, _ = self._render(messages[: i + 1], add_generation_prompt=False)
        except DataError:
            turn = ""  # not renderable on its own (an opening turn, say): located in the chat instead
        in_place = bool(turn) and turn.startswith(chat[:start]) and chat.startswith(turn)
        # In place, the turn's own rendering bounds it; else (history rewritten) it is found in the chat.
        body = turn[start:] if in_place else chat[start:]
        anchor = _find_content(body, messages[i].get("content"))
        if anchor is None:
            raise self._refusal(k, i, "its content is not in the rendering")
        if self._close is None:
            raise self._refusal(k, i, "no special token follows an assistant turn's content in this template")
        if self._close in body[: anchor[0]]:
            raise self._refusal(k, i, f"{self._close} comes between the generation prompt and its content")
        close = body.rfind(self._close) if in_place else body.find(self._close, anchor[1])
        if close < anchor[1]:
            raise self._refusal(k, i, f"no {self._close} closes it")
        # Located, the content found or the closing token might be a later message's: no other
        # turn may begin before that token.
        if not in_place and any(t in body[:close] for t in self._openers):
            raise self._refusal(k, i, f"another turn begins between its header and the {self._close} after it")
        return start, start + close + len(self._close)

    def _prompt_end(self, messages: list[dict], k: int, i: int, chat: str) -> int:
        """Where the generation prompt before assistant turn k (messages[i]) ends in chat."""
        if i == 0:
            # Nothing before an opening turn to render (templates read messages[0]): its prompt
            # ends where the template's generation prompt first appears.
            at = chat.find(self._gen_prompt) if self._gen_prompt else -1
            if at < 0:
                raise self._refusal(k, i, "the template's generation prompt is not found before it")
            return at + len(self._gen_prompt)
        try:
            prompt, _ = self._render(messages[:i], add_generation_prompt=True)
        except DataError as e:
            raise self._refusal(k, i, f"rendering the conversation up to it failed ({e})") from e
        if not chat.startswith(prompt):
            raise self._refusal(k, i, "the conversation before it renders differently inside the whole chat")
        return len(prompt)

    def _generation_prompt(self) -> str:
        """The text add_generation_prompt appends (Llama 3's assistant header), "" if none is found."""
        probe = [{"role": "user", "content": "Crucible probe question"}]
        try:
            plain, _ = self._render(probe, False)
            asking, _ = self._render(probe, True)
        except DataError:
            return ""
        return asking[len(plain) :] if asking.startswith(plain) else ""

    def _refusal(self, k: int, i: int, why: str) -> DataError:
        turn = f"assistant turn {k + 1} (message {i})" if i >= 0 else "the conversation"
        return DataError(
            f"{self.chat_template_name}: cannot derive the loss mask of {turn}: {why}; pass --chat-template FILE "
            "with a template that renders each turn in place or marks it with {% generation %}"
        )

    def _closing_token(self) -> str | None:
        """The added token that closes an assistant turn, read off a rendered probe conversation."""
        added = [t.content for t in self._tok.added_tokens_decoder.values()]
        user = {"role": "user", "content": "Crucible probe question"}
        for probe in ([user], [{"role": "system", "content": "Crucible probe system"}, user]):
            try:
                text, _ = self._render([*probe, {"role": "assistant", "content": _PROBE_ANSWER}], False)
            except DataError:  # e.g. a template that insists on a system message: try the next probe
                continue
            at = text.rfind(_PROBE_ANSWER)
            if at < 0:
                continue
            rest = text[at + len(_PROBE_ANSWER) :]
            # The earliest one after the content; the longest where two start at the same place.
            found = [(rest.find(t), -len(t), t) for t in added if t in rest]
            return min(found)[2] if found else None
        return None

    def _stop_ids(self) -> tuple[int, ...]:
        """eos, the turn-closing token, and generation_config.json's eos_token_id(s), each once."""
        stops = [self.eos_id]
        if self._close is not None:
            stops.append(int(self._tok.convert_tokens_to_ids(self._close)))
        gen_config = self.path / GENERATION_CONFIG
        if gen_config.is_file():
            eos = _read_json(gen_config).get("eos_token_id")
            stops += [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        return tuple(dict.fromkeys(stops))


def _bos_id(tok) -> int | None:
    """The id the tokenizer itself puts first with add_special_tokens=True (add_bos_token or a
    TemplateProcessing post-processor alike), or None."""
    plain = tok.encode("Hello", add_special_tokens=False)
    full = tok.encode("Hello", add_special_tokens=True)
    if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain:
        return int(full[0])
    return None


def _find_content(body: str, content) -> tuple[int, int] | None:
    """(start, end) of a message's content in a rendered turn; (0, 0) for nothing to find, None if absent.

    Templates trim the content (Llama 3) or move a reasoning block out of it (Qwen3), so the stripped
    content is looked for, then the part after its last </think>, then that part's last line.
    """
    if not isinstance(content, str):
        return 0, 0
    text = content.strip()
    answer = text.rsplit("</think>", 1)[-1].strip()
    for candidate in (text, answer, answer.splitlines()[-1].strip() if answer else ""):
        if not candidate:
            return 0, 0
        at = body.find(candidate)
        if at >= 0:
            return at, at + len(candidate)
    return None


def _span_owners(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the span it is trained for, or -1.

    The rule of transformers' apply_chat_template(return_assistant_tokens_mask=True): a token belongs to
    the first span its character offsets overlap (spans and offsets both in order, one pass).
    """
    owners = [-1] * len(offsets)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            owners[t] = s
    return owners


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _digest(folder: Path) -> str:
    """sha256 over the files that define the ids; tokenizer_config.json without chat_template, since the
    template defines no ids (a run with --chat-template still matches the base model's tokenizer), and
    a missing one as the empty config that `save` writes for it, so a copy hashes as its original."""
    h = hashlib.sha256()
    for name in ID_FILES:
        path = folder / name
        if name == "tokenizer_config.json":
            config = _read_json(path) if path.is_file() else {}
            config.pop("chat_template", None)
            data = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        elif path.is_file():
            data = path.read_bytes()
        else:
            continue
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()
