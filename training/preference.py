"""Preference training (DPO and its relatives) on the one loop: its Objective, and the reference
log-probabilities it compares against, computed once before the first step.

    preference shards (data_pipeline: prompt + chosen, prompt + rejected, labels on the answers)
        │  Preference.prepare: the initial model (the SFT export, or a LoRA run's base: its
        │  adapters start at zero) scores every pair once → run_dir/reference/{train,val}, the
        │  same shards with `ref_logps` beside the ids; reused on resume
        ▼
    PackedStream: pairs packed whole into windows; a pair's two sequences are documents 2k, 2k+1
        ▼
    Preference.loss: engine.token_logprobs (chunked, no (B, T, V) logits) → per-sequence sums and
        counts (model.loss.sequence_logprobs) → training.objectives.preference_loss per pair, summed

A step averages over its global number of pairs (all micro-batches, all ranks), as SFT averages
over target tokens, so accumulation and data parallelism stay exact. No second model is held in
memory: under ZeRO-3 a reference copy would double the gathered weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data_pipeline.records import DataError, DropReport
from data_pipeline.shards import ShardWriter, load_manifest, read_shard, write_manifest
from data_pipeline.stream import manifest_fingerprint, sequence_layout
from data_pipeline.tokenizer import Tokenizer
from model.loss import IGNORE_INDEX, sequence_logprobs
from training.checkpoint import weights_sha256
from training.config import ConfigError, RunConfig
from training.engine import Dist, broadcast_from_main, together
from training.loop import Objective
from training.objectives import preference_loss


class Preference(Objective):
    """DPO and its relatives (cfg.dpo.loss): one loss per pair, averaged over the step's pairs."""

    name = "dpo"
    count_name = "pairs"
    perplexity = False

    def __init__(self, cfg: RunConfig):
        self.dpo = cfg.dpo

    def count(self, micro: dict[str, np.ndarray]) -> int:
        chosen, rejected = _pair_counts(np.asarray(micro["labels"]), np.asarray(micro["doc_ids"]))
        return int(((chosen > 0) & (rejected > 0)).sum())

    def loss(self, engine, batch: dict[str, torch.Tensor], cfg: RunConfig, train: bool = True) -> tuple:
        labels, doc_ids = batch["labels"], batch["doc_ids"]
        seq_ids, n_seqs = _sequence_ids(doc_ids)
        sums, counts = sequence_logprobs(engine.token_logprobs(batch), labels, seq_ids, n_seqs)
        chosen, rejected = (counts[0::2], counts[1::2])
        pairs = (chosen > 0) & (rejected > 0)
        ref_chosen = ref_rejected = None
        if self.dpo.loss != "simpo":
            if "ref_logps" not in batch:
                raise DataError("the batch has no ref_logps: the preference set's reference was not computed")
            ref, _ = sequence_logprobs(batch["ref_logps"], labels, seq_ids, n_seqs)
            ref_chosen, ref_rejected = ref[0::2][pairs], ref[1::2][pairs]
        policy_chosen, policy_rejected = sums[0::2][pairs], sums[1::2][pairs]
        out = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            chosen[pairs],
            rejected[pairs],
            loss_type=self.dpo.loss,
            beta=self.dpo.beta,
            label_smoothing=self.dpo.label_smoothing,
            simpo_gamma=self.dpo.simpo_gamma,
        )
        r_chosen, r_rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        stats = {
            "rewards_chosen": r_chosen.sum(),
            "rewards_rejected": r_rejected.sum(),
            "reward_accuracy": (r_chosen > r_rejected).double().sum(),
            "reward_margin": (r_chosen - r_rejected).sum(),
            "logps_chosen": policy_chosen.detach().sum(),
            "logps_rejected": policy_rejected.detach().sum(),
        }
        return out.losses.sum(), stats

    def prepare(self, engine, cfg: RunConfig, where: Dist, tokenizer: Tokenizer) -> RunConfig:
        """The config to stream from: data.train (and data.val) with their reference log-probs,
        computed now by the initial model unless the set has them (or the loss needs none)."""
        folders = {"train": cfg.data.train, "val": cfg.data.val}
        for split, folder in folders.items():
            if folder is None:
                continue
            manifest = load_manifest(folder)
            if manifest["kind"] != "preference":
                raise ConfigError(
                    f"data.{split}={folder} is a {manifest['kind']} set; preference training needs pairs "
                    "(launch/prepare_data.py pref ... --out DIR)"
                )
            if self.dpo.loss != "simpo":  # SimPO needs no reference
                folders[split] = reference_set(engine, cfg, where, folder, Path(cfg.run_dir) / "reference" / split)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **folders))


def _row_width(T: int) -> int:
    """Sequence indices per row: document ids are < T, and an even width keeps a pair's chosen
    (2k) and rejected (2k + 1) in one row."""
    return T + 1 + (T + 1) % 2


def _sequence_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each token's sequence index in the micro-batch (row r's document d is r·W + d), and the
    number of indices."""
    rows, T = doc_ids.shape
    width = _row_width(T)
    return doc_ids + width * torch.arange(rows, device=doc_ids.device)[:, None], rows * width


def _pair_counts(labels: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target tokens of each pair's chosen and of its rejected sequence, on the host."""
    rows, T = labels.shape
    width = _row_width(T)
    seq = doc_ids + width * np.arange(rows)[:, None]
    counts = np.bincount(seq.ravel(), weights=(labels != IGNORE_INDEX).ravel(), minlength=rows * width)
    return counts[0::2], counts[1::2]


# --- the reference, once -----------------------------------------------------------------------


def reference_set(engine, cfg: RunConfig, where: Dist, source: str, out: Path) -> str:
    """A preference set with the initial model's log-probs of every label (`ref_logps`): the
    source itself if it has them, `out` if an earlier attempt of this run scored it for the same
    data, weights, LoRA, precision and seq_len, else `out` scored now (collectives).

    `prepare` runs before a resumed run loads its checkpoint, so the engine holds the initial
    weights here either way. Each rank scores the shards i ≡ rank (mod world) and writes them
    under `out`, one shard per source shard in the same order (so the stream's shuffle and
    packing are the source's); rank 0 then writes the manifest. Reading and writing end in an
    agreement (a rank that fails stops every rank); the forwards between them are collectives,
    as many on every rank (planned from the manifest's lengths).
    """
    manifest = load_manifest(source)
    if manifest["extra"].get("reference"):
        return source
    wanted = None
    with together(f"checking the reference of {source}"):
        if where.is_main:
            wanted = _reference_record(cfg, source, manifest)
            done = out / "manifest.json"
            if done.exists() and load_manifest(out)["extra"].get("reference") == wanted:
                wanted = None  # reuse
    wanted = broadcast_from_main(wanted)
    if wanted is None:
        return str(out)
    building = out.with_name(out.name + ".building")
    shards = manifest["shards"]
    plans = [_pack(entry["lengths"], cfg.data.seq_len) for entry in shards]
    mine = list(range(where.rank, len(shards), where.world_size))
    samples = {}
    with together(f"reading {source} to score its reference"):
        if where.is_main:
            shutil.rmtree(building, ignore_errors=True)
        for i in mine:
            samples[i] = list(
                read_shard(Path(source) / shards[i]["path"], expected_sha256=shards[i]["sha256"], on_error="raise")
            )
    _score_shards(engine, cfg, where, plans, samples)
    with together(f"writing the reference of {source} to {building}"):
        entries = []
        for i in mine:
            with ShardWriter(building, target_bytes=1 << 62, prefix=Path(shards[i]["path"]).stem) as writer:
                for sample in samples[i]:
                    writer.write(sample)
            entries += [{**entry, "source_index": i} for entry in writer.shards]
        building.mkdir(parents=True, exist_ok=True)  # also where this rank had no shard to write
        (building / f"entries.rank{where.rank}.json").write_text(json.dumps(entries))
    with together(f"writing the reference manifest {out}"):
        if where.is_main:
            _write_reference_manifest(manifest, source, wanted, building, out, where.world_size)
    return str(out)


def _reference_record(cfg: RunConfig, source: str, manifest: dict) -> dict:
    """What a reference was scored from: reused only when all of it is the same."""
    return {
        "source": str(Path(source).resolve()),
        "source_fingerprint": manifest_fingerprint(manifest),
        "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
        "init_from_sha256": weights_sha256(cfg.init_from) if cfg.init_from else None,
        "model": dataclasses.asdict(cfg.model) if cfg.init_from is None else None,
        "seed": cfg.train.seed if cfg.init_from is None else None,
        "lora": dataclasses.asdict(cfg.train.lora) if cfg.train.lora.rank else None,
        "precision": cfg.train.precision,
        "seq_len": cfg.data.seq_len,
    }


@torch.no_grad()
def _score_shards(engine, cfg: RunConfig, where: Dist, plans: list[list[list[int]]], samples: dict) -> None:
    """Fill each of this rank's samples' ref_logps, as many forwards on every rank."""
    per_batch = cfg.train.micro_batch
    forwards = [
        sum(-(-len(plans[i]) // per_batch) for i in range(r, len(plans), where.world_size))
        for r in range(where.world_size)
    ]
    engine.model.eval()
    try:
        done = 0
        for i, shard in samples.items():
            for sample in shard:
                sample.ref_logps = np.zeros(len(sample), np.float32)  # stays 0 if too long: the stream drops it
            for first in range(0, len(plans[i]), per_batch):
                rows = [[shard[k] for k in row] for row in plans[i][first : first + per_batch]]
                _score_rows(engine, rows, cfg.data.seq_len, where, per_batch)
                done += 1
        for _ in range(done, max(forwards)):  # the forwards other ranks still run (sharded engines gather)
            _score_rows(engine, [], cfg.data.seq_len, where, per_batch)
    finally:
        engine.model.train()


def _pack(lengths: list[int], T: int) -> list[list[int]]:
    """Sample indices per row of T tokens, greedily in order; a sample longer than T gets none."""
    rows, row, fill = [], [], 0
    for k, n in enumerate(lengths):
        if n > T:
            continue
        if fill + n > T:
            rows.append(row)
            row, fill = [], 0
        row.append(k)
        fill += n
    return rows + [row] if row else rows


def _score_rows(engine, rows: list[list], T: int, where: Dist, pad_rows: int = 0) -> None:
    """One forward over rows of whole samples packed as the stream packs them (each sequence a
    document); each sample's ref_logps get its labels' log-probs. No rows: `pad_rows` of padding."""
    n = max(len(rows), pad_rows)
    batch = {
        "tokens": np.zeros((n, T), np.int64),
        "labels": np.full((n, T), IGNORE_INDEX, np.int64),
        "position_ids": np.zeros((n, T), np.int64),
        "doc_ids": np.zeros((n, T), np.int64),
    }
    placed = []
    for r, row in enumerate(rows):
        fill = docs = 0
        for sample in row:
            if sample.segments is None or len(sample.segments) != 2:
                raise DataError(f"a sample of a preference set holds {sample.segments or 1} sequence(s), not a pair")
            end = fill + len(sample)
            positions, sequence = sequence_layout(sample.segments or (len(sample),))
            batch["tokens"][r, fill:end], batch["labels"][r, fill:end] = sample.input_ids, sample.labels
            batch["position_ids"][r, fill:end], batch["doc_ids"][r, fill:end] = positions, docs + sequence
            placed.append((sample, r, fill))
            fill, docs = end, docs + int(sequence[-1]) + 1
        batch["position_ids"][r, fill:], batch["doc_ids"][r, fill:] = np.arange(T - fill), docs  # padding
    on_device = {key: torch.as_tensor(value).to(where.device) for key, value in batch.items()}
    logps = engine.token_logprobs(on_device).float().cpu().numpy()
    for sample, r, fill in placed:
        sample.ref_logps[:] = logps[r, fill : fill + len(sample)]


def _write_reference_manifest(manifest: dict, source: str, record: dict, building: Path, out: Path, world: int):
    """Rank 0: the reference set's manifest (shards in the source's order), then `out` swapped in."""
    entries = []
    for rank in range(world):
        entries += json.loads((building / f"entries.rank{rank}.json").read_text())
    entries.sort(key=lambda e: e.pop("source_index"))
    report = DropReport(
        input_records=manifest["input_records"],
        kept_records=manifest["kept_records"],
        dropped=Counter(manifest["dropped"]),
        modified=Counter(manifest["modified"]),
    )
    extra = {**manifest["extra"], "reference": record}
    write_manifest(
        building,
        kind="preference",
        shards=entries,
        tokenizer_sha256=manifest["tokenizer_sha256"],
        report=report,
        extra=extra,
    )
    for path in building.glob("entries.rank*.json"):
        path.unlink()
    shutil.copytree(Path(source) / "tokenizer", building / "tokenizer")  # a dataset folder like the source
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)
