# ruff: noqa: E501  (the pre-tokenizer regex quotes the published tokenizer.json verbatim)
"""python benchmarks/bench_tokenize.py [--vocab-size 16000] [--doc-chars 4000] [--docs N] [--conversations N]
    [--rounds 5] [--quick]

prepare_data's tokenize stage (data_pipeline.prepare.encode_rows, run as Ray Data runs it, one
batch of rows at a time) with a Hugging Face tokenizer folder against Crucible's own
sentencepiece tokenizer, on the same text:

  pretrain  documents cut from ../shared/data/pretrain (Tiny Shakespeare and 西游记, cleaned as
            prepare cleans them) → encode_document: [bos] + ids + eos
  sft       RoleBench conversations (English and Chinese, system + user + assistant, some joined
            into several exchanges of one character) → encode_conversation: ids + loss mask.
            Sentencepiece builds ChatML piece by piece; the Hugging Face folder renders its Jinja
            template and derives the mask from renderings of each turn's prefix.

Both tokenizers are trained here on the benchmark's documents with the same vocabulary size:
Crucible's with data_pipeline.sp_tokenizer.train_tokenizer, the other as Qwen2's tokenizer.json is
laid out (byte-level BPE behind Qwen2's pre-tokenizer regex, NFC, <|endoftext|> <|im_start|>
<|im_end|>, no bos), trained with `tokenizers` and saved with the published Qwen2.5 chat template.

After one warm-up round (tokenizers loaded, templates compiled) the two sides alternate in this
one process, round by round and stage by stage, the first side swapped each round, so that drift
of a shared machine falls on both alike. Rates are items and tokens over the summed seconds;
tokens are the ids of each sample (input ids + 1), so tokens/s also reflects each tokenizer's
compression, and items/s compares the work on the same text.

The last line printed is `hf_over_sp pretrain_docs_per_s=<r> pretrain_tokens_per_s=<r>
sft_conversations_per_s=<r> sft_tokens_per_s=<r>` (the Hugging Face tokenizer over sentencepiece).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_pipeline import clean, formats  # noqa: E402
from data_pipeline.prepare import PrepareOptions, encode_rows  # noqa: E402
from data_pipeline.records import DropReport  # noqa: E402
from data_pipeline.sp_tokenizer import train_tokenizer  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402
from model.loss import IGNORE_INDEX  # noqa: E402

SIDES = ("sentencepiece", "hf-qwen2")
STAGES = ("pretrain", "sft")
PRETRAIN_FILES = ("tinyshakespeare.txt", "journey_to_the_west.txt")
SFT_FILES = ("rolebench_en_train.jsonl", "rolebench_zh_train.jsonl")
EXCHANGES = (1, 2, 1, 3)
"""Exchanges per conversation, in turn: consecutive RoleBench answers of one character are joined
into multi-turn conversations this long (mean 1.75)."""

# Qwen2's pre-tokenizer regex, from its tokenizer.json: digits one by one.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN25_TEMPLATE = (ROOT / "configs" / "chat_templates" / "qwen2.5.jinja").read_text(encoding="utf-8")
"""The chat template of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json, as published."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=16000, help="of both tokenizers, special tokens included")
    parser.add_argument("--doc-chars", type=int, default=4000, help="pretraining documents are cut to about this")
    parser.add_argument("--docs", type=int, default=None, help="pretraining documents (default: all of the text)")
    parser.add_argument("--conversations", type=int, default=None, help="SFT conversations (default: all)")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per encode_rows call")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per side")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per side first")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (the test's): small sizes, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.doc_chars, args.docs, args.conversations, args.rounds = 1000, 2000, 16, 16, 1
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    return args


# --- the text: documents and conversations as prepare's tokenize stage receives them --------


def _interleave(per_language: list[list], limit: int | None) -> list:
    """English and Chinese items in turn (so that a limit takes both), at most `limit`."""
    mixed = [x for group in itertools.zip_longest(*per_language) for x in group if x is not None]
    return mixed[:limit] if limit is not None else mixed


def _cut(text: str, chars: int) -> list[str]:
    """text in pieces of at least `chars` characters (the last may be shorter), cut at line ends."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end].strip())
        start = end
    return [p for p in pieces if p]


def documents(doc_chars: int, limit: int | None) -> list[str]:
    """The pretraining files, read and cleaned as prepare reads them, cut into documents."""
    per_language = []
    for name in PRETRAIN_FILES:
        docs = clean.clean_documents(
            formats.read_documents(DATA / "pretrain" / name), clean.CleanOptions(), DropReport()
        )
        per_language.append([piece for doc in docs for piece in _cut(doc.text, doc_chars)])
    return _interleave(per_language, limit)


def _multi_turn(chats: list[list[dict]]) -> list[list[dict]]:
    """Join consecutive chats of one character (same system message) into conversations of
    EXCHANGES[k] exchanges in turn: system, then user/assistant pairs."""
    out, i = [], 0
    for n in itertools.cycle(EXCHANGES):
        if i == len(chats):
            return out
        j = i + 1
        while j < min(i + n, len(chats)) and chats[j][0] == chats[i][0]:
            j += 1
        out.append([chats[i][0], *(m for chat in chats[i:j] for m in chat[1:])])
        i = j
    return out


def conversations(limit: int | None) -> list[list[dict]]:
    """RoleBench rows as prepare imports and cleans them (one system + user + assistant chat per
    answer, the default character card as system message), some joined into several exchanges."""
    per_language = []
    for name in SFT_FILES:
        convs = formats.read_conversations(DATA / "sft" / name, "rolebench")
        chats = [c.messages for c in clean.clean_conversations(convs, clean.CleanOptions(), DropReport())]
        per_language.append(_multi_turn(chats))
    return _interleave(per_language, limit)


# --- the two tokenizers, trained on the same text ---------------------------------------------


def train_qwen2_style(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """A Qwen2-style Hugging Face tokenizer folder trained on `texts`, with the Qwen2.5 chat template.

    Args:
        texts: the training documents.
        vocab_size: the total vocabulary, the special tokens included.
        out_dir: the folder to write (created).
    Returns:
        out_dir.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN2_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=QWEN25_TEMPLATE,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2_SPECIALS[1:]),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def train_both(texts: list[str], vocab_size: int, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Both tokenizers trained on `texts`: their folders and training seconds, by side."""
    folders, seconds = {}, {}
    for side in SIDES:
        started = time.perf_counter()
        if side == "sentencepiece":
            train_tokenizer(texts, vocab_size, work / side)
            folders[side] = work / side
        else:
            folders[side] = train_qwen2_style(texts, vocab_size, work / side)
        seconds[side] = time.perf_counter() - started
    return folders, seconds


# --- timing -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """One side's measured rounds of one stage."""

    seconds: float = 0.0
    items: int = 0
    tokens: int = 0
    trained: int = 0
    dropped: int = 0
    rounds: list[float] = field(default_factory=list)


def batches(payloads: list[str], batch_rows: int) -> list[dict[str, np.ndarray]]:
    """Ray Data's numpy batches of kept rows, as encode_rows receives them."""
    out = []
    for i in range(0, len(payloads), batch_rows):
        chunk = payloads[i : i + batch_rows]
        column = np.empty(len(chunk), dtype=object)
        column[:] = chunk
        out.append({"source": np.array([f"bench:{i + k}" for k in range(len(chunk))], dtype=object), "payload": column})
    return out


def run_stage(stage_batches: list[dict], folder: Path, opts: PrepareOptions) -> tuple[float, Tally]:
    """One pass of encode_rows over the batches: (seconds, counts)."""
    tally = Tally()
    started = time.perf_counter()
    results = [encode_rows(batch, str(folder), opts) for batch in stage_batches]
    seconds = time.perf_counter() - started
    for result in results:
        for ids, labels, drop in zip(result["input_ids"], result["labels"], result["drop"], strict=True):
            tally.items += 1
            tally.dropped += bool(drop)
            tally.tokens += len(ids) + 1 if len(ids) else 0
            tally.trained += int((labels != IGNORE_INDEX).sum())
    return seconds, tally


def alternate(work: dict[str, list[dict]], folders: dict[str, Path], args) -> dict[tuple[str, str], Tally]:
    """Warm-up rounds, then measured rounds in which the sides alternate stage by stage, the
    first side swapped each round; the tally of each (stage, side)."""
    options = {stage: PrepareOptions(kind=stage, inputs=[], out="") for stage in STAGES}
    tallies = {(stage, side): Tally() for stage in STAGES for side in SIDES}
    for r in range(args.warmup + args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for stage in STAGES:
            for side in order:
                seconds, counts = run_stage(work[stage], folders[side], options[stage])
                if r < args.warmup:
                    continue
                total = tallies[stage, side]
                total.seconds += seconds
                total.rounds.append(seconds)
                total.items += counts.items
                total.tokens += counts.tokens
                total.trained += counts.trained
                total.dropped += counts.dropped
    return tallies


def report(tallies: dict[tuple[str, str], Tally]) -> None:
    """The table (Markdown rows, ready for RESULTS.md) and the ratio line last."""
    print("| stage | tokenizer | items/s | tokens/s | tokens per item | trained tokens | dropped | median round |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (stage, side), t in tallies.items():
        trained = f"{t.trained / t.tokens:.0%}" if t.tokens else "–"
        print(
            f"| {stage} | {side} | {t.items / t.seconds:,.1f} | {t.tokens / t.seconds:,.0f} | "
            f"{t.tokens / max(t.items - t.dropped, 1):,.1f} | {trained} | {t.dropped // len(t.rounds)} | "
            f"{float(np.median(t.rounds)):.3f} s |"
        )

    def ratio(stage: str, what: str) -> float:
        hf, sp = tallies[stage, SIDES[1]], tallies[stage, SIDES[0]]
        return (getattr(hf, what) / hf.seconds) / (getattr(sp, what) / sp.seconds)

    print(
        f"hf_over_sp pretrain_docs_per_s={ratio('pretrain', 'items'):.2f} "
        f"pretrain_tokens_per_s={ratio('pretrain', 'tokens'):.2f} "
        f"sft_conversations_per_s={ratio('sft', 'items'):.2f} sft_tokens_per_s={ratio('sft', 'tokens'):.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: this benchmark reads the shared real data")
    docs = documents(args.doc_chars, args.docs)
    chats = conversations(args.conversations)
    multi = sum(len(c) > 3 for c in chats)
    print(
        f"{len(docs)} documents ({sum(map(len, docs)):,} characters), {len(chats)} conversations ({multi} multi-turn); "
        f"vocab {args.vocab_size}, {args.rounds} rounds after {args.warmup} warm-up, batches of {args.batch_rows} rows; "
        f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_tokenize-") as work:
        folders, train_seconds = train_both(docs, args.vocab_size, Path(work))
        sizes = {side: load_tokenizer(folder).vocab_size for side, folder in folders.items()}
        print(
            "trained on the documents: "
            + ", ".join(f"{side} {sizes[side]} ids in {train_seconds[side]:.1f} s" for side in SIDES),
            flush=True,
        )
        work_rows = {
            "pretrain": batches(docs, args.batch_rows),
            "sft": batches([json.dumps(c, ensure_ascii=False) for c in chats], args.batch_rows),
        }
        tallies = alternate(work_rows, folders, args)
    report(tallies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
