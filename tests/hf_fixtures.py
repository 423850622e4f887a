# ruff: noqa: E501  (the pre-tokenizer regexes and the template edits quote published text verbatim)
"""Hugging Face tokenizer folders for tests, trained in about a second with `tokenizers`, and the
published chat templates of Llama 3, Qwen 2.5, Mistral and Qwen3 (configs/chat_templates/).

    qwen2_tokenizer(dir)    byte-level BPE, Qwen2's pre-tokenizer regex, ChatML specials, no bos
    llama3_tokenizer(dir)   byte-level BPE, Llama 3's regex and specials, bos from the post-processor
    mistral_tokenizer(dir)  sentencepiece-style (Metaspace) BPE, <s> </s> [INST] [/INST], bos added

Each folder is written by save_pretrained, so AutoTokenizer and Crucible's load_tokenizer read it as
they read an open model's. The `*_MARKED` templates are copies with {% generation %} around what the
assistant generates (its content and the token that closes its turn): transformers'
`return_assistant_tokens_mask` then gives the reference loss masks.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The real public data beside the repository (../shared/data)."""

# Pre-tokenizer regexes of the real tokenizer.json files: Qwen2 splits digits one by one, Llama 3 in threes.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CHAT_TEMPLATES = Path(__file__).resolve().parents[1] / "configs" / "chat_templates"
"""The chat templates as published in each model's tokenizer_config.json, one .jinja file each:
meta-llama/Meta-Llama-3-8B-Instruct, Qwen/Qwen2.5-7B-Instruct, mistralai/Mistral-7B-Instruct-v0.2
and Qwen/Qwen3-0.6B (used without thinking: no reasoning_content, no enable_thinking)."""
LLAMA3_TEMPLATE, QWEN25_TEMPLATE, MISTRAL_TEMPLATE, QWEN3_TEMPLATE = (
    (CHAT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8") for name in ("llama3", "qwen2.5", "mistral", "qwen3")
)


def _mark(template: str, *edits: tuple[str, str, int]) -> str:
    """template with each (old, new, count) edit made, checking that old occurs exactly count times."""
    for old, new, count in edits:
        assert template.count(old) == count, f"{old!r} occurs {template.count(old)} times, not {count}"
        template = template.replace(old, new)
    return template


LLAMA3_TEMPLATE_MARKED = _mark(
    LLAMA3_TEMPLATE,
    (
        "{{ content }}",
        "{% if message['role'] == 'assistant' %}"
        "{{ (bos_token if loop.index0 == 0 else '') + '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ content }}{% endif %}",
        1,
    ),
)
QWEN25_TEMPLATE_MARKED = _mark(
    QWEN25_TEMPLATE,
    (
        r"""    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}""",
        r"""    {%- if message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\n' }}{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}""",
        1,
    ),
)
MISTRAL_TEMPLATE_MARKED = _mark(
    MISTRAL_TEMPLATE,
    (
        "{{- ' ' + message['content'] + eos_token}}",
        "{%- generation %}{{- ' ' + message['content'] + eos_token}}{%- endgeneration %}",
        1,
    ),
)
# Qwen3 writes "<think>\n\n</think>\n\n" into the last assistant turn, after the generation prompt: the
# model generates it, so it is inside the marks with the content.
QWEN3_TEMPLATE_MARKED = _mark(
    QWEN3_TEMPLATE,
    (
        "        {%- if loop.index0 > ns.last_query_index %}",
        r"""        {{- '<|im_start|>' + message.role + '\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index %}""",
        1,
    ),
    (r"{{- '<|im_start|>' + message.role + '\n<think>\n' + ", r"{{- '<think>\n' + ", 1),
    (r"{{- '<|im_start|>' + message.role + '\n' + content }}", "{{- content }}", 2),
    (
        r"""        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}""",
        r"""        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == "tool" %}""",
        1,
    ),
)
_MARKED = {
    LLAMA3_TEMPLATE: LLAMA3_TEMPLATE_MARKED,
    QWEN25_TEMPLATE: QWEN25_TEMPLATE_MARKED,
    MISTRAL_TEMPLATE: MISTRAL_TEMPLATE_MARKED,
    QWEN3_TEMPLATE: QWEN3_TEMPLATE_MARKED,
}


def with_generation_marks(template: str) -> str:
    """The copy of one of the four published templates with {% generation %} marks.

    Args:
        template: LLAMA3_TEMPLATE, QWEN25_TEMPLATE, MISTRAL_TEMPLATE or QWEN3_TEMPLATE.
    Returns:
        The marked copy, which renders the same text.
    Raises:
        KeyError: another template.
    """
    return _MARKED[template]


@functools.lru_cache(maxsize=1)
def training_text() -> tuple[str, ...]:
    """The text the fixture tokenizers learn from: 200 K characters of Shakespeare and 50 K of 西游记 (so
    that Chinese gets merges, and byte-level tokens that split a character are exercised)."""
    english = (DATA / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    chinese = (DATA / "pretrain" / "journey_to_the_west.txt").read_text(encoding="utf-8")[:50_000]
    # Pieces of 1000 characters, not lines, so that runs of newlines get merges as in real tokenizers.
    text = english + chinese
    return tuple(text[i : i + 1000] for i in range(0, len(text), 1000))


def _train(tok: Tokenizer, vocab_size: int, alphabet: list[str]) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    return tok


def _byte_level(split_regex: str, *, nfc: bool, vocab_size: int) -> Tokenizer:
    """A byte-level BPE laid out as Qwen2's and Llama 3's tokenizer.json are: regex split, then bytes."""
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return _train(tok, vocab_size, pre_tokenizers.ByteLevel.alphabet())


def _save(tok: Tokenizer, out_dir: str | os.PathLike, template: str | None, **special_tokens) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special_tokens)
    fast.save_pretrained(out)
    return out


def _specials(tok: Tokenizer, *names: str) -> None:
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])


def qwen2_tokenizer(out_dir: str | os.PathLike, template: str | None = QWEN25_TEMPLATE) -> Path:
    """A Qwen2-style tokenizer folder: no bos, <|endoftext|> ends documents (eos and pad), ChatML turns.

    Args:
        out_dir: the folder to write (created).
        template: its chat template (None: the folder has none).
    Returns:
        out_dir.
    """
    tok = _byte_level(QWEN2_SPLIT, nfc=True, vocab_size=900)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _specials(tok, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    # Qwen3's reasoning tags are added tokens but not special ones.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return _save(
        tok,
        out_dir,
        template,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def llama3_tokenizer(out_dir: str | os.PathLike, template: str | None = LLAMA3_TEMPLATE) -> Path:
    """A Llama 3-style tokenizer folder: <|begin_of_text|> put before every text by a TemplateProcessing
    post-processor, eos <|eot_id|> (as Llama 3.1 Instruct's tokenizer_config), no pad, and a
    generation_config.json that stops on <|end_of_text|> and <|eot_id|>.

    Args:
        out_dir: the folder to write (created).
        template: its chat template (None: the folder has none).
    Returns:
        out_dir.
    """
    tok = _byte_level(LLAMA3_SPLIT, nfc=False, vocab_size=900)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    _specials(tok, *specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    out = _save(tok, out_dir, template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    stops = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": stops}) + "\n")
    return out


def mistral_tokenizer(out_dir: str | os.PathLike, template: str | None = MISTRAL_TEMPLATE) -> Path:
    """A Mistral-style tokenizer folder: sentencepiece-like BPE (Metaspace "▁" words), <s> added before
    every text, </s> ends turns and documents, [INST] and [/INST] as control tokens (as in v0.3).

    Args:
        out_dir: the folder to write (created).
        template: its chat template (None: the folder has none).
    Returns:
        out_dir.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # English only: the alphabet of 西游记 alone would fill the vocabulary (Chinese text becomes <unk>).
    english = [piece for piece in training_text() if piece.isascii()]
    # <unk>, <s>, </s> are ids 0, 1, 2 of the model's own vocabulary, as in Mistral's.
    specials = [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    tok.train_from_iterator(english, trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    _specials(tok, "[INST]", "[/INST]")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _save(
        tok,
        out_dir,
        template,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["[INST]", "[/INST]"],
    )
