"""Shards and manifest: exact round trips, the manifest's checks, and damaged files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards as shards_mod
from data_pipeline.records import DataError, DropReport, Sample
from data_pipeline.shards import (
    FORMAT_VERSION,
    ShardWriter,
    load_manifest,
    read_shard,
    sha256_file,
    write_manifest,
)
from model.loss import IGNORE_INDEX

TOKENIZER_SHA = "ab" * 32


def make_samples(n: int, *, seed: int = 0, min_len: int = 1, max_len: int = 60, ignore_frac: float = 0.25):
    """Samples whose input ids are unique across the whole set (so a token names its position)
    and whose labels are the next id, with some set to IGNORE_INDEX."""
    rng = np.random.default_rng(seed)
    samples, next_id = [], 1
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = np.arange(next_id, next_id + length, dtype=np.int32)
        next_id += length
        labels = np.append(ids[1:], 0).astype(np.int32)
        labels[rng.random(length) < ignore_frac] = IGNORE_INDEX
        samples.append(Sample(input_ids=ids, labels=labels))
    return samples


def write_dataset(out: Path, samples: list[Sample], *, kind: str = "pretrain", target_bytes: int = 12000) -> Path:
    """Shards + manifest for `samples` in `out`, as prepare_data would write them."""
    with ShardWriter(out, target_bytes=target_bytes) as writer:
        for s in samples:
            writer.write(s)
    report = DropReport(input_records=len(samples) + 2, kept_records=len(samples))
    report.drop("too_short", "a.jsonl:3")
    report.drop("duplicate", "a.jsonl:9")
    write_manifest(
        out, kind=kind, shards=writer.shards, tokenizer_sha256=TOKENIZER_SHA, report=report, extra={"note": "test"}
    )
    return out


def read_all(data_dir: Path, **kw) -> list[Sample]:
    manifest = load_manifest(data_dir)
    return [s for e in manifest["shards"] for s in read_shard(data_dir / e["path"], expected_sha256=e["sha256"], **kw)]


def assert_same(got: list[Sample], want: list[Sample]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.input_ids.dtype == np.int32 and a.labels.dtype == np.int32
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, list[Sample]]:
    samples = make_samples(60)
    return write_dataset(tmp_path / "data", samples), samples


def test_round_trip_exact_int32_over_several_shards(dataset):
    data_dir, samples = dataset
    manifest = load_manifest(data_dir)
    assert len(manifest["shards"]) >= 4
    assert_same(read_all(data_dir, on_error="raise"), samples)


def test_compact_dtypes_and_wide_fallbacks(tmp_path):
    small = Sample(np.array([1, 65535, 7], np.int32), np.array([65534, IGNORE_INDEX, 3], np.int32))
    wide_ids = Sample(np.array([70000, 2], np.int32), np.array([2, IGNORE_INDEX], np.int32))
    label_65535 = Sample(np.array([65535, 4], np.int32), np.array([4, 65535], np.int32))
    with ShardWriter(tmp_path) as w:
        for s in (small, wide_ids, label_65535):
            w.write(s)
    path = tmp_path / w.shards[0]["path"]
    with tarfile.open(path) as tar:
        dtypes = [np.load(io.BytesIO(tar.extractfile(m).read())).dtype for m in tar.getmembers()]
    # per sample: input_ids then labels
    assert dtypes == [np.uint16, np.uint16, np.int32, np.uint16, np.uint16, np.int32]
    assert_same(list(read_shard(path, on_error="raise")), [small, wide_ids, label_65535])


def test_writer_rejects_bad_samples(tmp_path):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(DataError, match="one non-zero length"):
            w.write(Sample(np.array([1, 2], np.int32), np.array([2], np.int32)))
        with pytest.raises(DataError, match="one non-zero length"):
            w.write(Sample(np.array([], np.int32), np.array([], np.int32)))
        with pytest.raises(DataError, match="neither a token id nor IGNORE_INDEX"):
            w.write(Sample(np.array([1], np.int32), np.array([-5], np.int32)))
    assert w.shards == [] and list(tmp_path.iterdir()) == []


def test_shards_roll_at_target_bytes_and_are_reproducible(tmp_path):
    samples = make_samples(40)
    a = write_dataset(tmp_path / "a", samples, target_bytes=9000)
    b = write_dataset(tmp_path / "b", samples, target_bytes=9000)
    ma, mb = load_manifest(a), load_manifest(b)
    for entry in ma["shards"][:-1]:
        assert (a / entry["path"]).stat().st_size >= 9000
    assert [e["sha256"] for e in ma["shards"]] == [e["sha256"] for e in mb["shards"]]
    assert not list(a.glob("*.tmp"))


def test_manifest_fields(dataset):
    data_dir, samples = dataset
    m = load_manifest(data_dir)
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "pretrain"
    assert m["tokenizer_sha256"] == TOKENIZER_SHA
    assert (m["input_records"], m["kept_records"]) == (62, 60)
    assert m["dropped"] == {"duplicate": 1, "too_short": 1}
    assert m["extra"] == {"note": "test"}
    assert m["samples"] == 60 and m["tokens"] == sum(len(s) for s in samples)
    lengths = [n for e in m["shards"] for n in e["lengths"]]
    assert lengths == [len(s) for s in samples]
    for e in m["shards"]:
        assert e["sha256"] == sha256_file(data_dir / e["path"])
        assert e["samples"] == len(e["lengths"]) and e["tokens"] == sum(e["lengths"])
    assert not (data_dir / "manifest.json.tmp").exists()


def _rewrite_manifest(data_dir: Path, **changes) -> None:
    path = data_dir / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_unknown_format_version_is_refused(dataset):
    data_dir, _ = dataset
    _rewrite_manifest(data_dir, format_version=99)
    with pytest.raises(DataError) as e:
        load_manifest(data_dir)
    msg = str(e.value)
    assert str(data_dir / "manifest.json") in msg
    assert "written by format version 99; this Crucible reads version 1: re-run launch/prepare_data.py" in msg


def test_tokenizer_mismatch_is_refused(dataset):
    data_dir, _ = dataset
    load_manifest(data_dir, tokenizer_sha256=TOKENIZER_SHA)
    with pytest.raises(DataError) as e:
        load_manifest(data_dir, tokenizer_sha256="cd" * 32)
    msg = str(e.value)
    assert str(data_dir / "manifest.json") in msg
    assert f"shards were tokenized with {TOKENIZER_SHA}, the tokenizer you passed is {'cd' * 32}" in msg
    assert "pass the tokenizer the shards were made with, or re-prepare" in msg


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DataError, match="no manifest.*run launch/prepare_data.py") as e:
            load_manifest(d)
        assert str(d / "manifest.json") in str(e.value)
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        load_manifest(tmp_path / "empty")


def _set(m, where: str, value) -> None:
    """Set a field of a manifest dict by its place, e.g. "shards[3].path" or "shards[1].lengths[4]"."""
    *parents, last = where.replace("]", "").replace("[", ".").split(".")
    for key in parents:
        m = m[int(key)] if isinstance(m, list) else m[key]
    m[int(last) if isinstance(m, list) else last] = value


@pytest.mark.parametrize(
    "where, value, message",
    [
        ("tokenizer_sha256", 5, "tokenizer_sha256 is a JSON integer (5), expected a string"),
        ("shards", {}, "shards is a JSON object ({}), expected an array"),
        ("shards[1]", "shard-000001.tar", 'shards[1] is a JSON string ("shard-000001.tar"), expected an object'),
        ("shards[3].samples", "12", 'shards[3].samples is a JSON string ("12"), expected an integer'),
        ("shards[3].samples", True, "shards[3].samples is a JSON boolean (true), expected an integer"),
        ("shards[2].samples", -1, "shards[2].samples is -1, a count must not be negative"),
        ("shards[0].tokens", 1.5, "shards[0].tokens is a JSON number (1.5), expected an integer"),
        ("shards[0].sha256", None, "shards[0].sha256 is a JSON null (null), expected a string"),
        ("shards[0].path", 7, "shards[0].path is a JSON integer (7), expected a string"),
        ("shards[1].lengths", "1,2", 'shards[1].lengths is a JSON string ("1,2"), expected an array'),
        ("shards[1].lengths[4]", 2.5, "shards[1].lengths[4] is 2.5, expected a positive integer"),
        ("shards[1].lengths[0]", 0, "shards[1].lengths[0] is 0, expected a positive integer"),
        ("shards[1].lengths[2]", [3], "shards[1].lengths[2] is [3], expected a positive integer"),
        ("shards[3].path", "../x.tar", "shards[3].path '../x.tar' is outside the data folder"),
        ("shards[3].path", "/etc/passwd", "shards[3].path '/etc/passwd' is outside the data folder"),
        ("shards[3].path", "sub/../../data/../x.tar", "shards[3].path 'sub/../../data/../x.tar' is outside the data"),
        ("shards[3].path", ".", "shards[3].path '.' is outside the data folder"),
        ("shards[3].path", "./shard-000000.tar", "shards[3].path './shard-000000.tar' is also shards[0].path"),
    ],
)
def test_malformed_manifest_names_the_file_and_field(dataset, where, value, message):
    data_dir, _ = dataset
    path = data_dir / "manifest.json"
    m = json.loads(path.read_text())
    _set(m, where, value)
    path.write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        load_manifest(data_dir)
    assert str(e.value).startswith(f"{path}: {message}")


def test_manifest_that_is_not_an_object_or_miscounts(dataset):
    data_dir, _ = dataset
    path = data_dir / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"manifest.json: holds a JSON array, not an object: re-run launch"):
        load_manifest(data_dir)
    for change in ({"samples": good["shards"][1]["samples"] + 1}, {"tokens": good["shards"][1]["tokens"] - 1}):
        m = json.loads(json.dumps(good))
        m["shards"][1].update(change)
        path.write_text(json.dumps(m))
        with pytest.raises(DataError, match=r"manifest.json: shards\[1\] \(shard-000001.tar\) lists \d+ lengths"):
            load_manifest(data_dir)


def test_shard_symlinked_from_outside_the_folder_is_refused(dataset, tmp_path):
    data_dir, _ = dataset
    m = load_manifest(data_dir)
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes((data_dir / m["shards"][0]["path"]).read_bytes())
    (data_dir / "linked.tar").symlink_to(outside)
    (data_dir / "inside.tar").symlink_to(data_dir / m["shards"][0]["path"])
    for link, ok in (("inside.tar", True), ("linked.tar", False)):
        m["shards"][0]["path"] = link
        (data_dir / "manifest.json").write_text(json.dumps(m))
        if ok:
            load_manifest(data_dir)
            continue
        with pytest.raises(DataError) as e:
            load_manifest(data_dir)
        assert str(e.value).startswith(f"{data_dir / 'manifest.json'}: shards[0].path 'linked.tar' is outside")


def test_skip_passes_over_samples_without_decoding(dataset, monkeypatch):
    data_dir, samples = dataset
    entry = load_manifest(data_dir)["shards"][0]
    path = data_dir / entry["path"]
    calls = []
    real = shards_mod.decode_sample
    monkeypatch.setattr(shards_mod, "decode_sample", lambda m: calls.append(1) or real(m))
    n = entry["samples"]
    got = list(read_shard(path, skip=2, on_error="raise"))
    assert_same(got, samples[2:n])
    assert len(calls) == n - 2
    assert list(read_shard(path, skip=n + 5, on_error="raise")) == []


# --- damaged shards --------------------------------------------------------------------------


def _damage(data_dir: Path, how: str) -> tuple[Path, dict]:
    """Damage the second shard: cut it in half, or overwrite bytes in the middle of a header
    (found even without a checksum) or of an array (only the checksum finds that)."""
    entry = load_manifest(data_dir)["shards"][1]
    path = data_dir / entry["path"]
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        middle = members[len(members) // 2]
        at = middle.offset + 100 if how == "header" else middle.offset_data + 130
        data[at : at + 16] = b"\x7f" * 16
    path.write_bytes(bytes(data))
    return path, entry


@pytest.mark.parametrize("how", ["truncated", "header", "array"])
@pytest.mark.parametrize("checksum", [True, False])
def test_damaged_shard_raise_names_it(dataset, how, checksum):
    data_dir, _ = dataset
    path, entry = _damage(data_dir, how)
    sha = entry["sha256"] if checksum else None
    if how == "array" and not checksum:
        # no structure is broken: without the checksum this damage is invisible (documented)
        assert len(list(read_shard(path, on_error="raise"))) == entry["samples"]
        return
    with pytest.raises(DataError) as e:
        list(read_shard(path, expected_sha256=sha, on_error="raise"))
    msg = str(e.value)
    assert str(path) in msg
    expected = {"truncated": "truncated", "header": "corrupt"}.get(how)
    assert ("checksum mismatch" if checksum else expected) in msg


@pytest.mark.parametrize("how", ["truncated", "header", "array"])
def test_damaged_shard_skip_counts_it_and_yields_nothing(dataset, how):
    data_dir, samples = dataset
    path, entry = _damage(data_dir, how)
    report = DropReport()
    with pytest.warns(UserWarning, match="skipping the rest of this shard"):
        got = list(read_shard(path, expected_sha256=entry["sha256"], on_error="skip", report=report))
    assert got == []
    assert report.dropped["corrupt_shard"] == 1 and report.examples["corrupt_shard"] == [str(path)]
    # the other shards still read in full, and a resumed read (skip) of the damaged one ends too
    with pytest.warns(UserWarning, match=path.name):
        everything = read_all(data_dir, on_error="skip", report=report)
        resumed = list(read_shard(path, expected_sha256=entry["sha256"], on_error="skip", report=report, skip=3))
    assert len(everything) == len(samples) - entry["samples"]
    assert resumed == [] and report.dropped["corrupt_shard"] == 3


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_damaged_shard_without_checksum_skip_ends_at_the_damage(dataset, how):
    data_dir, samples = dataset
    path, entry = _damage(data_dir, how)
    report = DropReport()
    with pytest.warns(UserWarning, match=path.name):
        got = list(read_shard(path, on_error="skip", report=report))
    assert 0 < len(got) < entry["samples"]  # the samples before the damage, then a counted stop
    assert report.dropped["corrupt_shard"] == 1


def test_not_a_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"hello" * 300)
    with pytest.raises(DataError, match="not a readable tar"):
        list(read_shard(path, on_error="raise"))
    path.write_bytes(b"")
    with pytest.raises(DataError, match=str(path)):
        list(read_shard(path, on_error="raise"))
    with pytest.raises(DataError, match="cannot read"):
        list(read_shard(tmp_path / "missing.tar", on_error="raise"))
