"""The training side of the data: each rank streams its own shards, shuffles and packs them.

    manifest.json ─► assign_shards (per epoch, seeded) ─► read_shard (sha256, token ids checked)
        ─► shuffle buffer ─► pack into seq_len windows ─► [dealt epochs: every world_size-th
           window] ─► batches of
           {tokens, labels, position_ids, doc_ids}, each int64 (batch_size, seq_len)

Randomness. Every draw is derived from (seed, epoch, walk, shard position), never from a running
generator: the shard order of an epoch from (seed, epoch); the shuffle buffer's choices for the
samples of the k-th shard a walk reads from (seed, epoch, walk, k), where the walk is the rank
(or 0 for all ranks when windows are dealt, below). The shuffle therefore depends only on how
many samples each shard holds, not on their contents, which lets every rank replay the packing
of every other rank from the manifest's sample lengths, and it keeps the resume state to plain
integers.

Whole shards or dealt windows, chosen per epoch. Whole shards: shard i of the epoch's order goes
to rank i % world_size, which reads only its own. Dealt windows: every rank reads all shards in
the epoch's order with the same draws, packs the same global windows, and keeps window i when
i % world_size == rank. An epoch is dealt when there are fewer shards than ranks (one 3 MB shard
on eight ranks, a corpus that is one long document), or when whole shards would give fewer than
half the batches that dealing gives, zero included (a long document's shard beside a short one,
or an epoch whose reshuffled order hands the large shards to some ranks and little to another).
Otherwise whole shards, even where they give a few batches fewer: dealing makes every rank read
every shard, world_size times the reading, which is fine for data this small but not at scale
(10,000 balanced shards on 512 ranks: whole shards give ~0.97 of dealing's batches). The choice
depends on the manifest and the layout alone, so every rank makes the same one and a resume makes
it again; it can differ from one epoch to the next. Building a window a rank skips is cheap next
to a training step. In a dealt epoch every rank counts every dropped sample and corrupt shard in
its own `report` and `stats`.

Equal batch count. A rank that runs out of data early would leave the others waiting forever at
the next collective, so every rank yields the same number of batches in an epoch. At the start of
an epoch each rank computes, for every rank, how many full windows it gets: pretraining (samples
split across windows) gets tokens // seq_len; SFT (whole samples, padded windows) gets the count
from replaying the same shuffle and packing on the lengths. Whole shards: that count over the
rank's shards. Dealt windows: the count G over all shards, of which rank r gets the i < G with
i % world_size == r. `batches_per_epoch` is the minimum over ranks of windows // batch_size; the
windows a rank has beyond that are not used and are counted in `stats` ("tail_windows_not_used"
for this rank, "..._all_ranks" for all; the last partial pretraining window's tokens go to the
rank that would have had it). The count can differ by a little from one epoch to the next
because the shard order is reshuffled. If a corrupt shard is skipped (on_error="skip") and a rank
runs short, it fills its remaining windows with padding (labels all IGNORE_INDEX, so they add
nothing to the loss) rather than hang the others; these are counted in stats["padding_windows"].

Resume. `state_dict()` after any batch holds the epoch, the shard cursor, the sample offset in
the current shard, the shuffle buffer as (shard, sample) references, the sample carried into the
next window as (shard, sample, token offset), the windows built so far in the epoch (all ranks'
when dealing) and the counters; `load_state_dict()` on a fresh stream built with the same
arguments re-reads the referenced samples and continues with exactly the batches the
uninterrupted stream would have given.

One stream per rank, in the training process: packing is cheap numpy work, and the loop reads
the next batches on a thread while the step runs (training/prefetch.py), so there are no loader
worker processes whose states a resume would have to gather.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.records import DataError, DropReport, Sample
from data_pipeline.shards import load_manifest, read_shard
from model.loss import IGNORE_INDEX

STATE_VERSION = 1
# Tags that keep the seeded draws for different purposes independent.
_SHARD_ORDER, _SAMPLE_SHUFFLE, _DRAIN = 0, 1, 2
_STATS = (
    "tail_windows_not_used",
    "tail_windows_not_used_all_ranks",
    "tail_tokens_not_used",
    "padding_windows",
    "samples_lost_to_corrupt_shards",
)
# Arguments that must match for a saved state to mean the same batches.
_LAYOUT = ("fingerprint", "rank", "world_size", "seq_len", "batch_size", "seed", "shuffle_buffer", "split_samples")


def assign_shards(n_shards: int, rank: int, world_size: int, epoch: int, seed: int) -> list[int]:
    """The shards one rank reads in one epoch, in reading order.

    The shard order is shuffled with (seed, epoch); the shard at position i goes to rank
    i % world_size. Every shard goes to exactly one rank each epoch.

    Args:
        n_shards: shards in the manifest.
        rank, world_size: this data-parallel rank and the number of them.
        epoch: the epoch (0-based).
        seed: the run's data seed.
    Returns:
        Indices into the manifest's shard list.
    Raises:
        DataError: fewer shards than ranks (PackedStream deals windows then, see the module docstring).
    """
    if n_shards < world_size:
        raise DataError(f"{n_shards} shard(s) for {world_size} ranks: whole-shard assignment needs one per rank")
    order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(n_shards)
    return [int(i) for i in order[rank::world_size]]


def manifest_fingerprint(manifest: dict) -> str:
    """sha256 over the manifest's kind and each shard's (path, sha256, samples): a saved stream
    state only makes sense for the data set it was saved on."""
    shards = [(s["path"], s["sha256"], s["samples"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps([manifest["kind"], shards]).encode()).hexdigest()


# --- the seeded shuffle buffer, shared by the real stream and the planner ------------------


def _uniforms(seed: int, epoch: int, walk: int, cursor: int, n: int) -> np.ndarray:
    """The buffer's draws for the n samples of the cursor-th shard a walk reads."""
    return np.random.default_rng([seed, epoch, _SAMPLE_SHUFFLE, walk, cursor]).random(n)


def _push(buffer: list, item, u: float, size: int):
    """Put item into the buffer; once it is full, return a uniformly chosen item in exchange."""
    if size <= 1:
        return item
    if len(buffer) < size:
        buffer.append(item)
        return None
    j = int(u * size)
    out, buffer[j] = buffer[j], item
    return out


def _drain_order(buffer: list, seed: int, epoch: int, walk: int) -> list:
    """The buffer's leftovers at the end of the epoch, in random order, reversed for pop()."""
    perm = np.random.default_rng([seed, epoch, _DRAIN, walk]).permutation(len(buffer))
    return [buffer[i] for i in perm[::-1]]


def _shuffled(items_by_shard: list[list], size: int, seed: int, epoch: int, walk: int) -> Iterator:
    """What the stream's buffer does to samples, applied to anything (here: their lengths)."""
    buffer: list = []
    for cursor, items in enumerate(items_by_shard):
        for item, u in zip(items, _uniforms(seed, epoch, walk, cursor, len(items)), strict=True):
            out = _push(buffer, item, u, size)
            if out is not None:
                yield out
    buffer = _drain_order(buffer, seed, epoch, walk)
    while buffer:
        yield buffer.pop()


def _count_sft_windows(lengths: Iterable[int], seq_len: int) -> int:
    """Windows that padding-free packing of whole samples makes, mirroring _EpochReader."""
    windows = fill = 0
    for length in lengths:
        if length > seq_len:
            continue
        if length > seq_len - fill:
            windows, fill = windows + 1, 0
        fill += length
        if fill == seq_len:
            windows, fill = windows + 1, 0
    return windows + (fill > 0)


@dataclass
class EpochPlan:
    """What every rank's shards give in one epoch, and the batch count they agree on."""

    epoch: int
    dealt: bool
    """Every rank reads all shards and keeps every world_size-th window; False: whole shards."""
    windows: list[int]
    """Full windows per rank (before the cut)."""
    batches_per_epoch: int
    tail_windows: list[int]
    """Windows per rank beyond batches_per_epoch × batch_size, not used."""
    tail_tokens: list[int]
    """Tokens per rank left in the last, partial window (pretraining only), not used."""


# --- one rank's walk through one epoch -----------------------------------------------------


class _EpochReader:
    """Shards in order → shuffle buffer → packed windows, for one rank and one epoch.

    Windows are built whole within one `_build` call, so between calls the only partial state is
    `pending`: the sample (or the remainder of one) that goes first into the next window.
    """

    def __init__(self, stream: PackedStream, epoch: int, report: DropReport, stats: dict):
        self.s, self.epoch, self.report, self.stats = stream, epoch, report, stats
        self.shard_ids, self.walk = stream.reading_order(epoch, stream.rank)
        # this rank keeps built window i when i % stride == phase (all of them for whole shards)
        self.stride, self.phase = (stream.world_size, stream.rank) if stream.plan(epoch).dealt else (1, 0)
        self.built = 0  # windows built this epoch, kept or not
        self.cursor = 0  # position in shard_ids of the shard being read
        self.offset = 0  # samples of that shard already taken into the buffer
        self.buffer: list[tuple[tuple[int, int], Sample]] = []
        self.draining = False
        self.pending: tuple[tuple[int, int], Sample, int] | None = None
        self._it: Iterator[Sample] | None = None
        self._u: np.ndarray | None = None

    def _read(self):
        """The next sample in shard order, with its reference and its buffer draw."""
        s = self.s
        while self.cursor < len(self.shard_ids):
            sid = self.shard_ids[self.cursor]
            if self._it is None:
                self._u = _uniforms(s.seed, self.epoch, self.walk, self.cursor, s.shards[sid]["samples"])
                self._it = s._shard_samples(sid, self.offset, self.report, self.stats)
            sample = next(self._it, None)
            if sample is None:
                self._it, self.cursor, self.offset = None, self.cursor + 1, 0
                continue
            ref, u = (sid, self.offset), self._u[self.offset]
            self.offset += 1
            return ref, sample, u
        return None

    def _pull(self) -> tuple[tuple[int, int], Sample] | None:
        """The next sample out of the shuffle buffer; None at the end of the epoch's data."""
        while True:
            if self.draining:
                return self.buffer.pop() if self.buffer else None
            got = self._read()
            if got is None:
                self.buffer = _drain_order(self.buffer, self.s.seed, self.epoch, self.walk)
                self.draining = True
                continue
            ref, sample, u = got
            out = _push(self.buffer, (ref, sample), u, self.s.shuffle_buffer)
            if out is not None:
                return out

    def next_window(self) -> dict[str, np.ndarray] | None:
        """This rank's next packed window of seq_len, or None when the epoch's data is used up."""
        while (window := self._build()) is not None:
            index, self.built = self.built, self.built + 1
            if index % self.stride == self.phase:
                return window
        return None

    def _build(self) -> dict[str, np.ndarray] | None:
        """The next window in packing order (any rank's), or None when the data is used up."""
        T, split = self.s.seq_len, self.s.split_samples
        window = self.s.empty_window()
        tokens, labels, pos, doc = (window[k] for k in ("tokens", "labels", "position_ids", "doc_ids"))
        fill = doc_id = 0
        exhausted = False
        while fill < T:
            if self.pending is None:
                item = self._pull()
                if item is None:
                    exhausted = True
                    break
                ref, sample = item
                if not split and len(sample) > T:
                    self._drop_long(ref, len(sample))
                    continue
                self.pending = (ref, sample, 0)
            ref, sample, start = self.pending
            take = min(len(sample) - start, T - fill)
            if take < len(sample) - start and not split:
                break  # SFT: the sample does not fit, so it opens the next window
            end = start + take
            tokens[fill : fill + take] = sample.input_ids[start:end]
            labels[fill : fill + take] = sample.labels[start:end]
            if "ref_logps" in window:
                window["ref_logps"][fill : fill + take] = self.s.reference_of(sample, ref)[start:end]
            if sample.segments is None and self.s.manifest["kind"] == "preference":
                path = self.s.data_dir / self.s.shards[ref[0]]["path"]
                raise DataError(f"shard {path}: sample {ref[1]} of a preference set is not a pair (no segments)")
            if sample.segments is None:  # one document (a split one's rest starts at 0 again)
                pos[fill : fill + take] = np.arange(take)
                doc[fill : fill + take] = doc_id
                doc_id += 1
            else:  # a preference pair, whole: each of its sequences is a document
                if self.s.manifest["kind"] == "preference" and len(sample.segments) != 2:
                    path = self.s.data_dir / self.s.shards[ref[0]]["path"]
                    raise DataError(f"shard {path}: sample {ref[1]} holds {len(sample.segments)} sequences, not a pair")
                pos[fill : fill + take], sequence = sequence_layout(sample.segments)
                doc[fill : fill + take] = doc_id + sequence
                doc_id += len(sample.segments)
            fill += take
            self.pending = None if end == len(sample) else (ref, sample, end)
        if fill == 0 or (exhausted and split):
            return None  # pretraining's last partial window is dropped (planned: tail_tokens)
        pos[fill:] = np.arange(T - fill)  # padding: its own document, targets ignored
        doc[fill:] = doc_id
        return window

    def _drop_long(self, ref: tuple[int, int], length: int) -> None:
        path = self.s.shards[ref[0]]["path"]
        self.report.drop("longer_than_seq_len", f"{path}#{ref[1]} ({length} tokens)")

    def state(self) -> dict:
        pending = None if self.pending is None else [*self.pending[0], self.pending[2]]
        return {
            "shard_cursor": self.cursor,
            "sample_offset": self.offset,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "draining": self.draining,
            "carry": pending,
            "windows_built": self.built,
        }

    def restore(self, state: dict) -> None:
        """Put the reader back where `state()` was taken, re-reading the referenced samples."""
        self.cursor, self.offset = int(state["shard_cursor"]), int(state["sample_offset"])
        self.draining = bool(state["draining"])
        # only dealt windows read it, and states saved with whole shards may lack it
        self.built = int(state.get("windows_built", 0))
        if not 0 <= self.cursor <= len(self.shard_ids):
            raise DataError(f"stream state: shard cursor {self.cursor} is outside this epoch's shards")
        refs = [(int(sid), int(idx)) for sid, idx in state["buffer"]]
        carry = None if state["carry"] is None else (int(state["carry"][0]), int(state["carry"][1]))
        got = self.s._fetch(refs + ([carry] if carry else []), self.report, self.stats)
        # a referenced sample is missing only if its shard went bad since; that was counted
        self.buffer = [(ref, got[ref]) for ref in refs if ref in got]
        if carry in got:
            self.pending = (carry, got[carry], int(state["carry"][2]))

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


# --- the stream ----------------------------------------------------------------------------


class PackedStream:
    """One rank's endless (or `epochs`-long) iterator of packed batches. See the module docstring.

    Iterate it directly (`for batch in stream`); each batch is a dict of int64 numpy arrays
    `tokens`, `labels`, `position_ids`, `doc_ids`, each (batch_size, seq_len). Positions restart
    at 0 and doc ids count up (0, 1, 2, ...) at each sample within a row.

    Over-long samples: with split_samples=True (pretraining) a sample longer than the room left
    in a window is split and its remainder starts the next window as a new document. With
    split_samples=False (SFT) a sample that does not fit closes the window (the tail is padding:
    pad_id tokens, IGNORE_INDEX labels, its own doc id) and starts the next one; a sample longer
    than seq_len cannot be packed and is dropped, counted in `report` as "longer_than_seq_len"
    (prepare SFT data with max_len <= seq_len; a warning says how many there are).

    Args:
        data_dir: a folder written by launch/prepare_data.py (shards + manifest.json).
        seq_len: tokens per window (row).
        batch_size: windows per batch (the micro-batch of one rank).
        rank, world_size: this data-parallel rank and the number of them.
        seed: data seed for the shard order and the sample shuffle.
        shuffle_buffer: samples held for shuffling (<= 1: no sample shuffle).
        split_samples: see above; default True for kind "pretrain", False for "sft".
        on_error: "skip" a corrupt shard (counted in `report`, warned) or "raise" a DataError.
        tokenizer_sha256: when given, must match the tokenizer the shards were made with.
        epochs: stop after this many epochs; None streams forever.
        pad_id: token id of SFT padding (its labels are IGNORE_INDEX either way).
        vocab_size: when given, every sample read is checked to hold ids in 0..vocab_size-1
            (input ids and labels other than IGNORE_INDEX); one that does not is a DataError
            naming the shard and sample, under on_error like any damaged shard.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        split_samples: bool | None = None,
        on_error: str = "skip",
        tokenizer_sha256: str | None = None,
        epochs: int | None = None,
        pad_id: int = 0,
        vocab_size: int | None = None,
    ):
        _check_args(seq_len, batch_size, rank, world_size, seed, on_error, epochs)
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive or None, got {vocab_size}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir, tokenizer_sha256=tokenizer_sha256)
        self.shards: list[dict] = self.manifest["shards"]
        if not self.shards:
            raise DataError(f"{self.data_dir / 'manifest.json'}: the manifest lists no shards (no data was kept)")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.on_error = max(int(shuffle_buffer), 0), on_error
        self.epochs, self.pad_id, self.vocab_size = epochs, pad_id, vocab_size
        self.split_samples = self.manifest["kind"] == "pretrain" if split_samples is None else bool(split_samples)
        if self.split_samples and self.manifest["kind"] == "preference":
            raise DataError(f"{self.data_dir}: a preference set's pairs cannot be split across windows")
        self.with_reference = bool(self.manifest["extra"].get("reference"))
        """Whether batches carry `ref_logps`: a preference set with its reference computed."""
        if not self.split_samples:
            self._check_lengths()
        self.fingerprint = manifest_fingerprint(self.manifest)
        self.report = DropReport()
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self._plans: dict[int, EpochPlan] = {}
        self._dealt_batches_at_most = self._bound_dealt_batches()
        self._epoch, self._batches = 0, 0
        self._reader = _EpochReader(self, 0, self.report, self.stats)
        self._begin_epoch()

    # -- planning --

    def _check_lengths(self) -> None:
        if any("lengths" not in s for s in self.shards):
            raise DataError(
                f"{self.data_dir / 'manifest.json'}: shard entries lack 'lengths', which packing whole "
                "samples needs to plan equal batch counts: re-run launch/prepare_data.py"
            )
        n_long = sum(int(np.sum(np.asarray(s["lengths"]) > self.seq_len)) for s in self.shards)
        if n_long:
            # --max-len bounds each sequence; a preference pair holds two
            max_len = self.seq_len // 2 if self.manifest["kind"] == "preference" else self.seq_len
            warnings.warn(
                f"{self.data_dir}: {n_long} of {self.manifest.get('samples', '?')} samples are longer than "
                f"seq_len={self.seq_len} and will be dropped (counted as longer_than_seq_len): prepare the "
                f"data with launch/prepare_data.py --max-len {max_len} or raise data.seq_len",
                stacklevel=3,
            )

    def plan(self, epoch: int) -> EpochPlan:
        """Whole shards or dealt windows, windows per rank and the agreed batch count for an epoch.

        From the manifest and the layout alone, so every rank (and a resume) gets the same plan.
        Dealt where there are fewer shards than ranks or whole shards give fewer than half the
        batches that dealing gives (module docstring).

        Args:
            epoch: the epoch (0-based).
        Returns:
            The EpochPlan (cached for recent epochs).
        """
        if epoch in self._plans:
            return self._plans[epoch]
        whole = self._plan(epoch, dealt=False) if len(self.shards) >= self.world_size else None
        # the bound settles most epochs without replaying the shuffle of all shards once more
        if whole is not None and (self.world_size == 1 or 2 * whole.batches_per_epoch >= self._dealt_batches_at_most):
            plan = whole
        else:
            dealt = self._plan(epoch, dealt=True)
            plan = dealt if whole is None or 2 * whole.batches_per_epoch < dealt.batches_per_epoch else whole
        self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1} | {epoch: plan}
        return plan

    def _plan(self, epoch: int, dealt: bool) -> EpochPlan:
        """The plan of an epoch read one way (whole shards needs at least one per rank)."""
        W = self.world_size
        if dealt:
            built, tail = self._count_windows(*self._reading_order(epoch, 0, dealt), epoch)
            windows = [len(range(r, built, W)) for r in range(W)]
            tail_tokens = [tail if r == built % W else 0 for r in range(W)]  # whose next window it was
        else:
            counts = [self._count_windows(*self._reading_order(epoch, r, dealt), epoch) for r in range(W)]
            windows, tail_tokens = [w for w, _ in counts], [t for _, t in counts]
        bpe = min(windows) // self.batch_size
        return EpochPlan(epoch, dealt, windows, bpe, [w - bpe * self.batch_size for w in windows], tail_tokens)

    def _bound_dealt_batches(self) -> int:
        """An upper bound on the batches per epoch that dealing gives, in any epoch, without the replay."""
        if self.split_samples:
            windows = sum(s["tokens"] for s in self.shards) // self.seq_len  # exact
        else:
            lengths = np.concatenate([np.asarray(s["lengths"], np.int64) for s in self.shards])
            packable = lengths[(lengths > 0) & (lengths <= self.seq_len)]
            # two neighbouring windows hold more than seq_len tokens (the second's first sample did
            # not fit into the first), so G windows hold at least (G // 2) * (seq_len + 1) tokens
            windows = min(len(packable), 2 * (int(packable.sum()) // (self.seq_len + 1)) + 1)
        return windows // self.world_size // self.batch_size

    @property
    def deal_windows(self) -> bool:
        """Whether the current epoch deals windows (else each rank reads whole shards)."""
        return self.plan(self._epoch).dealt

    def reading_order(self, epoch: int, rank: int) -> tuple[list[int], int]:
        """The shards a rank reads in an epoch, in order, and the walk its shuffle draws use.

        Args:
            epoch: the epoch (0-based).
            rank: the data-parallel rank.
        Returns:
            (indices into the manifest's shards, walk): whole shards: the rank's own and the rank;
            dealt windows: all shards and 0, the same on every rank.
        """
        return self._reading_order(epoch, rank, self.plan(epoch).dealt)

    def _reading_order(self, epoch: int, rank: int, dealt: bool) -> tuple[list[int], int]:
        if dealt:
            return assign_shards(len(self.shards), 0, 1, epoch, self.seed), 0
        return assign_shards(len(self.shards), rank, self.world_size, epoch, self.seed), rank

    def _count_windows(self, shard_ids: list[int], walk: int, epoch: int) -> tuple[int, int]:
        """(full windows, tokens of the last partial window) that packing these shards gives."""
        if self.split_samples:
            tokens = sum(self.shards[i]["tokens"] for i in shard_ids)
            return tokens // self.seq_len, tokens % self.seq_len
        lengths = _shuffled([self.shards[i]["lengths"] for i in shard_ids], self.shuffle_buffer, self.seed, epoch, walk)
        return _count_sft_windows(lengths, self.seq_len), 0

    def _begin_epoch(self) -> None:
        """Plan the current epoch; refuse one that gives a rank no whole batch."""
        plan = self.plan(self._epoch)
        if plan.batches_per_epoch == 0:
            worst = int(np.argmin(plan.windows))
            # no smaller shards in the advice: dealing gives no batch either (else it was chosen)
            ranks = ""
            if self.world_size > 1:
                ranks = ", fewer ranks (ray.num_workers, or the launcher's --nproc-per-node / --num_gpus)"
            raise DataError(
                f"{self.data_dir}: in epoch {self._epoch} rank {worst} of {self.world_size} gets "
                f"{plan.windows[worst]} window(s) of seq_len={self.seq_len}, fewer than one batch of "
                f"{self.batch_size}: use more data{ranks}, a smaller train.micro_batch or a shorter data.seq_len"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (the same on all ranks)."""
        return self.plan(self._epoch).batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    # -- iteration --

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        rows = [self._next_window() for _ in range(self.batch_size)]
        batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        self._batches += 1
        plan = self.plan(self._epoch)
        if self._batches >= plan.batches_per_epoch:
            # the equal-count cut: what this rank's shards had beyond it is counted, not used
            self.stats["tail_windows_not_used"] += plan.tail_windows[self.rank]
            self.stats["tail_windows_not_used_all_ranks"] += sum(plan.tail_windows)
            self.stats["tail_tokens_not_used"] += plan.tail_tokens[self.rank]
            self._reader.close()
            self._epoch, self._batches = self._epoch + 1, 0
            self._reader = _EpochReader(self, self._epoch, self.report, self.stats)
            if self.epochs is None or self._epoch < self.epochs:
                self._begin_epoch()
        return batch

    def _next_window(self) -> dict[str, np.ndarray]:
        window = self._reader.next_window()
        if window is not None:
            return window
        # Planned windows always exist unless a corrupt shard was skipped: pad rather than hang.
        if self.stats["padding_windows"] == 0:
            warnings.warn(
                f"{self.data_dir}: rank {self.rank} ran out of data in epoch {self._epoch} (a corrupt shard "
                "was skipped); filling with padding windows so that all ranks take the same number of steps",
                stacklevel=3,
            )
        self.stats["padding_windows"] += 1
        window = self.empty_window()
        window["position_ids"][:] = np.arange(self.seq_len)
        return window

    def empty_window(self) -> dict[str, np.ndarray]:
        """A window of padding: pad_id tokens, no targets (and reference log-probs 0)."""
        T = self.seq_len
        window = {
            "tokens": np.full(T, self.pad_id, np.int64),
            "labels": np.full(T, IGNORE_INDEX, np.int64),
            "position_ids": np.zeros(T, np.int64),
            "doc_ids": np.zeros(T, np.int64),
        }
        if self.with_reference:
            window["ref_logps"] = np.zeros(T, np.float32)
        return window

    def reference_of(self, sample: Sample, ref: tuple[int, int]) -> np.ndarray:
        """A sample's reference log-probs (DataError naming the shard and sample if it has none)."""
        if sample.ref_logps is None:
            path = self.data_dir / self.shards[ref[0]]["path"]
            raise DataError(f"shard {path}: sample {ref[1]} has no ref_logps, but its manifest says the set has them")
        return sample.ref_logps

    def epoch_windows(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Every window this rank gets in `epoch`, before the equal-count cut.

        For checks and tests; it reads the data afresh and leaves the stream's position, report
        and stats alone.

        Args:
            epoch: the epoch (0-based).
        Returns:
            An iterator of windows (dicts of int64 (seq_len,) arrays).
        """
        reader = _EpochReader(self, epoch, DropReport(), dict.fromkeys(_STATS, 0))
        while (window := reader.next_window()) is not None:
            yield window

    # -- reading shards --

    def _shard_samples(self, sid: int, skip: int, report: DropReport, stats: dict) -> Iterator[Sample]:
        """A shard's samples from `skip` on, checked against its manifest entry; on_error applied."""
        entry = self.shards[sid]
        path = self.data_dir / entry["path"]
        n = skip
        try:
            for sample in read_shard(path, expected_sha256=entry["sha256"], on_error="raise", skip=skip):
                if n >= entry["samples"]:
                    raise DataError(
                        f"shard {path}: holds more than the {entry['samples']} samples of its manifest entry"
                    )
                if self.vocab_size is not None:
                    _check_ids(sample, self.vocab_size, path, n)
                n += 1
                yield sample
            if n < entry["samples"]:
                raise DataError(f"shard {path}: holds {n} samples, its manifest entry lists {entry['samples']}")
        except DataError as e:
            if self.on_error == "raise":
                raise
            report.drop("corrupt_shard", str(path))
            stats["samples_lost_to_corrupt_shards"] += entry["samples"] - n
            warnings.warn(f"{e}; skipping the rest of this shard", stacklevel=2)

    def _fetch(self, refs: list[tuple[int, int]], report: DropReport, stats: dict) -> dict:
        """The samples behind (shard, index) references; each shard is read from its first one."""
        by_shard: dict[int, set[int]] = {}
        for sid, idx in refs:
            if not 0 <= sid < len(self.shards):
                raise DataError(f"stream state refers to shard {sid}, the manifest has {len(self.shards)}")
            by_shard.setdefault(sid, set()).add(idx)
        got = {}
        for sid, wanted in by_shard.items():
            lo, hi = min(wanted), max(wanted)
            samples = self._shard_samples(sid, lo, report, stats)
            for idx, sample in enumerate(samples, start=lo):
                if idx in wanted:
                    got[(sid, idx)] = sample
                if idx >= hi:
                    samples.close()
                    break
        return got

    # -- resume --

    def state_dict(self) -> dict:
        """Where the stream stands after the last batch it gave: plain, JSON-serialisable values.

        Returns:
            {"version", the layout it is valid for (fingerprint, rank, world_size, seq_len,
            batch_size, seed, shuffle_buffer, split_samples), "epoch", "batches_in_epoch",
            "shard_cursor", "sample_offset", "buffer" ([shard, sample] references), "draining",
            "carry" ([shard, sample, token offset] or None), "windows_built" (this epoch's, all
            ranks' when dealing windows), "stats", "dropped"}.
        """
        return {
            "version": STATE_VERSION,
            **{k: getattr(self, k) for k in _LAYOUT},
            "epoch": self._epoch,
            "batches_in_epoch": self._batches,
            **self._reader.state(),
            "stats": dict(self.stats),
            "dropped": dict(self.report.dropped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken on a stream built with the same arguments.

        Args:
            state: what `state_dict()` returned.
        Raises:
            DataError: the state was saved for other data, another rank layout, seq_len,
                batch_size, seed or shuffle buffer (continuing would silently change the data).
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {state.get('version')}, this Crucible reads {STATE_VERSION}")
        diff = [f"{k}={state.get(k)!r} (now {getattr(self, k)!r})" for k in _LAYOUT if state.get(k) != getattr(self, k)]
        if diff:
            raise DataError(
                f"{self.data_dir}: the stream state was saved with " + ", ".join(diff) + ": resume with the "
                "checkpoint's data (data.train), ray.num_workers, data.seq_len, train.micro_batch, train.seed and "
                "data.shuffle_buffer, or start a new run (another run_dir)"
            )
        epoch, batches = int(state["epoch"]), int(state["batches_in_epoch"])
        self._reader.close()
        self._epoch, self._batches = epoch, batches
        finished = self.epochs is not None and epoch >= self.epochs
        if not finished and batches >= self.plan(epoch).batches_per_epoch:
            raise DataError(f"stream state: batch {batches} of epoch {epoch} is past its end")
        self.stats.update({k: int(v) for k, v in state["stats"].items()})
        self.report.dropped.clear()
        self.report.dropped.update({k: int(v) for k, v in state["dropped"].items()})
        self._reader = _EpochReader(self, epoch, self.report, self.stats)
        self._reader.restore(state)

    def close(self) -> None:
        """Close the open shard, if any."""
        self._reader.close()


def sequence_layout(segments: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(position of each token within its sequence, index of its sequence) for a sample holding
    sequences of these lengths back to back."""
    lengths = np.asarray(segments)
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return np.arange(lengths.sum()) - starts[sequence], sequence


def _check_ids(sample: Sample, vocab_size: int, path: Path, index: int) -> None:
    """An id outside the vocabulary would end one rank with an IndexError in the embedding (or the
    loss) and leave the others waiting at the next collective: refuse it here, with its place."""
    labels = sample.labels
    if labels.min() < 0:  # the mask only when something is ignored
        labels = labels[labels != IGNORE_INDEX]
    for field, ids in (("input_ids", sample.input_ids), ("labels", labels)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise DataError(
                f"shard {path}: sample {index} holds {field} id {bad}, outside the vocabulary 0..{vocab_size - 1}: "
                "the shards were made with another tokenizer; re-run launch/prepare_data.py with this run's "
                "tokenizer"
            )


def _check_args(seq_len, batch_size, rank, world_size, seed, on_error, epochs) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be positive or None, got {epochs}")
