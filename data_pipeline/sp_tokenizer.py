"""Crucible's own sentencepiece tokenizer: training, encoding, ChatML, and its Hugging Face folder.

One BPE model with byte fallback serves English and Chinese alike: a character outside the
vocabulary becomes its UTF-8 bytes (`<0xE4>` ...), never `<unk>`, so `decode(encode(s)) == s` for
any NFC string (except that sentencepiece's space marker `▁`, U+2581, decodes as a space).
Sentencepiece's normalisation is switched off (identity rule, no whitespace squeezing, no dummy
prefix), because each of them rewrites text and makes the ids of a string depend on where it was
cut.

Invariant: no piece contains a newline (training splits its input at newlines, `load` checks).
A newline is therefore always the byte token `<0x0A>` and BPE never merges across it, which is
what lets `encode_chat` encode the template's pieces one by one and still get the ids that a
Hugging Face tokenizer gives for the whole rendered string.

Special-token strings in text are plain text: `encode` never yields a special id (sentencepiece
does not match control pieces in its input), so a document or an answer that quotes
`<|im_end|>` is trained on those characters, not on a stop in mid-answer. Only the chat template
inserts control ids, as ids. This is Hugging Face's `split_special_tokens=True`: the exported
tokenizer gives the same ids as `encode` when called with it, and with its default for any text
that holds no special-token string (by default Hugging Face reads such strings as control
tokens, which its `apply_chat_template` relies on, since it tokenizes the rendered text).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipeline.files import write_atomically, write_files_atomically
from data_pipeline.records import DataError, RenderedChat

MODEL_FILE = "tokenizer.model"
SAVED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MODEL_FILE)
"""The files `SentencePieceTokenizer.save` writes (and the only ones it replaces in a folder)."""
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START, IM_END)
"""In id order: 0 … 5 in every tokenizer this module trains."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, the template of every tokenizer Crucible trains, as Jinja for the Hugging Face folder;
`encode_chat` builds the same ids piece by piece."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    max_sentence_length: int = 8192,
    input_sentence_size: int = 1_000_000,
    character_coverage: float | None = None,
    num_threads: int | None = None,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE sentencepiece model and write it to `out_dir/tokenizer.model`.

    Args:
        texts: documents or lines, streamed once. Each is split at newlines, since pieces must
            not span one (see the module docstring); empty lines are skipped.
        vocab_size: total size including the 6 special tokens and the 256 byte tokens.
        out_dir: folder for tokenizer.model (created if missing).
        max_sentence_length: longest training line in bytes; longer lines are cut into chunks
            of this size rather than skipped (sentencepiece would skip them).
        input_sentence_size: lines kept for training, a uniform sample of all lines (0: all).
            Bounds the memory of training on a large corpus.
        character_coverage: sentencepiece's share of character occurrences whose characters
            get a piece of their own (0.98 to 1); the rest fall back to bytes. None: 0.9995,
            after the rarest characters are taken out of the training lines so that characters
            fill at most half of the vocabulary (Chinese has thousands of distinct characters,
            more than a small vocabulary holds).
        num_threads: trainer threads (default: all cores).
        seed: seed of the line sample.
    Returns:
        The trained SentencePieceTokenizer, loaded from the written file.
    Raises:
        DataError: sentencepiece refused (no text, or a vocabulary too small for the
            characters at an explicit `character_coverage`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = _sample_lines(_training_lines(texts, max_sentence_length), input_sentence_size, seed)
    explicit_coverage = character_coverage
    if character_coverage is None:
        lines, character_coverage = _limit_characters(lines, vocab_size), 0.9995
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            control_symbols=[IM_START, IM_END],
            split_digits=True,  # one token per digit, as in Llama: arithmetic sees every digit
            allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become one piece
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=0,  # already sampled
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(e, vocab_size, len(lines), explicit_coverage) from e
    path = out / MODEL_FILE
    write_atomically(path, model.getvalue())  # a reader, or a failed rewrite, never sees half a model
    return SentencePieceTokenizer.load(path)


def _training_error(error: RuntimeError, vocab_size: int, n_lines: int, coverage: float | None) -> DataError:
    """Sentencepiece's refusal, with advice that names prepare_data's flag (what users set)
    rather than sentencepiece's options or this module's arguments."""
    # Its message is "<source line> [<assertion>] <what> <advice in its own option names>".
    detail = re.split(r"\.? (?:Please|Increase) ", str(error).rsplit("] ", 1)[-1])[0].rstrip(".")
    if at_most := re.search(r"<= (\d+)", str(error)):
        advice = f"give more text or a --vocab-size of at most {at_most[1]}"
    else:
        lower = "" if coverage is None else f", or lower character_coverage ({coverage})"
        advice = f"if the vocabulary is smaller than the characters need, raise --vocab-size{lower}"
    return DataError(f"training a {vocab_size}-piece tokenizer on {n_lines} lines failed: {detail}; {advice}")


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yield the non-empty lines of `texts`, each at most `max_bytes` UTF-8 bytes."""
    max_chars = max(1, max_bytes // 4)  # a character is at most 4 bytes in UTF-8
    for text in texts:
        for line in text.split("\n"):
            if len(line.encode("utf-8")) <= max_bytes:
                if line:
                    yield line
                continue
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def _sample_lines(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of `k` lines (all when k is 0), in one pass (reservoir sampling)."""
    if k <= 0:
        return list(lines)
    rng = random.Random(seed)
    sample: list[str] = []
    for n, line in enumerate(lines):
        if n < k:
            sample.append(line)
        elif (j := rng.randrange(n + 1)) < k:
            sample[j] = line
    return sample


def _limit_characters(lines: list[str], vocab_size: int) -> list[str]:
    """Split the lines at their rarest characters so that at most half of the pieces that are
    neither special nor bytes go to single characters, leaving the other half for merges.

    Sentencepiece's own knob, character_coverage, cannot go below 0.98, where Chinese still
    needs thousands of characters; a character cut out here never gets a piece (it is encoded
    as its bytes), and no merge is learned across it.
    """
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line)
    budget = max(1, (vocab_size - len(SPECIAL_TOKENS) - 256) // 2)
    if len(counts) <= budget:
        return lines
    rare = {ord(ch): "\n" for ch, _ in counts.most_common()[budget:]}
    return [part for line in lines for part in line.translate(rare).split("\n") if part]


def is_crucible_model(path: Path) -> bool:
    """Whether the sentencepiece model at `path` is one Crucible trained (its special tokens at
    ids 0 … 5), rather than, say, the tokenizer.model beside a Mistral tokenizer.json."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(path.read_bytes())
    except (RuntimeError, OSError, TypeError):
        return False
    return sp.get_piece_size() > len(SPECIAL_TOKENS) and all(
        sp.id_to_piece(i) == t for i, t in enumerate(SPECIAL_TOKENS)
    )


class SentencePieceTokenizer:
    """A trained sentencepiece model with Crucible's special tokens and ChatML (data_pipeline/
    tokenizer.py's interface). Build with `SentencePieceTokenizer.load`.

    ChatML renders each message as `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a generation
    prompt is `<|im_start|>assistant\\n`. An assistant turn's content and its `<|im_end|>` carry
    loss; its header and the `\\n` after `<|im_end|>` do not: generation stops at `<|im_end|>`,
    so the model never has to produce that newline, and the next prompt supplies it.
    """

    chat_template_name = "ChatML (the template of Crucible's tokenizers)"
    control_strings = ()  # encode_chat encodes a message's content as text, special strings included

    def __init__(self, path: Path, model_bytes: bytes, sp: spm.SentencePieceProcessor):
        self.path = path
        """The .model file this tokenizer was loaded from."""
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        """Digest of the model file; shard manifests record it to catch a tokenizer mismatch."""
        self._sp = sp
        self._model_bytes = model_bytes
        self.vocab_size = sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (sp.piece_to_id(t) for t in (UNK, BOS, EOS, PAD))
        self.im_start_id, self.im_end_id = sp.piece_to_id(IM_START), sp.piece_to_id(IM_END)
        self.stop_ids = (self.im_end_id, self.eos_id)
        self._special_text = {sp.piece_to_id(t): t for t in SPECIAL_TOKENS}

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Load a tokenizer.

        Args:
            path: a .model file, or a folder holding tokenizer.model (as train_tokenizer and
                save_hf write it).
        Returns:
            The SentencePieceTokenizer.
        Raises:
            DataError: the file is missing, is not a sentencepiece model, or lacks Crucible's
                special tokens or its no-newline-in-pieces invariant; the message names the file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise DataError(
                f"tokenizer model {path} does not exist: give the folder a prepare_data run wrote (its "
                "tokenizer/), or train one with launch/prepare_data.py pretrain --vocab-size N"
            )
        model_bytes = path.read_bytes()
        sp = spm.SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(model_bytes)
        except (RuntimeError, OSError, TypeError) as e:
            raise DataError(f"tokenizer model {path} is not a valid sentencepiece model ({e})") from e
        for i, token in enumerate(SPECIAL_TOKENS):
            if sp.get_piece_size() <= i or sp.id_to_piece(i) != token:
                raise DataError(
                    f"tokenizer model {path} does not hold {token!r} at id {i}, so it was not trained by "
                    "Crucible: train one with launch/prepare_data.py pretrain --vocab-size N"
                )
        if any("\n" in sp.id_to_piece(i) for i in range(sp.get_piece_size())):
            raise DataError(f"tokenizer model {path} has a piece containing a newline; the chat template needs none")
        return cls(path, model_bytes, sp)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos, never a special id: a literal `<|im_end|>` in the
        text is encoded as its characters (see the module docstring).

        Args:
            text: any string.
        Returns:
            The ids, equal to what the exported Hugging Face tokenizer gives with
            `split_special_tokens=True` (and without it, for text holding no special-token string).
        """
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are written out as their strings (`<|im_end|>`).

        Args:
            ids: token ids (a list or any integer array).
        Returns:
            The text; `decode(encode(s)) == s` for NFC text without the `▁` (U+2581) character.
        """
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_text:
                parts.append(self._sp.decode(run))
                parts.append(self._special_text[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def encode_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> RenderedChat:
        """ChatML ids built piece by piece (special tokens as ids, texts through `encode`), equal to
        `apply_chat_template` on the saved folder: the tokenizer never merges across a newline or a
        special token, the only places pieces are joined. A special-token string inside a content
        is text here, never a control id, so it cannot end a turn early or forge one.

        Args:
            messages: `{"role", "content"}` dicts (checked by data_pipeline.chat).
            add_generation_prompt: end with `<|im_start|>assistant\\n`.
        Returns:
            The RenderedChat.
        """
        ids: list[int] = []
        trained: list[bool] = []
        turns: list[int] = []
        for message in messages:
            header = [self.im_start_id, *self.encode(message["role"] + "\n")]
            body = [*self.encode(message["content"]), self.im_end_id]
            learn = message["role"] == "assistant"
            ids += header + body + self.encode("\n")
            trained += [False] * len(header) + [learn] * len(body) + [False]
            if learn:
                turns.append(len(body))
        if add_generation_prompt:
            prompt = [self.im_start_id, *self.encode("assistant\n")]
            ids += prompt
            trained += [False] * len(prompt)
        return RenderedChat(ids=ids, trained=trained, turn_tokens=turns)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a Hugging Face tokenizer folder that `AutoTokenizer.from_pretrained` loads offline.

        The folder holds tokenizer.json (a fast BPE tokenizer with byte fallback that encodes
        and decodes exactly as this one), tokenizer_config.json (special tokens and ChatML as
        its chat template), special_tokens_map.json, and tokenizer.model itself (so that
        `load_tokenizer(out_dir)` loads this very tokenizer).

        Each file is replaced whole (written to a temporary name in the folder, fsynced, renamed),
        and none is replaced before all are written: a save that fails (a full disk) over an
        earlier tokenizer leaves the earlier files whole and loadable.

        Args:
            out_dir: the folder (created if missing); its files named in SAVED_FILES are replaced,
                any other file is left alone.
        Returns:
            The folder.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": [IM_START, IM_END],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        contents = {
            "tokenizer.json": self._fast_tokenizer().to_str(pretty=True),  # what tokenizers' own save() writes
            "tokenizer_config.json": _json_text(config),
            "special_tokens_map.json": _json_text({**special, "additional_special_tokens": [IM_START, IM_END]}),
            MODEL_FILE: self._model_bytes,
        }
        write_files_atomically({out / name: data for name, data in contents.items()})
        return out

    def _fast_tokenizer(self):
        """The `tokenizers` equivalent of this model (imported here: only export needs it)."""
        from tokenizers import AddedToken, decoders, normalizers
        from tokenizers import Tokenizer as FastTokenizer
        from tokenizers.models import BPE

        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        vocab = {p: i for i, p in enumerate(pieces)}
        # Special and byte pieces are never the result or the input of a merge: they must not
        # be assembled from ordinary text such as a literal "<0x41>".
        not_mergeable = set(SPECIAL_TOKENS) | {
            pieces[i] for i in range(self.vocab_size) if self._sp.is_byte(i) or self._sp.is_control(i)
        }
        fast = FastTokenizer(
            BPE(
                vocab=vocab,
                merges=_bpe_merges(pieces, not_mergeable),
                unk_token=UNK,
                fuse_unk=True,
                byte_fallback=True,
                dropout=None,
            )
        )
        # Sentencepiece's only rewrite with the identity rule: spaces are stored as "▁".
        fast.normalizer = normalizers.Replace(" ", "▁")
        fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return fast


def _bpe_merges(pieces: list[str], not_mergeable: set[str]) -> list[tuple[str, str]]:
    """Merge rules equivalent to sentencepiece's BPE encoder, best first.

    Sentencepiece merges the adjacent pair whose concatenation is the best-scored piece (lowest
    id for BPE); a merge-rank BPE reproduces that by listing, for each piece in id order, every
    split of it into two pieces.
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in pieces:
        if piece in not_mergeable:
            continue
        splits = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab and not {piece[:k], piece[k:]} & not_mergeable
        ]
        merges.extend(sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    return merges


def _json_text(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
