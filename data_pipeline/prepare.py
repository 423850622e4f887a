"""Raw files → clean, deduplicated, tokenized shards: the stages of launch/prepare_data.py.

Each stage is a plain function over rows (dicts) or column batches, so that any executor can run
it: launch/prepare_data.py runs them as Ray Data operations (local or on a cluster), the tests
call them directly. Rows that a stage drops are not removed but marked, `drop` set to the
reason, so the driver can count every record and nothing disappears without a trace.

    import_rows (per input file: read + clean)  ─►  add_dedup_keys (per batch)
      ─► Deduplicator (driver, sequential: exact hash + MinHash LSH)
      ─► [train_tokenizer on kept text]  ─►  encode_rows (per batch)  ─►  write_shards (driver)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline import clean, dedup, formats
from data_pipeline.chat import encode_conversation, encode_document
from data_pipeline.records import Conversation, DataError, Document, DropReport, Sample
from data_pipeline.shards import ShardWriter, write_manifest
from data_pipeline.tokenizer import Tokenizer

KINDS = ("pretrain", "sft")


@dataclass
class PrepareOptions:
    """What `launch/prepare_data.py` was asked to do (its command-line flags)."""

    kind: str
    """`pretrain` (text documents) or `sft` (conversations)."""
    inputs: list[str]
    """Input files or folders."""
    out: str
    """Output folder: shards, manifest.json, tokenizer/."""
    fmt: str = "text"
    """SFT input format: messages | sharegpt | alpaca | rolebench (pretraining: text)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json/.parquet/datasets inputs."""
    split: str | None = None
    """Regex or separator that cuts a .txt file into documents (e.g. chapter headings)."""
    profiles: str | None = None
    """RoleBench: a .json/.yaml file mapping a role to its persona (the system message)."""
    on_error: str = "raise"
    """An invalid record (bad JSON, missing field, bytes that are not UTF-8): `raise` or `skip` (counted)."""
    bad_bytes: str = "reject"
    """Undecodable bytes: `reject` the record (an error naming the line, or counted under `skip`)
    or `replace` them with U+FFFD."""
    min_chars: int = 16
    """Drop documents shorter than this after cleaning."""
    max_chars: int | None = None
    """Drop documents longer than this after cleaning."""
    near_dup_threshold: float | None = 0.8
    """Jaccard threshold of MinHash near-duplicate removal; None disables it."""
    max_len: int = 2048
    """SFT: longest tokenized conversation (earlier turns are cut, then it is dropped)."""
    shard_bytes: int = 64 << 20
    """Target size of one shard file."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")


@dataclass
class PrepareResult:
    report: DropReport = field(default_factory=DropReport)
    shards: list[dict] = field(default_factory=list)
    manifest: Path | None = None


ERROR = "error"
"""The `drop` value of a row that carries a fatal DataError (its message in `payload`)."""


# --- stage 1: read and clean one input file ---------------------------------------------


def import_rows(path: str, file_index: int, opts: PrepareOptions) -> Iterator[dict]:
    """Read and clean one input file.

    Args:
        path: one input file (or a folder the importers understand).
        file_index: its position among the inputs (makes row ids unique and ordered).
        opts: the preparation options.
    Yields:
        one row per input record: `{"id", "source", "payload", "drop"}` where payload is the cleaned
        text (pretraining) or the messages as JSON (SFT), and `drop` is "" for a kept record or
        the reason it was dropped.
    """
    try:
        yield from _import_rows(path, file_index, opts)
    except DataError as error:
        # Exceptions lose their type crossing Ray's process boundary; a marked row does not.
        yield {"id": f"{file_index}:error", "source": path, "payload": str(error), "drop": ERROR}


def _import_rows(path: str, file_index: int, opts: PrepareOptions) -> Iterator[dict]:
    report = DropReport()
    if opts.kind == "pretrain":
        records = formats.read_documents(
            path,
            text_field=opts.text_field,
            split=opts.split,
            on_error=opts.on_error,
            bad_bytes=opts.bad_bytes,
            report=report,
        )
        kept = clean.clean_documents(
            records, clean.CleanOptions(min_chars=opts.min_chars, max_chars=opts.max_chars), report
        )
    else:
        profiles = formats.load_profiles(opts.profiles) if opts.profiles else None
        records = formats.read_conversations(
            path, opts.fmt, profiles=profiles, on_error=opts.on_error, bad_bytes=opts.bad_bytes, report=report
        )
        kept = clean.clean_conversations(records, clean.CleanOptions(), report)
    for n, record in enumerate(kept):
        yield {"id": f"{file_index}:{n}", "source": record.source, "payload": _payload(record), "drop": ""}
    yield from drop_rows(report, file_index)


def drop_rows(report: DropReport, file_index: int) -> Iterator[dict]:
    """One marked row per record a report counted as dropped (its examples' sources first)."""
    n = 0
    for reason, count in report.dropped.items():
        examples = report.examples.get(reason, [])
        for i in range(count):
            source = examples[i] if i < len(examples) else ""
            yield {"id": f"{file_index}:drop{n}", "source": source, "payload": "", "drop": reason}
            n += 1


def _payload(record: Document | Conversation) -> str:
    if isinstance(record, Document):
        return record.text
    return json.dumps(record.messages, ensure_ascii=False)


def dedup_text(payload: str, kind: str) -> str:
    """The text that duplicates are judged on: the document, or the conversation's turns."""
    if kind == "pretrain":
        return payload
    return dedup.conversation_dedup_text(Conversation(json.loads(payload), source=""))


def dedup_group(payload: str, kind: str) -> str:
    """The group that duplicates are looked for in: "" for documents, the system card's key for
    conversations (dedup.conversation_group)."""
    if kind == "pretrain":
        return ""
    return dedup.conversation_group(Conversation(json.loads(payload), source=""))


# --- stage 2: dedup keys (parallel); the decisions are dedup.Deduplicator's (sequential) ----


def add_dedup_keys(batch: dict[str, np.ndarray], kind: str, num_perm: int = 128) -> dict[str, np.ndarray]:
    """Add the exact-duplicate key, the MinHash signature (as bytes) and the dedup group to a batch
    of kept rows."""
    texts = [dedup_text(p, kind) for p in batch["payload"]]
    batch["exact_key"] = np.array([dedup.exact_key(t) for t in texts], dtype=object)
    batch["group"] = np.array([dedup_group(p, kind) for p in batch["payload"]], dtype=object)
    batch["signature"] = np.array(
        [dedup.minhash_signature(t, num_perm=num_perm).tobytes() for t in texts], dtype=object
    )
    return batch


# --- stage 3: tokenize --------------------------------------------------------------------


def encode_rows(batch: dict[str, np.ndarray], tokenizer_path: str, opts: PrepareOptions) -> dict[str, np.ndarray]:
    """Tokenize a batch of kept rows into aligned input_ids/labels; over-long SFT rows are cut or
    dropped by the policy of `encode_conversation` (the reason lands in `drop` / `note`)."""
    tok = _tokenizer(tokenizer_path)
    ids, labels, drops, notes = [], [], [], []
    for payload in batch["payload"]:
        if opts.kind == "pretrain":
            sample, note = encode_document(payload, tok), None
        else:
            sample, note = encode_conversation(json.loads(payload), tok, max_len=opts.max_len)
        empty = np.zeros(0, dtype=np.int32)
        ids.append(sample.input_ids if sample is not None else empty)
        labels.append(sample.labels if sample is not None else empty)
        drops.append(note if sample is None else "")
        notes.append(note if sample is not None and note else "")
    return {
        "source": batch["source"],
        "input_ids": _object_array(ids),
        "labels": _object_array(labels),
        "drop": np.array(drops, dtype=object),
        "note": np.array(notes, dtype=object),
    }


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    # Loaded once per worker process, not once per batch.
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer.load(path)
    return _TOKENIZERS[path]


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --- stage 4: shards, tokenizer copy and manifest (driver) --------------------------------


def nothing_kept(report: DropReport, out: str | Path) -> DataError:
    """The error for a run in which every record was dropped, with the table of why.

    Args:
        report: the counts so far (read, and dropped by reason with examples).
        out: the output folder, which is left without a manifest.

    Returns:
        The DataError to raise.
    """
    read = f"all {report.input_records:,} records read were dropped" if report.input_records else "no record was read"
    return DataError(
        f"no record was kept ({read}), so nothing was written to {out}; the inputs, or the options that "
        f"dropped them, need a look:\n{report.table()}"
    )


def write_outputs(
    samples: Iterable[Sample], tok: Tokenizer, opts: PrepareOptions, report: DropReport, extra: dict | None = None
) -> PrepareResult:
    """Write the shards, the tokenizer (sentencepiece model + HF folder) and manifest.json.

    Raises:
        DataError: there was no sample to write (see `nothing_kept`); no manifest is written, so
            that an empty dataset fails here rather than at training time.
    """
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, target_bytes=opts.shard_bytes) as writer:
        for sample in samples:
            writer.write(sample)
    if not writer.shards:
        raise nothing_kept(report, out)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    if Path(tok.path).resolve() != (tok_dir / "tokenizer.model").resolve():
        shutil.copyfile(tok.path, tok_dir / "tokenizer.model")
    tok.save_hf(tok_dir)
    manifest = write_manifest(
        out, kind=opts.kind, shards=writer.shards, tokenizer_sha256=tok.sha256, report=report, extra=extra
    )
    return PrepareResult(report=report, shards=writer.shards, manifest=manifest)
