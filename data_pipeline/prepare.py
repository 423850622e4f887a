"""Raw files → clean, deduplicated, tokenized shards: the stages of launch/prepare_data.py.

Each stage is a plain function over rows (dicts) or column batches, so that any executor can run
it: launch/prepare_data.py runs them as Ray Data operations (local or on a cluster), the tests
call them directly. Rows that a stage drops are not removed but marked, `drop` set to the
reason, so the driver can count every record and nothing disappears without a trace.

    import_rows (per input file: read + clean)  ─►  add_dedup_keys (per batch)
      ─► Deduplicator (driver, sequential: exact hash + MinHash LSH)
      ─► [train_tokenizer on kept text]  ─►  encode_rows (per batch)  ─►  write_outputs (driver)

The kind decides the record each row carries: a Document (pretrain), a Conversation (sft) or a
PreferencePair (preference: one Sample of two sequences, with `segments`, per pair).

Nothing in `--out` is destroyed before its replacement exists (issue 17): the job writes into a
temporary folder beside it (`build_beside`), and only a finished dataset takes its place
(`swap_in`), which then deletes just what the earlier dataset's manifest lists; other files in
`--out` are moved across into the new folder. A failed run leaves `--out` as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline import clean, dedup, formats
from data_pipeline.chat import (
    COMPLETION_CUT,
    encode_conversation,
    encode_document,
    encode_pair,
    show_masks,
    show_pair_masks,
)
from data_pipeline.records import Conversation, DataError, Document, DropReport, PreferencePair, Sample
from data_pipeline.shards import MANIFEST_NAME, ShardWriter, load_manifest, write_manifest
from data_pipeline.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from model.loss import IGNORE_INDEX

KINDS = ("pretrain", "sft", "preference")


@dataclass
class PrepareOptions:
    """What `launch/prepare_data.py` was asked to do (its command-line flags)."""

    kind: str
    """`pretrain` (text documents), `sft` (conversations) or `preference` (prompt, chosen, rejected)."""
    inputs: list[str]
    """Input files or folders."""
    out: str
    """Output folder: shards, manifest.json, tokenizer/."""
    fmt: str = "text"
    """SFT input format: messages | sharegpt | alpaca | rolebench; preference: trl | ultrafeedback |
    alpaca_pref | sharegpt_pref (pretraining: text)."""
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
    """SFT: longest tokenized conversation (earlier turns are cut, then it is dropped); preference:
    longest prompt + completion, each of the two (the completion's end is cut, see encode_pair)."""
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
"""The `drop` value of a row that carries a fatal DataError (its message in `payload`, or after
tokenizing in `note`)."""
TEMPLATE_ERROR = "chat_template_error"
"""A conversation the chat template cannot render or mask, skipped under on_error "skip"."""


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
    for n, record in enumerate(_cleaned_records(path, opts, report)):
        yield {"id": f"{file_index}:{n}", "source": record.source, "payload": _payload(record), "drop": ""}
    yield from drop_rows(report, file_index)


def _cleaned_records(path: str, opts: PrepareOptions, report: DropReport) -> Iterator:
    """The records of one input, cleaned; what is dropped is counted in `report`."""
    if opts.kind == "preference":
        pairs = formats.read_preference_pairs(
            path, opts.fmt, on_error=opts.on_error, bad_bytes=opts.bad_bytes, report=report
        )
        return clean.clean_pairs(pairs, clean.CleanOptions(), report)
    if opts.kind == "pretrain":
        records = formats.read_documents(
            path,
            text_field=opts.text_field,
            split=opts.split,
            on_error=opts.on_error,
            bad_bytes=opts.bad_bytes,
            report=report,
        )
        return clean.clean_documents(
            records, clean.CleanOptions(min_chars=opts.min_chars, max_chars=opts.max_chars), report
        )
    profiles = formats.load_profiles(opts.profiles) if opts.profiles else None
    records = formats.read_conversations(
        path, opts.fmt, profiles=profiles, on_error=opts.on_error, bad_bytes=opts.bad_bytes, report=report
    )
    return clean.clean_conversations(records, clean.CleanOptions(), report)


def drop_rows(report: DropReport, file_index: int) -> Iterator[dict]:
    """One marked row per record a report counted as dropped (its examples' sources first)."""
    n = 0
    for reason, count in report.dropped.items():
        examples = report.examples.get(reason, [])
        for i in range(count):
            source = examples[i] if i < len(examples) else ""
            yield {"id": f"{file_index}:drop{n}", "source": source, "payload": "", "drop": reason}
            n += 1


def _payload(record: Document | Conversation | PreferencePair) -> str:
    if isinstance(record, Document):
        return record.text
    if isinstance(record, PreferencePair):
        parts = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}
        return json.dumps({**parts, "scores": record.scores}, ensure_ascii=False)
    return json.dumps(record.messages, ensure_ascii=False)


def pair_of(payload: str, source: str = "") -> PreferencePair:
    """The PreferencePair a preference row's payload holds.

    Args:
        payload: the row's payload (JSON of prompt, chosen, rejected and scores).
        source: the row's source.
    Returns:
        The pair.
    """
    parts = json.loads(payload)
    scores = parts.pop("scores", None)
    return PreferencePair(**parts, source=source, scores=tuple(scores) if scores is not None else None)


def dedup_text(payload: str, kind: str) -> str:
    """The text that duplicates are judged on: the document, the conversation's turns, or the
    pair's prompt, chosen and rejected turns."""
    if kind == "pretrain":
        return payload
    if kind == "preference":
        return dedup.pair_dedup_text(pair_of(payload))
    return dedup.conversation_dedup_text(Conversation(json.loads(payload), source=""))


def dedup_group(payload: str, kind: str) -> str:
    """The group that duplicates are looked for in: "" for documents, the system card's key for
    conversations and pairs (dedup.conversation_group)."""
    if kind == "pretrain":
        return ""
    if kind == "preference":
        return dedup.pair_group(pair_of(payload))
    return dedup.conversation_group(Conversation(json.loads(payload), source=""))


def show_payload(payload: str, kind: str, tok: Tokenizer) -> str:
    """A kept row as its template renders it, trained tokens marked (prepare_data --show-masks).

    Args:
        payload: an sft or preference row's payload.
        kind: "sft" or "preference".
        tok: the tokenizer.
    Returns:
        The marked text (chat.show_masks, chat.show_pair_masks).
    """
    if kind == "preference":
        return show_pair_masks(pair_of(payload), tok)
    return show_masks(json.loads(payload), tok)


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
    dropped by the policy of `encode_conversation`, preference rows by `encode_pair` (the reason
    lands in `drop` / `note`). A chat the template cannot render or mask is, under on_error
    "raise", an ERROR row whose note names the record (raised by the driver), under "skip"
    dropped as "chat_template_error". Preference rows also get `segments` (the two sequences'
    lengths, (0, 0) for a dropped row) and `score_chosen` / `score_rejected` (NaN without)."""
    tok = _tokenizer(tokenizer_path)
    ids, labels, segments, drops, notes = [], [], [], [], []
    empty = np.zeros(0, dtype=np.int32)
    for source, payload in zip(batch["source"], batch["payload"], strict=True):
        sample, drop, note = _encode_one(source, payload, tok, opts)
        ids.append(sample.input_ids if sample is not None else empty)
        labels.append(sample.labels if sample is not None else empty)
        segments.append(sample.segments if sample is not None else (0, 0))
        drops.append(drop)
        notes.append(note)
    out = {
        "source": batch["source"],
        "input_ids": _object_array(ids),
        "labels": _object_array(labels),
        "drop": np.array(drops, dtype=object),
        "note": np.array(notes, dtype=object),
    }
    if opts.kind == "preference":
        out["segments"] = np.array(segments, dtype=np.int32).reshape(-1, 2)
        scores = [pair_of(p).scores or (np.nan, np.nan) for p in batch["payload"]]
        out["score_chosen"], out["score_rejected"] = np.array(scores, dtype=np.float64).reshape(-1, 2).T
    return out


def _encode_one(source: str, payload: str, tok: Tokenizer, opts: PrepareOptions) -> tuple[Sample | None, str, str]:
    """(sample or None, drop reason or "", note): the note is a kept sample's change, or an ERROR
    row's message naming the record."""
    try:
        if opts.kind == "pretrain":
            return encode_document(payload, tok), "", ""
        if opts.kind == "preference":
            sample, reason = encode_pair(pair_of(payload, source), tok, max_len=opts.max_len)
        else:
            sample, reason = encode_conversation(json.loads(payload), tok, max_len=opts.max_len)
    except DataError as error:  # exceptions lose their type crossing Ray's process boundary; rows do not
        if opts.on_error == "raise":
            return None, ERROR, f"{source}: {error}"
        return None, TEMPLATE_ERROR, ""
    return (sample, "", reason or "") if sample is not None else (None, reason, "")


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    # Loaded once per worker process, not once per batch.
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --- stage 4: shards, tokenizer copy and manifest (driver) --------------------------------


@dataclass
class PairStats:
    """What a preference set's manifest records under extra["preference"], counted as the pairs
    are written: the format, pairs kept, trained tokens of each side, pairs whose completion was
    cut, and the sources' scores (UltraFeedback's) averaged over the pairs that have them."""

    fmt: str
    pairs: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    completion_cut: int = 0
    scored: int = 0
    score_chosen_sum: float = 0.0
    score_rejected_sum: float = 0.0

    def add(self, sample: Sample, note: str, scores: tuple[float, float]) -> None:
        """Count one written pair.

        Args:
            sample: its Sample (segments set).
            note: its encode note ("completion_cut" counts).
            scores: (score_chosen, score_rejected), NaN where the source has none.
        """
        first = sample.segments[0]
        self.pairs += 1
        self.chosen_tokens += int((sample.labels[:first] != IGNORE_INDEX).sum())
        self.rejected_tokens += int((sample.labels[first:] != IGNORE_INDEX).sum())
        self.completion_cut += int(note == COMPLETION_CUT)
        if not np.isnan(scores).any():
            self.scored += 1
            self.score_chosen_sum += float(scores[0])
            self.score_rejected_sum += float(scores[1])

    def to_dict(self) -> dict:
        """The manifest's extra["preference"]."""
        out = {
            "format": self.fmt,
            "pairs": self.pairs,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
            "completion_cut": self.completion_cut,
            "scored_pairs": self.scored,
        }
        if self.scored:
            out["mean_score_chosen"] = self.score_chosen_sum / self.scored
            out["mean_score_rejected"] = self.score_rejected_sum / self.scored
        return out


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
    samples: Iterable[Sample],
    tok: Tokenizer,
    opts: PrepareOptions,
    report: DropReport,
    extra: dict | None = None,
    out_dir: str | Path | None = None,
) -> PrepareResult:
    """Write the shards, the tokenizer (a Hugging Face folder, as `Tokenizer.save` writes it) and manifest.json.

    Args:
        samples: the tokenized samples, in order.
        tok: the tokenizer they were encoded with (written to tokenizer/).
        opts: the preparation options (`opts.out` is the folder that messages name).
        report: what was read, kept and dropped; goes into the manifest.
        extra: anything else the manifest should record.
        out_dir: where to write (the `build_beside` folder of a prepare_data run); default `opts.out`.
    Returns:
        The shards and the manifest written.
    Raises:
        DataError: there was no sample to write (see `nothing_kept`); no manifest is written, so
            that an empty dataset fails here rather than at training time.
    """
    out = Path(out_dir if out_dir is not None else opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, target_bytes=opts.shard_bytes) as writer:
        for sample in samples:
            writer.write(sample)
    if not writer.shards:
        raise nothing_kept(report, opts.out)
    tok.save(out / "tokenizer")
    manifest = write_manifest(
        out, kind=opts.kind, shards=writer.shards, tokenizer_sha256=tok.sha256, report=report, extra=extra
    )
    return PrepareResult(report=report, shards=writer.shards, manifest=manifest)


# --- replacing --out: build beside it, swap in when finished (issue 17) -------------------


@contextmanager
def build_beside(out: str | Path) -> Iterator[Path]:
    """A new empty folder `.<name>.tmp-XXXXXXXX` beside `out` (same parent, so the same file system
    and `swap_in` is a rename), removed when the block is left: after a failure with whatever was
    written into it, after `swap_in` with nothing left to remove. `out` itself is not touched.

    Args:
        out: the output folder (its parents are created if missing).
    Yields:
        The temporary folder.
    """
    out = Path(out).resolve()  # a symlinked --out: build beside the folder it points to
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    build.chmod(_folder_mode(out))  # mkdtemp's 0700 would become --out's: unreadable to the team
    try:
        yield build
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _folder_mode(out: Path) -> int:
    """The permissions `out` has, or a new folder would get under the umask."""
    if out.is_dir():
        return out.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def swap_in(build: str | Path, out: str | Path) -> Path | None:
    """Put the finished folder `build` in `out`'s place, then delete the earlier dataset.

    `out` is renamed aside and `build` renamed to `out` (two renames: the nearest to atomic that
    a file system offers for a non-empty folder). Of the folder set aside, only what its manifest
    lists is deleted (`earlier_dataset`): the manifest, its shards, and tokenizer/'s files when
    they are the tokenizer that manifest names. Everything else (a user's own tar, notes) is moved
    across into the new `out`; an entry whose name the new dataset also uses (a shard an
    unfinished run left without a manifest) cannot be, and stays in a `<name>.previous-XXXXXXXX`
    folder beside `out`, which is returned.

    Args:
        build: the folder the new dataset was written into (from `build_beside`).
        out: the output folder; it may not exist yet.
    Returns:
        The folder holding what could not be moved across, or None when nothing was left over.
    """
    build, out = Path(build), Path(out).resolve()
    if not out.exists():
        build.rename(out)
        return None
    # A rename onto an empty folder replaces it: a fresh, unique name for the folder set aside.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old)
    try:
        build.rename(out)
    except BaseException:
        old.rename(out)
        raise
    try:
        for path in earlier_dataset(old):
            path.unlink()
        _move_across(old, out)
    finally:
        kept = _keep_leftovers(old, out)  # also after a failure: what is left stays in sight
    return kept


def earlier_dataset(folder: str | Path) -> list[Path]:
    """The files of the dataset that `folder`'s manifest describes: the manifest, the shards it
    lists, and tokenizer/'s files (TOKENIZER_FILES) when it holds the tokenizer the manifest
    names. An unreadable manifest describes nothing.

    Args:
        folder: a prepared data folder, or any folder.
    Returns:
        Those of the files that exist.
    """
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except DataError:
        return []
    listed = [folder / MANIFEST_NAME] + [folder / shard["path"] for shard in manifest["shards"]]
    listed = [p for p in listed if p.parent == folder]  # never a path outside the folder
    tok_dir = folder / "tokenizer"
    if _tokenizer_digest(tok_dir) == manifest["tokenizer_sha256"]:
        listed += [tok_dir / name for name in TOKENIZER_FILES]
    return [p for p in listed if p.is_file() and not p.is_symlink()]


def _tokenizer_digest(folder: Path) -> str | None:
    try:
        return load_tokenizer(folder).sha256
    except DataError:
        return None


def _move_across(src: Path, dst: Path) -> None:
    """Move src's entries into dst where dst has none of that name, merging folders; the rest stays."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if not target.exists() and not target.is_symlink():
            entry.rename(target)
        elif entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _move_across(entry, target)
            _remove_if_empty(entry)


def _keep_leftovers(old: Path, out: Path) -> Path | None:
    if _remove_if_empty(old) is None:
        return None
    kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.previous-", dir=out.parent))
    old.rename(kept)
    return kept


def _remove_if_empty(folder: Path) -> Path | None:
    """Remove folder and any empty folders within it; return it if something is left in it."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _remove_if_empty(entry)
    if any(folder.iterdir()):
        return folder
    folder.rmdir()
    return None
