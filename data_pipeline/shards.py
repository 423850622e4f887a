"""Webdataset shards of tokenized samples, and the manifest that describes them.

    ShardWriter ─► shard-000000.tar, shard-000001.tar, ...  ─► write_manifest ─► manifest.json
    load_manifest (format version + tokenizer checks) ─► read_shard (checksum, corruption policy)

Each webdataset sample is a key `%09d` with two members:

- `input_ids.npy`: uint16 when every id is below 65536 (any vocabulary up to 64k), else int32.
- `labels.npy`: uint16 when every label is IGNORE_INDEX or below 65535, with 65535 standing for
  IGNORE_INDEX; else int32. Targets are token ids, so this holds whenever the ids fit in uint16
  but for id 65535 itself, and it makes a stored token 4 bytes instead of 8.

A preference pair (see records.Sample) adds `segments.npy` (int32: the lengths of its two
sequences), and a preference set with its reference computed adds `ref_logps.npy` (float32: the
reference's log-probability of each label).

Decoding always gives int32 arrays back. Shards are written under a temporary name and renamed
when complete, and the manifest is written last (atomically), so a folder with a manifest holds
only finished shards; the manifest's sha256 of each shard catches later damage on read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset

from data_pipeline.files import write_atomically
from data_pipeline.records import DataError, DropReport, Sample
from model.loss import IGNORE_INDEX

FORMAT_VERSION = 1
"""Version of the shard layout and manifest; bump it when either changes incompatibly."""
MANIFEST_NAME = "manifest.json"
KINDS = ("pretrain", "sft", "preference")
DEFAULT_TARGET_BYTES = 64 * 2**20
_LABEL_SENTINEL = 65535  # IGNORE_INDEX in a uint16 labels array
_MEMBERS = ("input_ids.npy", "labels.npy")
_OPTIONAL_MEMBERS = ("segments.npy", "ref_logps.npy")
_SHARD_KEYS = ("path", "samples", "tokens", "sha256")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: the file.
        chunk: bytes read at a time.
    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- encoding ------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """The two webdataset members of a sample, in the compact dtypes of the module docstring.

    Args:
        sample: aligned input_ids and labels of the same non-zero length (and segments and
            ref_logps where it has them).
    Returns:
        {"input_ids.npy": bytes, "labels.npy": bytes} (+ "segments.npy", "ref_logps.npy").
    """
    ids = np.asarray(sample.input_ids)
    labels = np.asarray(sample.labels)
    if ids.ndim != 1 or labels.shape != ids.shape or len(ids) == 0:
        raise DataError(
            f"a sample needs 1-D input_ids and labels of one non-zero length, got {ids.shape}, {labels.shape}"
        )
    if ids.min() < 0:
        raise DataError(f"negative token id {int(ids.min())} in a sample's input_ids")
    ids = ids.astype(np.uint16 if ids.max() < 65536 else np.int32)
    ignored = labels == IGNORE_INDEX
    targets = labels[~ignored]
    if targets.size and (targets.min() < 0):
        raise DataError(f"label {int(targets.min())} is neither a token id nor IGNORE_INDEX ({IGNORE_INDEX})")
    if targets.size == 0 or targets.max() < _LABEL_SENTINEL:
        labels = np.where(ignored, _LABEL_SENTINEL, labels).astype(np.uint16)
    else:
        labels = labels.astype(np.int32)
    members = {"input_ids.npy": _npy_bytes(ids), "labels.npy": _npy_bytes(labels)}
    if sample.segments is not None:
        segments = np.asarray(sample.segments, np.int32)
        if segments.ndim != 1 or segments.min(initial=1) < 1 or segments.sum() != len(ids):
            raise DataError(f"a sample's segments {list(segments)} must be positive lengths summing to {len(ids)}")
        members["segments.npy"] = _npy_bytes(segments)
    if sample.ref_logps is not None:
        if np.shape(sample.ref_logps) != ids.shape:
            raise DataError(f"a sample's ref_logps {np.shape(sample.ref_logps)} do not match its {ids.shape} ids")
        members["ref_logps.npy"] = _npy_bytes(np.asarray(sample.ref_logps, np.float32))
    return members


_NPY_HEADER = re.compile(r"\{'descr': '(<u2|<i4)', 'fortran_order': False, 'shape': \((\d+),\), \}\s*")


def _load_npy(data: bytes) -> np.ndarray:
    """np.load for the 1-D arrays this module writes, without numpy's literal_eval of the header
    (which is most of the decoding time); anything else goes through numpy's reader."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        start = 10 + int.from_bytes(data[8:10], "little")
        header = _NPY_HEADER.fullmatch(data[10:start].decode("latin1"))
        if header:
            dtype, count = np.dtype(header[1]), int(header[2])
            if len(data) - start != count * dtype.itemsize:
                raise ValueError(f"array of {count} {dtype} has {len(data) - start} bytes")
            return np.frombuffer(data, dtype, count, offset=start)
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def decode_sample(members: dict[str, bytes]) -> Sample:
    """Inverse of `encode_sample`.

    Args:
        members: {"input_ids.npy": bytes, "labels.npy": bytes}.
    Returns:
        The Sample with int32 arrays.
    Raises:
        ValueError: a member is not an npy array of an expected dtype, or the lengths differ.
    """
    ids = _load_npy(members["input_ids.npy"])
    labels = _load_npy(members["labels.npy"])
    if ids.dtype not in (np.uint16, np.int32) or labels.dtype not in (np.uint16, np.int32):
        raise ValueError(f"unexpected dtypes {ids.dtype}/{labels.dtype}")
    if ids.ndim != 1 or labels.shape != ids.shape or len(ids) == 0:
        raise ValueError(f"input_ids {ids.shape} and labels {labels.shape} do not match")
    was_compact = labels.dtype == np.uint16
    labels = labels.astype(np.int32)
    if was_compact:
        labels[labels == _LABEL_SENTINEL] = IGNORE_INDEX
    segments = ref_logps = None
    if "segments.npy" in members:
        segments = _load_npy(members["segments.npy"])
        if (
            segments.dtype != np.int32
            or segments.ndim != 1
            or segments.min(initial=1) < 1
            or segments.sum() != len(ids)
        ):
            raise ValueError(f"segments {segments} are not positive lengths summing to {len(ids)}")
        segments = tuple(int(n) for n in segments)
    if "ref_logps.npy" in members:
        ref_logps = _load_npy(members["ref_logps.npy"])
        if ref_logps.dtype != np.float32 or ref_logps.shape != ids.shape:
            raise ValueError(f"ref_logps {ref_logps.dtype} {ref_logps.shape} do not match input_ids {ids.shape}")
    return Sample(input_ids=ids.astype(np.int32), labels=labels, segments=segments, ref_logps=ref_logps)


# --- writing -------------------------------------------------------------------------------


class _HashingFile:
    """A write-only file that hashes and counts what goes through it, so the sha256 and size of
    a shard are known at close without reading it back."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class ShardWriter:
    """Writes Samples into webdataset tar shards of about `target_bytes` each.

    A shard is closed once it reaches target_bytes, so it can exceed it by one sample. Each
    shard is written as `<name>.tmp` and renamed when complete. After `close()` (or leaving the
    `with` block), `.shards` lists one entry per shard:
    `{"path", "samples", "tokens", "sha256", "lengths"}`. `lengths` holds every sample's length
    (one int per sample: about 8 bytes of JSON per sample in the manifest, e.g. 8 MB for a
    million SFT samples); the stream needs it to plan equal batch counts for SFT packing.

    Args:
        out_dir: folder for the shards (created if missing).
        target_bytes: size at which a shard is closed and the next one begun.
        prefix: file name prefix; shards are `<prefix>-%06d.tar`. Writers that share a folder
            (parallel workers) need distinct prefixes.
    """

    def __init__(self, out_dir: str | os.PathLike, *, target_bytes: int = DEFAULT_TARGET_BYTES, prefix: str = "shard"):
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.target_bytes = target_bytes
        self.prefix = prefix
        self.shards: list[dict] = []
        self._n_written = 0
        self._file: _HashingFile | None = None
        self._tar: webdataset.TarWriter | None = None
        self._name = ""
        self._lengths: list[int] = []

    def write(self, sample: Sample) -> None:
        """Append one sample, rolling to a new shard when the current one is full.

        Args:
            sample: aligned int input_ids and labels of the same non-zero length.
        """
        members = encode_sample(sample)
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": f"{self._n_written:09d}", **members})
        self._n_written += 1
        self._lengths.append(len(sample.input_ids))
        if self._tar.tarstream.offset >= self.target_bytes:
            self._close_shard()

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = _HashingFile(self.out_dir / (self._name + ".tmp"))
        # mtime fixed: the same samples give byte-identical shards, hence the same sha256.
        self._tar = webdataset.TarWriter(self._file, encoder=False, mtime=0)
        self._lengths = []

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        self.shards.append(
            {
                "path": self._name,
                "samples": len(self._lengths),
                "tokens": int(sum(self._lengths)),
                "sha256": self._file.sha.hexdigest(),
                "lengths": self._lengths,
            }
        )
        self._tar = self._file = None

    def close(self) -> None:
        """Finish the current shard (if any). Idempotent."""
        if self._tar is not None:
            self._close_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- manifest ------------------------------------------------------------------------------


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    kind: str,
    shards: list[dict],
    tokenizer_sha256: str,
    report: DropReport,
    extra: dict | None = None,
) -> Path:
    """Write `manifest.json` atomically (temp file + rename), after the shards are complete.

    Args:
        out_dir: the shard folder.
        kind: "pretrain", "sft" or "preference".
        shards: `ShardWriter.shards` (from one or more writers), paths relative to out_dir.
        tokenizer_sha256: sha256 of the tokenizer model the shards were encoded with.
        report: what the preparation read, kept and dropped.
        extra: anything else worth recording (sources, options), stored under "extra".
    Returns:
        The manifest's path.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for entry in shards:
        missing = [k for k in (*_SHARD_KEYS, "lengths") if k not in entry]
        if missing:
            raise ValueError(f"shard entry {entry.get('path', entry)} lacks {missing}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer_sha256": tokenizer_sha256,
        **report.to_dict(),
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "extra": extra or {},
    }
    path = Path(out_dir) / MANIFEST_NAME
    write_atomically(path, json.dumps(manifest, indent=1))
    return path


def load_manifest(data_dir: str | os.PathLike, *, tokenizer_sha256: str | None = None) -> dict:
    """Read and check a shard folder's manifest.

    Args:
        data_dir: the shard folder (or its manifest.json).
        tokenizer_sha256: when given, the sha256 of the tokenizer the caller will use; it must
            be the one the shards were made with.
    Returns:
        The manifest as a dict (see `write_manifest`).
    Raises:
        DataError: naming the file (and the field), for a missing or unreadable manifest, an
            unknown format version, a field missing or of the wrong type, a shard path outside
            the folder, or a tokenizer mismatch.
    """
    path = Path(data_dir)
    if path.is_dir() or path.name != MANIFEST_NAME:
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no manifest; {path.parent} is not a prepared data folder (or preparing it did not "
            "finish): run launch/prepare_data.py"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}): re-run launch/prepare_data.py") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: holds a JSON {_json_type(manifest)}, not an object: re-run launch/prepare_data.py")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} was written by format version {version}; this Crucible reads version {FORMAT_VERSION}: "
            "re-run launch/prepare_data.py"
        )
    _check_manifest_fields(path, manifest)
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest["tokenizer_sha256"]:
        raise DataError(
            f"{path}: shards were tokenized with {manifest['tokenizer_sha256']}, the tokenizer you passed is "
            f"{tokenizer_sha256}: pass the tokenizer the shards were made with, or re-prepare"
        )
    return manifest


def _check_manifest_fields(path: Path, manifest: dict) -> None:
    """Each field the stream reads, with its type: a hand-edited or foreign manifest is one DataError
    naming the field, not a TypeError deep in a training rank or a file read from elsewhere."""
    if manifest.get("kind") not in KINDS:
        raise DataError(f"{path}: kind is {manifest.get('kind')!r}, expected one of {KINDS}")
    for key in ("tokenizer_sha256", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: the manifest lacks {key!r}: re-run launch/prepare_data.py")
    _expect(path, "tokenizer_sha256", manifest["tokenizer_sha256"], str)
    _expect(path, "shards", manifest["shards"], list)
    seen: dict[Path, int] = {}
    for i, entry in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        _expect(path, where, entry, dict)
        missing = [k for k in _SHARD_KEYS if k not in entry]
        if missing:
            raise DataError(f"{path}: {where} lacks {missing}: re-run launch/prepare_data.py")
        for key, kind in (("path", str), ("samples", int), ("tokens", int), ("sha256", str)):
            _expect(path, f"{where}.{key}", entry[key], kind)
        target = _shard_file(path, where, entry["path"])
        if target in seen:
            raise DataError(
                f"{path}: {where}.path {entry['path']!r} is also shards[{seen[target]}].path (its samples would be "
                "trained twice an epoch): re-run launch/prepare_data.py"
            )
        seen[target] = i
        if "lengths" in entry:
            _check_entry_lengths(path, where, entry)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(type(value), "null")


def _expect(path: Path, where: str, value, kind: type) -> None:
    """value is a `kind` (an int: a non-negative one, and not a bool)."""
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is int and value < 0:
        raise DataError(f"{path}: {where} is {value}, a count must not be negative: re-run launch/prepare_data.py")
    if not ok:
        want = {int: "an integer", str: "a string", list: "an array", dict: "an object"}[kind]
        raise DataError(
            f"{path}: {where} is a JSON {_json_type(value)} ({json.dumps(value)[:40]}), expected {want}: "
            "re-run launch/prepare_data.py"
        )


def _shard_file(path: Path, where: str, rel: str) -> Path:
    """The resolved file a shard path names, which must be in the manifest's folder (symlinks
    resolved): one pointing elsewhere would read, and hash, whatever file it names."""
    root = path.parent.resolve()
    target = (root / rel).resolve()
    if not rel or Path(rel).is_absolute() or target == root or not target.is_relative_to(root):
        raise DataError(
            f"{path}: {where}.path {rel!r} is outside the data folder {path.parent}: a manifest lists the shards "
            "beside it; re-run launch/prepare_data.py"
        )
    return target


def _check_entry_lengths(path: Path, where: str, entry: dict) -> None:
    """One positive int per sample, adding up to the shard's tokens: the stream plans batch counts
    from them, and a plan that disagrees with the data would cut or pad an epoch."""
    lengths = entry["lengths"]
    _expect(path, f"{where}.lengths", lengths, list)
    bad = next((j for j, n in enumerate(lengths) if type(n) is not int or n < 1), None)  # bool is not int here
    if bad is not None:
        raise DataError(
            f"{path}: {where}.lengths[{bad}] is {json.dumps(lengths[bad])[:40]}, expected a positive integer: "
            "re-run launch/prepare_data.py"
        )
    if len(lengths) != entry["samples"] or sum(lengths) != entry["tokens"]:
        raise DataError(
            f"{path}: {where} ({entry['path']}) lists {len(lengths)} lengths adding up to {sum(lengths)} tokens for "
            f"{entry['samples']} samples of {entry['tokens']} tokens: re-run launch/prepare_data.py"
        )


# --- reading -------------------------------------------------------------------------------


def read_shard(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    on_error: str = "skip",
    report: DropReport | None = None,
    skip: int = 0,
) -> Iterator[Sample]:
    """The samples of one shard, in order.

    With `expected_sha256` the whole file is read into memory (one read; a shard is tens of
    MiB) and checked before anything is yielded, so a damaged shard contributes no samples.
    Without it, damage to the tar structure (a bad header, a cut-short file) is still found, but
    only when reached, after the samples before it were yielded, and damage inside an array's
    bytes can go unnoticed: pass the checksum.

    Args:
        path: the .tar shard.
        expected_sha256: the manifest's checksum of the file.
        on_error: "raise": a DataError naming the shard and what is wrong; "skip": the rest of
            the shard is skipped, counted as `report.drop("corrupt_shard", path)` and warned
            about, and iteration ends normally.
        report: where "skip" counts the shard (a warning is issued either way).
        skip: samples to pass over first (resuming); their bytes are not decoded.
    Returns:
        An iterator of Samples with int32 arrays.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    try:
        yield from _read_samples(Path(path), expected_sha256, skip)
    except DataError as e:
        if on_error == "raise":
            raise
        if report is not None:
            report.drop("corrupt_shard", str(path))
        warnings.warn(f"{e}; skipping the rest of this shard", stacklevel=2)


def _read_samples(path: Path, expected_sha256: str | None, skip: int) -> Iterator[Sample]:
    try:
        if expected_sha256 is not None:
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected_sha256:
                raise DataError(
                    f"shard {path}: checksum mismatch (manifest says {expected_sha256}, the file has {actual}); "
                    "the file was damaged or replaced after preparation"
                )
            fileobj = io.BytesIO(data)
        else:
            fileobj = open(path, "rb")
    except OSError as e:
        raise DataError(f"shard {path}: cannot read ({e})") from e
    with fileobj:
        fileobj.seek(0, os.SEEK_END)
        size = fileobj.tell()
        fileobj.seek(0)
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:")
        except tarfile.TarError as e:
            raise DataError(f"shard {path}: not a readable tar ({e})") from e
        yield from _tar_samples(path, tar, size, skip)


def _tar_samples(path: Path, tar: tarfile.TarFile, size: int, skip: int) -> Iterator[Sample]:
    """Group the tar's members by key into samples; members of skipped keys are never read."""
    key, members, n_keys = None, {}, 0
    while (info := _next_member(path, tar, size)) is not None:
        member_key, _, suffix = info.name.partition(".")
        if member_key != key:
            if key is not None and n_keys > skip:
                yield _finish_sample(path, key, members)
            key, members, n_keys = member_key, {}, n_keys + 1
        if n_keys > skip and (suffix in _MEMBERS or suffix in _OPTIONAL_MEMBERS):
            members[suffix] = _member_bytes(path, tar, info, size)
    _check_end_of_archive(path, tar.fileobj, tar.offset, size)
    if key is not None and n_keys > skip:
        yield _finish_sample(path, key, members)


def _truncated_or_corrupt(path: Path, offset: int, size: int, err: Exception) -> DataError:
    # tarfile's own words for running out of bytes (3.10-3.13)
    cut = any(m in str(err) for m in ("unexpected end of data", "empty header", "truncated header"))
    if cut or offset + tarfile.BLOCKSIZE > size:
        return DataError(f"shard {path}: truncated at byte {size} (the file ends inside a member)")
    return DataError(f"shard {path}: corrupt tar near byte {offset} of {size} ({err})")


def _next_member(path: Path, tar: tarfile.TarFile, size: int) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _truncated_or_corrupt(path, tar.offset, size, e) from e


def _member_bytes(path: Path, tar: tarfile.TarFile, info: tarfile.TarInfo, size: int) -> bytes:
    if not info.isreg():
        raise DataError(f"shard {path}: member {info.name} is not a regular file")
    try:
        data = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _truncated_or_corrupt(path, info.offset_data + info.size, size, e) from e
    if len(data) != info.size:
        raise DataError(f"shard {path}: truncated inside member {info.name} ({len(data)} of {info.size} bytes)")
    return data


def _finish_sample(path: Path, key: str, members: dict[str, bytes]) -> Sample:
    missing = [m for m in _MEMBERS if m not in members]
    if missing:
        raise DataError(f"shard {path}: sample {key} lacks {missing}")
    try:
        return decode_sample(members)
    except ValueError as e:
        raise DataError(f"shard {path}: sample {key} does not decode ({e})") from e


def _check_end_of_archive(path: Path, fileobj, offset: int, size: int) -> None:
    """tarfile ends iteration quietly at a damaged or missing header after the first one, so a
    cut or overwritten shard would look merely short; a real end is two zero blocks."""
    fileobj.seek(offset)
    if fileobj.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE):
        return
    if offset + 2 * tarfile.BLOCKSIZE > size:
        raise DataError(f"shard {path}: truncated at byte {size} (the end-of-archive marker is missing)")
    raise DataError(f"shard {path}: corrupt tar header at byte {offset} of {size}")
