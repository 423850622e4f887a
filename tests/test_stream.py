"""PackedStream: packing boundaries, nothing lost, rank partition, equal counts, exact resume.

The synthetic samples have globally unique token ids (tests.test_shards.make_samples), so every
token in a packed window names the sample and position it came from.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards as shards_mod
from data_pipeline.records import DataError, Sample
from data_pipeline.shards import load_manifest
from data_pipeline.stream import PackedStream, assign_shards
from model.loss import IGNORE_INDEX
from tests.test_shards import make_samples, write_dataset

SEQ, BATCH = 32, 4
KEYS = ("tokens", "labels", "position_ids", "doc_ids")


def _pretrain_samples() -> list[Sample]:
    samples = make_samples(120, seed=1, max_len=70)
    # one more sample so that the total is a multiple of SEQ: no partial window at world size 1
    room = -sum(len(s) for s in samples) % SEQ
    if room:
        extra = make_samples(1, seed=2, min_len=room, max_len=room)[0]
        start = max(int(s.input_ids.max()) for s in samples) + 1
        samples.append(Sample(extra.input_ids - 1 + start, np.where(extra.labels >= 0, extra.labels - 1 + start, -100)))
    return samples


def _sft_samples() -> list[Sample]:
    samples = make_samples(110, seed=3, max_len=SEQ)
    start = max(int(s.input_ids.max()) for s in samples) + 1
    for length in (SEQ + 1, 50):  # cannot be packed whole: dropped and counted
        ids = np.arange(start, start + length, dtype=np.int32)
        samples.insert(len(samples) // 2, Sample(ids, ids.copy()))
        start += length
    return samples


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory) -> tuple[Path, list[Sample]]:
    samples = _pretrain_samples()
    return write_dataset(tmp_path_factory.mktemp("pretrain"), samples), samples


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[Path, list[Sample]]:
    samples = _sft_samples()
    return write_dataset(tmp_path_factory.mktemp("sft"), samples, kind="sft"), samples


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> dict[str, tuple[Path, list[Sample]]]:
    """Data sets with fewer shards than ranks, or shards so uneven that windows are dealt in some
    epoch (target_bytes=4000 puts each sample of these into a shard of its own)."""
    one_document = make_samples(1, seed=9, min_len=1000, max_len=1000)  # 31 windows and 8 tokens
    long = make_samples(2, seed=5, min_len=1000, max_len=1000)  # ids 1..2000
    made = {
        "pretrain_1_shard": (_pretrain_samples(), "pretrain", 10**9),
        "sft_1_shard": (_sft_samples(), "sft", 10**9),
        "one_document": (one_document, "pretrain", 10**9),
        "pretrain_4_shards": (_pretrain_samples(), "pretrain", 60_000),
        # a long document's shard beside a short one's: whole shards give one rank no batch
        "uneven_2_shards": (long[:1] + _short(10, start=1001), "pretrain", 4000),
        # ... or one batch (31 and 4 windows), where dealing gives 4 batches
        "long_beside_130": (long[:1] + _short(130, start=1001), "pretrain", 4000),
        # whole shards give both ranks 31 windows, until an epoch's order puts both long ones on one rank
        "two_long_one_short": (long + _short(10, start=2001), "pretrain", 4000),
    }
    return {
        name: (write_dataset(tmp_path_factory.mktemp(name), samples, kind=kind, target_bytes=size), samples)
        for name, (samples, kind, size) in made.items()
    }


def _short(length: int, start: int) -> list[Sample]:
    """One sample with ids start.. (after make_samples' ids, so that ids still name positions)."""
    ids = np.arange(start, start + length, dtype=np.int32)
    return [Sample(input_ids=ids, labels=np.append(ids[1:], 0).astype(np.int32))]


def dataset(name: str, pretrain, sft, few_shards) -> tuple[Path, list[Sample]]:
    return {"pretrain": pretrain, "sft": sft, **few_shards}[name]


def stream(data_dir: Path, **kw) -> PackedStream:
    args = dict(seq_len=SEQ, batch_size=BATCH, shuffle_buffer=8) | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SFT set's over-long samples warn on every build
        return PackedStream(data_dir, **args)


def take(s: PackedStream, n: int) -> list[dict]:
    return [next(s) for _ in range(n)]


def rows(batches: list[dict]) -> list[dict]:
    return [{k: b[k][i] for k in KEYS} for b in batches for i in range(len(b["tokens"]))]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in KEYS)


def check_window(w: dict, where: dict, samples: list[Sample], split: bool) -> list[tuple[int, int, int]]:
    """Assert a window's structure; return its real pieces as (sample, first position, length)."""
    tok, lab, pos, doc = (w[k] for k in KEYS)
    assert all(w[k].dtype == np.int64 and w[k].shape == (SEQ,) for k in KEYS)
    assert doc[0] == 0 and set(np.diff(doc)) <= {0, 1}
    starts = [0, *np.flatnonzero(np.diff(doc)) + 1, SEQ]
    pieces = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert np.array_equal(pos[a:b], np.arange(b - a)), "positions restart at 0 at each document"
        if tok[a] == 0:  # padding: the tail only, nothing to learn
            assert b == SEQ and not split and (tok[a:] == 0).all() and (lab[a:] == IGNORE_INDEX).all()
            continue
        i, j = where[int(tok[a])]
        sample = samples[i]
        assert np.array_equal(tok[a:b], sample.input_ids[j : j + b - a])
        assert np.array_equal(lab[a:b], sample.labels[j : j + b - a]), "labels stay aligned with their tokens"
        if split:  # a piece is cut only at a window's edge
            assert j == 0 or a == 0
            assert j + b - a == len(sample) or b == SEQ
        else:
            assert j == 0 and b - a == len(sample), "SFT samples are packed whole"
        pieces.append((i, j, b - a))
    return pieces


def positions_of(samples: list[Sample]) -> dict[int, tuple[int, int]]:
    return {int(t): (i, j) for i, s in enumerate(samples) for j, t in enumerate(s.input_ids)}


# --- shard assignment -----------------------------------------------------------------------


def test_assign_shards_partitions_each_epoch():
    for epoch in range(3):
        parts = [assign_shards(10, r, 3, epoch, seed=5) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(10))
        assert [len(p) for p in parts] == [4, 3, 3]
    assert assign_shards(10, 0, 1, 0, 5) != assign_shards(10, 0, 1, 1, 5)
    assert assign_shards(10, 0, 1, 0, 5) == assign_shards(10, 0, 1, 0, 5)
    with pytest.raises(DataError, match="2 shard.*3 ranks"):
        assign_shards(2, 0, 3, 0, 0)


# --- packing --------------------------------------------------------------------------------


def test_pretrain_packing_splits_samples_and_loses_nothing(pretrain):
    data_dir, samples = pretrain
    s = stream(data_dir)
    assert s.split_samples
    windows = list(s.epoch_windows(0))
    where = positions_of(samples)
    pieces = [p for w in windows for p in check_window(w, where, samples, split=True)]
    assert any(j > 0 for _, j, _ in pieces), "some sample continues into the next window"
    # every label of every sample exactly once (total tokens is a multiple of SEQ here)
    assert Counter(int(x) for w in windows for x in w["labels"]) == Counter(
        int(x) for smp in samples for x in smp.labels
    )
    assert Counter(int(x) for w in windows for x in w["tokens"]) == Counter(
        int(x) for smp in samples for x in smp.input_ids
    )
    # the stream yields those windows in order, cut to whole batches; the rest is counted
    bpe = s.batches_per_epoch
    assert bpe == len(windows) // BATCH
    assert same(rows(take(s, bpe)), windows[: bpe * BATCH])
    assert s.stats["tail_windows_not_used"] == len(windows) - bpe * BATCH
    assert s.stats["tail_tokens_not_used"] == 0 and s.stats["padding_windows"] == 0


def test_sft_packing_pads_whole_samples_and_drops_overlong(sft):
    data_dir, samples = sft
    with pytest.warns(UserWarning, match="2 of 112 samples are longer than seq_len=32"):
        s = PackedStream(data_dir, seq_len=SEQ, batch_size=BATCH, shuffle_buffer=8)
    assert not s.split_samples
    windows = list(s.epoch_windows(0))
    assert len(windows) == s.plan(0).windows[0]
    where = positions_of(samples)
    pieces = [p for w in windows for p in check_window(w, where, samples, split=False)]
    short = [i for i, smp in enumerate(samples) if len(smp) <= SEQ]
    assert sorted(i for i, _, _ in pieces) == short, "every packable sample exactly once"
    assert any((w["tokens"] == 0).any() for w in windows), "windows end in padding"
    bpe = s.batches_per_epoch
    assert same(rows(take(s, bpe)), windows[: bpe * BATCH])
    assert s.report.dropped["longer_than_seq_len"] == 2
    assert all(ex.startswith("shard-") for ex in s.report.examples["longer_than_seq_len"])


# --- ranks and equal counts -------------------------------------------------------------------


ALL_EPOCHS = (0, 1, 2)


@pytest.mark.parametrize(
    "name, world_size, dealt_epochs",
    [
        ("pretrain", 3, ()),
        ("sft", 3, ()),
        # fewer shards than ranks (issue 17): the ranks share the packed windows of all shards
        ("pretrain_1_shard", 2, ALL_EPOCHS),
        ("pretrain_1_shard", 3, ALL_EPOCHS),
        ("sft_1_shard", 2, ALL_EPOCHS),
        ("sft_1_shard", 3, ALL_EPOCHS),
        ("one_document", 2, ALL_EPOCHS),
        ("one_document", 3, ALL_EPOCHS),
        ("pretrain_4_shards", 8, ALL_EPOCHS),
        # whole shards would give fewer than half the batches of dealing: 0 of 7, 1 of 4
        ("uneven_2_shards", 2, ALL_EPOCHS),
        ("long_beside_130", 2, ALL_EPOCHS),
        # as many batches either way until epoch 2's order gives one rank only the short shard
        ("two_long_one_short", 2, (2,)),
    ],
)
def test_ranks_cover_every_sample_once_and_agree_on_the_count(
    name, world_size, dealt_epochs, pretrain, sft, few_shards
):
    data_dir, samples = dataset(name, pretrain, sft, few_shards)
    mode = load_manifest(data_dir)["kind"]
    n_shards = len(load_manifest(data_dir)["shards"])
    where = positions_of(samples)
    ranks = [stream(data_dir, rank=r, world_size=world_size, seed=11) for r in range(world_size)]
    for epoch in ALL_EPOCHS:
        plan = ranks[0].plan(epoch)
        assert {r.batches_per_epoch for r in ranks} == {plan.batches_per_epoch} and plan.batches_per_epoch > 0
        assert {r.deal_windows for r in ranks} == {epoch in dealt_epochs}
        # that is the rule (module docstring), applied to the exact plans of both ways
        dealt = ranks[0]._plan(epoch, dealt=True).batches_per_epoch
        whole = ranks[0]._plan(epoch, dealt=False).batches_per_epoch if n_shards >= world_size else -1
        assert plan.dealt == (epoch in dealt_epochs) == (2 * whole < dealt)
        seen, tail_tokens = Counter(), 0
        for r, s in enumerate(ranks):
            windows = list(s.epoch_windows(epoch))
            assert len(windows) == plan.windows[r], "the planner replays the packing exactly"
            for w in windows:
                for i, j, n in check_window(w, where, samples, split=mode == "pretrain"):
                    seen.update((i, k) for k in range(j, j + n))
            # what the rank yields is the head of its windows; the tail is counted
            before = s.stats["tail_windows_not_used"]
            assert same(rows(take(s, plan.batches_per_epoch)), windows[: plan.batches_per_epoch * BATCH])
            assert s.epoch == epoch + 1
            assert s.stats["tail_windows_not_used"] - before == len(windows) - plan.batches_per_epoch * BATCH
            tail_tokens += plan.tail_tokens[r]
        assert max(seen.values()) == 1, "no token twice in an epoch"
        packable = [
            (i, k) for i, smp in enumerate(samples) if mode == "pretrain" or len(smp) <= SEQ for k in range(len(smp))
        ]
        # only each rank's last partial window (pretraining) is not in a window
        assert len(packable) - len(seen) == tail_tokens and set(seen) <= set(packable)
        if mode == "sft":
            assert tail_tokens == 0


def test_too_little_data_for_a_batch(pretrain, tmp_path):
    data_dir, _ = pretrain
    with pytest.raises(DataError, match="fewer than one batch of 100000") as e:
        stream(data_dir, batch_size=100_000)
    assert str(e.value).endswith("use more data, a smaller train.micro_batch or a shorter data.seq_len")
    # the message names what to change by its flag or config key, the rank count for each launcher
    with pytest.raises(DataError, match="rank . of 2 gets .*fewer than one batch of 100000") as e:
        stream(data_dir, batch_size=100_000, world_size=2)
    for key in ("ray.num_workers", "--nproc-per-node", "--num_gpus", "train.micro_batch", "data.seq_len"):
        assert key in str(e.value)
    # smaller shards would not help: windows are dealt wherever that gives more batches
    assert "--shard-mb" not in str(e.value)
    with pytest.raises(DataError, match="rank 7 of 8 gets 3 window.*fewer than one batch of 4") as e:
        stream(write_dataset(tmp_path, make_samples(1, min_len=1000, max_len=1000)), world_size=8)
    assert "--shard-mb" not in str(e.value)


def test_no_manifest_or_no_shards(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        stream(tmp_path)
    write_dataset(tmp_path / "none", [])
    with pytest.raises(DataError, match="lists no shards"):
        stream(tmp_path / "none")


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_resume_gives_exactly_the_uninterrupted_batches(mode, pretrain, sft):
    data_dir, _ = pretrain if mode == "pretrain" else sft
    kw = dict(rank=1, world_size=2, seed=3)
    reference = stream(data_dir, **kw)
    bpe = reference.batches_per_epoch
    total = 2 * bpe + 3  # reaches into the third epoch
    expected = take(reference, total)
    states = []
    for k in (1, 2, 5, bpe - 1, bpe, bpe + 1, 2 * bpe + 1):
        first = stream(data_dir, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # plain values only
        states.append(state)
        resumed = stream(data_dir, **kw)
        resumed.load_state_dict(state)
        assert same(rows(take(resumed, total - k)), rows(expected[k:])), f"resumed after {k} batches"
        assert resumed.stats == reference.stats
    # the cases above include mid-shard, a non-empty buffer and a sample carried to the next window
    assert any(st["sample_offset"] > 0 for st in states)
    assert any(st["buffer"] for st in states) and any(st["carry"] for st in states)


@pytest.mark.parametrize(
    "name, world_size", [("pretrain_1_shard", 3), ("sft_1_shard", 2), ("one_document", 2), ("pretrain_4_shards", 8)]
)
def test_resume_with_dealt_windows_gives_exactly_the_uninterrupted_batches(name, world_size, few_shards):
    data_dir, _ = few_shards[name]
    kw = dict(rank=1, world_size=world_size, seed=3)
    reference = stream(data_dir, **kw)
    assert reference.deal_windows
    bpe = reference.batches_per_epoch
    total = 2 * bpe + 2  # reaches into the third epoch
    expected = take(reference, total)
    states = []
    for k in sorted({1, 2, bpe - 1, bpe, bpe + 1, 2 * bpe + 1} - {0}):
        first = stream(data_dir, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        states.append(state)
        resumed = stream(data_dir, **kw)
        resumed.load_state_dict(state)
        assert same(rows(take(resumed, total - k)), rows(expected[k:])), f"resumed after {k} batches"
        assert resumed.stats == reference.stats
    # the cases above include a sample carried into the next window and windows other ranks took
    assert any(st["carry"] for st in states)
    assert all(st["windows_built"] > BATCH for st in states if st["batches_in_epoch"] > 0)


def test_an_epoch_whose_order_starves_a_rank_is_dealt(few_shards):
    # seed 1: epoch 3's order gives one rank both 1000-token shards, the other only the 10-token one
    data_dir, _ = few_shards["two_long_one_short"]
    ranks = [stream(data_dir, rank=r, world_size=2, seed=1) for r in range(2)]
    modes = []
    for epoch in range(6):
        assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch > 0
        assert ranks[0].deal_windows == ranks[1].deal_windows
        modes.append(ranks[0].deal_windows)
        used = Counter(int(t) for s in ranks for b in take(s, s.batches_per_epoch) for t in b["tokens"].ravel())
        assert max(used.values()) == 1, f"no token twice in epoch {epoch}"
        assert all(s.epoch == epoch + 1 for s in ranks)
    assert modes == [False, False, False, True, False, False]


def test_resume_across_a_change_between_whole_shards_and_dealt_windows(few_shards):
    data_dir, _ = few_shards["two_long_one_short"]
    kw = dict(rank=1, world_size=2, seed=1)  # epoch 3 is dealt, the others whole shards
    reference = stream(data_dir, **kw)
    bpe = reference.batches_per_epoch
    assert [reference.plan(e).batches_per_epoch for e in range(5)] == [bpe] * 5
    total = 5 * bpe
    expected = take(reference, total)
    # mid epoch 2, the start and middle of the dealt epoch 3, the start and middle of epoch 4
    for k in (2 * bpe + 3, 3 * bpe, 3 * bpe + 3, 4 * bpe, 4 * bpe + 2):
        first = stream(data_dir, **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        assert first.deal_windows == (state["epoch"] == 3)
        resumed = stream(data_dir, **kw)
        resumed.load_state_dict(state)
        assert resumed.deal_windows == first.deal_windows
        assert same(rows(take(resumed, total - k)), rows(expected[k:])), f"resumed after {k} batches"
        assert resumed.stats == reference.stats


def test_resume_while_draining_a_buffer_larger_than_the_data(sft):
    data_dir, _ = sft
    expected = take(stream(data_dir, shuffle_buffer=10_000), 8)
    first = stream(data_dir, shuffle_buffer=10_000)
    take(first, 3)
    state = first.state_dict()
    assert state["draining"] and len(state["buffer"]) > 50
    resumed = stream(data_dir, shuffle_buffer=10_000)
    resumed.load_state_dict(state)
    assert same(rows(take(resumed, 5)), rows(expected[3:]))


def test_resume_keeps_the_counters(pretrain):
    data_dir, _ = pretrain
    a = stream(data_dir)
    take(a, a.batches_per_epoch + 2)
    b = stream(data_dir)
    b.load_state_dict(a.state_dict())
    take(a, 3)
    take(b, 3)
    assert a.stats == b.stats and a.epoch == b.epoch == 1


def test_resume_refuses_another_layout_or_data(pretrain, sft, tmp_path):
    data_dir, samples = pretrain
    s = stream(data_dir, rank=0, world_size=2)
    take(s, 3)
    state = s.state_dict()
    for other, match in [
        (dict(rank=0, world_size=3), "world_size=2"),
        (dict(rank=1, world_size=2), "rank=0"),
        (dict(rank=0, world_size=2, seq_len=16), "seq_len=32"),
        (dict(rank=0, world_size=2, batch_size=2), "batch_size=4"),
        (dict(rank=0, world_size=2, seed=9), "seed=0"),
    ]:
        with pytest.raises(DataError, match=match):
            stream(data_dir, **other).load_state_dict(state)
    changed = write_dataset(tmp_path / "other", samples[:-3])
    with pytest.raises(DataError, match="fingerprint"):
        stream(changed, rank=0, world_size=2).load_state_dict(state)


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_same_seed_same_batches_other_seed_other_batches(mode, pretrain, sft):
    data_dir, _ = pretrain if mode == "pretrain" else sft
    a, b, c = (rows(take(stream(data_dir, seed=seed), 6)) for seed in (4, 4, 5))
    assert same(a, b) and not same(a, c)
    s = stream(data_dir, seed=4)
    epoch0 = rows(take(s, s.batches_per_epoch))
    epoch1 = rows(take(s, s.batches_per_epoch))
    assert not same(epoch0[:8], epoch1[:8]), "each epoch is shuffled afresh"


def test_epochs_limit(pretrain):
    data_dir, _ = pretrain
    s = stream(data_dir, epochs=1)
    assert len(list(s)) == s.plan(0).batches_per_epoch
    assert s.epoch == 1


# --- corrupt shards -------------------------------------------------------------------------


def _damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    path = dst / load_manifest(dst)["shards"][2]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 32] = b"\xee" * 32
    path.write_bytes(bytes(data))
    return path


def test_corrupt_shard_skip_is_counted_and_keeps_the_count(pretrain, tmp_path):
    data_dir, _ = pretrain
    bad = _damaged_copy(data_dir, tmp_path / "data")
    s = stream(tmp_path / "data", epochs=2)
    with pytest.warns(UserWarning) as caught:
        batches = list(s)
    messages = [str(w.message) for w in caught]
    assert any(bad.name in m and "checksum mismatch" in m for m in messages)
    assert any("filling with padding windows" in m for m in messages)
    assert len(batches) == s.plan(0).batches_per_epoch + s.plan(1).batches_per_epoch  # no hang, no early stop
    assert s.report.dropped["corrupt_shard"] == 2  # once per epoch
    assert s.stats["samples_lost_to_corrupt_shards"] == 2 * load_manifest(data_dir)["shards"][2]["samples"]
    assert s.stats["padding_windows"] > 0
    pad = [r for r in rows(batches) if (r["labels"] == IGNORE_INDEX).all() and (r["tokens"] == 0).all()]
    assert len(pad) == s.stats["padding_windows"]


def test_corrupt_shard_raise_names_it(pretrain, tmp_path):
    data_dir, _ = pretrain
    bad = _damaged_copy(data_dir, tmp_path / "data")
    s = stream(tmp_path / "data", on_error="raise")
    with pytest.raises(DataError, match=f"{bad}: checksum mismatch"):
        take(s, s.batches_per_epoch)


# --- token ids outside the vocabulary -------------------------------------------------------


def _raw_int32(sample: Sample) -> dict[str, bytes]:
    """encode_sample without its checks, as another writer (or another tokenizer's ids) would store."""
    out = {}
    for member, arr in (("input_ids.npy", sample.input_ids), ("labels.npy", sample.labels)):
        buf = io.BytesIO()
        np.save(buf, np.asarray(arr, np.int32))
        out[member] = buf.getvalue()
    return out


@pytest.mark.parametrize("field, bad", [("input_ids", "vocab"), ("input_ids", -1), ("labels", "vocab")])
def test_ids_outside_the_vocabulary_are_a_data_error(field, bad, tmp_path, monkeypatch):
    samples = make_samples(40, seed=5)
    vocab = max(int(smp.input_ids.max()) for smp in samples) + 1
    bad = vocab if bad == "vocab" else bad
    getattr(samples[7], field)[3] = bad
    monkeypatch.setattr(shards_mod, "encode_sample", _raw_int32)
    data_dir = write_dataset(tmp_path / "data", samples, target_bytes=10**9)
    path = data_dir / load_manifest(data_dir)["shards"][0]["path"]
    n = len(rows(take(stream(data_dir), 2)))  # unchecked without vocab_size (as before)

    s = stream(data_dir, vocab_size=vocab, on_error="raise")
    with pytest.raises(DataError) as e:
        take(s, s.batches_per_epoch)
    assert str(e.value) == (
        f"shard {path}: sample 7 holds {field} id {bad}, outside the vocabulary 0..{vocab - 1}: the shards were "
        "made with another tokenizer; re-run launch/prepare_data.py with this run's tokenizer"
    )
    # skip: counted as a corrupt shard, the rank pads its planned windows rather than hang the others
    s = stream(data_dir, vocab_size=vocab, epochs=1)
    with pytest.warns(UserWarning) as caught:
        batches = list(s)
    messages = [str(w.message) for w in caught]
    assert any(f"sample 7 holds {field} id {bad}" in m and "skipping the rest of this shard" in m for m in messages)
    assert any("filling with padding windows" in m for m in messages)
    assert len(batches) == s.plan(0).batches_per_epoch and n == 2 * BATCH
    assert s.report.dropped["corrupt_shard"] == 1 and s.stats["samples_lost_to_corrupt_shards"] == 40 - 7
    # what was trained: the 7 samples before the bad one, each token once, but the last partial window
    used = Counter(int(t) for b in batches for t in b["tokens"].ravel() if t)
    first7 = {int(t) for smp in samples[:7] for t in smp.input_ids}
    assert set(used) <= first7 and max(used.values()) == 1 and len(used) == len(first7) // SEQ * SEQ


def test_ids_inside_the_vocabulary_pass(pretrain):
    data_dir, samples = pretrain
    vocab = max(int(smp.input_ids.max()) for smp in samples) + 1
    s = stream(data_dir, vocab_size=vocab, on_error="raise", epochs=1)
    assert len(list(s)) == s.plan(0).batches_per_epoch
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        stream(data_dir, vocab_size=0)
