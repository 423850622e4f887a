"""Small real training data for the training tests, made from ../shared/data without Ray.

Pretraining shards from Tiny Shakespeare (split into speeches), SFT train/val shards from the
English RoleBench split, one small tokenizer for both: the same stages launch/prepare_data.py
runs (clean, tokenize, shards + manifest), minus the Ray scheduling and dedup, so that a test
session builds them in a few seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from data_pipeline.chat import encode_conversation, encode_document
from data_pipeline.clean import CleanOptions, clean_documents
from data_pipeline.formats import read_conversations, read_documents
from data_pipeline.prepare import PrepareOptions, write_outputs
from data_pipeline.records import DropReport
from data_pipeline.sp_tokenizer import train_tokenizer

VOCAB = 1024
SFT_LEN = 256  # RoleBench exchanges with their persona prompt are ~250 tokens with this tokenizer
SHARD_BYTES = 64 << 10  # small shards: every rank of a 2-process test gets several
# A model small enough for multi-process CPU tests: a few hundred ms per step.
TEST_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}


def build(shared: Path, out: Path) -> dict[str, Path]:
    """Write out/{pretrain,sft,sft_val} shard folders (each with tokenizer/) and return them."""
    report = DropReport()
    docs = read_documents(shared / "pretrain" / "tinyshakespeare.txt", split=r"\n\s*\n", report=report)
    texts = [d.text for d in itertools.islice(clean_documents(docs, CleanOptions(), report), 1500)]
    tok = train_tokenizer(texts, VOCAB, out / "tokenizer")
    paths = {"pretrain": out / "pretrain", "sft": out / "sft", "sft_val": out / "sft_val"}
    write_outputs(
        (encode_document(t, tok) for t in texts),
        tok,
        PrepareOptions("pretrain", [], str(paths["pretrain"]), shard_bytes=SHARD_BYTES),
        DropReport(),
    )
    convs = list(itertools.islice(read_conversations(shared / "sft" / "rolebench_en_train.jsonl", "rolebench"), 600))
    samples = [encode_conversation(c.messages, tok, max_len=SFT_LEN)[0] for c in convs]
    samples = [s for s in samples if s is not None]
    for name, part in (("sft", samples[:-80]), ("sft_val", samples[-80:])):
        write_outputs(
            part, tok, PrepareOptions("sft", [], str(paths[name]), shard_bytes=SHARD_BYTES // 4), DropReport()
        )
    return paths
