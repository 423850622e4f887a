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
from training.checkpoint import find_latest
from training.config import ConfigError, RunConfig
from training.engine import Dist, barrier, together
from training.loop import Objective
from training.objectives import preference_loss

STATS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")
"""The per-step figures (means over the step's pairs) in metrics.jsonl."""


class Preference(Objective):
    """DPO and its relatives (cfg.dpo.loss): one loss per pair, averaged over the step's pairs."""

    name = "dpo"
    count_name = "pairs"

    def __init__(self, cfg: RunConfig):
        self.dpo = cfg.dpo

    def count(self, micro: dict[str, np.ndarray]) -> int:
        chosen, rejected = _pair_counts(micro["labels"], micro["doc_ids"], np)
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
            ref = torch.zeros(n_seqs, dtype=torch.float64, device=labels.device)
            ref.index_add_(
                0, seq_ids.flatten(), torch.where(labels != IGNORE_INDEX, batch["ref_logps"], 0).flatten().double()
            )
            ref_chosen, ref_rejected = ref[0::2][pairs], ref[1::2][pairs]
        out = preference_loss(
            sums[0::2][pairs],
            sums[1::2][pairs],
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
            "logps_chosen": sums[0::2][pairs].detach().sum(),
            "logps_rejected": sums[1::2][pairs].detach().sum(),
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


def _sequence_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each token's sequence index in the micro-batch (row r's document d is r·W + d, W even, so
    a pair's chosen and rejected are 2k and 2k + 1), and the number of indices."""
    rows, T = doc_ids.shape
    width = T + 1 + (T + 1) % 2  # document ids are < T; even, so pairs never straddle rows
    return doc_ids + width * torch.arange(rows, device=doc_ids.device)[:, None], rows * width


def _pair_counts(labels, doc_ids, xp) -> tuple:
    """Target tokens of each pair's chosen and of its rejected sequence (numpy, on the host)."""
    rows, T = labels.shape
    width = T + 1 + (T + 1) % 2
    seq = doc_ids + width * xp.arange(rows)[:, None]
    counts = xp.bincount(seq.flatten(), weights=(labels != IGNORE_INDEX).flatten(), minlength=rows * width)
    return counts[0::2], counts[1::2]


# --- the reference, once -----------------------------------------------------------------------


def reference_set(engine, cfg: RunConfig, where: Dist, source: str, out: Path) -> str:
    """A preference set with the initial model's log-probs of every label (`ref_logps`): the
    source itself if it has them, else `out`, computed now on every rank (collectives) or
    reused from an earlier attempt of this run.

    Each rank scores the shards i ≡ rank (mod world) and writes them under `out`, one shard per
    source shard in the same order (so the stream's shuffle and packing are the source's);
    rank 0 then writes the manifest. Every rank runs the same number of forwards (the packing
    is planned from the manifest's lengths on every rank), as sharded engines need.

    Raises:
        ConfigError: the reference is missing on resume (it must come from the initial weights,
            which a resumed run no longer has).
    """
    manifest = load_manifest(source)
    if manifest["extra"].get("reference"):
        return source
    fingerprint = manifest_fingerprint(manifest)
    if (out / "manifest.json").exists():
        if load_manifest(out)["extra"]["reference"]["source_fingerprint"] == fingerprint:
            return str(out)
    if cfg.resume != "never" and find_latest(cfg.run_dir) is not None:
        raise ConfigError(
            f"{out} (the reference log-probs of {source}) is missing or was made from other data, and this run "
            "resumes from a checkpoint whose weights are no longer the initial ones; use a new run_dir"
        )
    building = out.with_name(out.name + ".building")
    with together(f"scoring the reference of {source}"):
        if where.is_main:
            shutil.rmtree(building, ignore_errors=True)
    barrier()
    with together(f"scoring the reference of {source}"):
        entries = _score_shards(engine, cfg, where, Path(source), manifest, building)
        (building / f"entries.rank{where.rank}.json").write_text(json.dumps(entries))
    with together(f"writing the reference manifest {out}"):
        if where.is_main:
            _write_reference_manifest(manifest, source, fingerprint, building, out, where.world_size)
    barrier()
    return str(out)


@torch.no_grad()
def _score_shards(engine, cfg: RunConfig, where: Dist, source: Path, manifest: dict, out: Path) -> list[dict]:
    """Score this rank's shards into `out`; returns their manifest entries (source order kept)."""
    T, per_batch = cfg.data.seq_len, cfg.train.micro_batch
    shards = manifest["shards"]
    plans = [_pack(entry["lengths"], T) for entry in shards]
    forwards = [
        sum(-(-len(plans[i]) // per_batch) for i in range(r, len(shards), where.world_size))
        for r in range(where.world_size)
    ]
    engine.model.eval()
    entries, done = [], 0
    for i in range(where.rank, len(shards), where.world_size):
        samples = list(read_shard(source / shards[i]["path"], expected_sha256=shards[i]["sha256"], on_error="raise"))
        for sample in samples:
            sample.ref_logps = np.zeros(len(sample), np.float32)  # stays 0 if too long (the stream drops it)
        for first in range(0, len(plans[i]), per_batch):
            _score_rows(engine, [[samples[k] for k in row] for row in plans[i][first : first + per_batch]], T, where)
            done += 1
        with ShardWriter(out, target_bytes=1 << 62, prefix=Path(shards[i]["path"]).stem) as writer:
            for sample in samples:
                writer.write(sample)
        entries += [{**entry, "source_index": i} for entry in writer.shards]
    for _ in range(done, max(forwards)):  # the forwards other ranks still run (sharded engines gather)
        _score_rows(engine, [], T, where, per_batch)
    engine.model.train()
    return entries


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


def _write_reference_manifest(manifest: dict, source: str, fingerprint: str, building: Path, out: Path, world: int):
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
    extra = {
        **manifest["extra"],
        "reference": {"source": str(Path(source).resolve()), "source_fingerprint": fingerprint},
    }
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
