"""The one training loop, for pretraining, SFT and preference training alike, over any engine.

SFT differs from pretraining only in its data (labels masked outside the assistant turns), its
learning rate and its initial weights (`init_from`); the loss is the same `model.loss` sum. A
later stage differs in its data and its objective (`Objective`: what a step counts and the sum
it differentiates; DPO's is training/preference.py), never in a second trainer.

One optimizer step (`train_step`):
    fetch the step's micro-batches → count what the objective averages over (target tokens;
    preference pairs) and sum the count over all ranks
    → for each micro-batch: forward → loss_sum × grad_divisor / global_count → backward
    → the engine clips and steps, or skips when the gradient norm is non-finite (it is the same
      norm on every rank, so every rank skips the same step).
Dividing by the global count of the whole step makes accumulation and data parallelism exact:
world 2 × accumulation 2 × micro-batch 2 gives the losses and weights of world 1 × micro-batch 8.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.shards import load_manifest
from data_pipeline.stream import PackedStream
from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from model.config import ModelConfig
from model.decoder import Decoder
from model.lora import merge_state_dict
from model.loss import IGNORE_INDEX
from training.checkpoint import (
    TrainState,
    check_shared_run_dir,
    checkpoint_dir,
    find_latest,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    weights_sha256,
    write_adapter_folder,
    write_export,
)
from training.config import ConfigError, RunConfig, save_resolved
from training.engine import (
    Dist,
    all_reduce_sum,
    all_reduce_sum_,
    barrier_last,
    broadcast_from_main,
    build_engine,
    init_distributed,
    raise_together,
    resolve_precision,
    together,
)
from training.metrics import Reporter, peak_flops, peak_memory_bytes, throughput
from training.optim import lr_at
from training.prefetch import StepPrefetcher
from training.startup import full_numel, materialize, model_skeleton, start_weights


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class StepResult:
    loss: float
    count: int
    """The step's global count: target tokens, or what the objective counts (pairs)."""
    grad_norm: float
    applied: bool
    stats: dict[str, float] = field(default_factory=dict)
    """The objective's per-step figures, as means over the global count."""


class Objective:
    """What one stage trains on. This one is pretraining's and SFT's: cross-entropy summed over
    the target tokens (model/loss.py); training/preference.py has DPO's, training/grpo.py GRPO's.

    The loop calls, in order:
        tokenizer_dir(cfg)                  where the run's tokenizer is
        prepare(engine, cfg, where, tok)    before the first step (DPO scores its reference
                                            log-probs); returns the config to stream from
        open_data(cfg, where, folder, tok, shuffle, epochs)   an iterator of micro-batches
    and in each step (`train_step`):
        rollout(engine, micro, cfg, where)  the step's micro-batches turned into what it trains
                                            on (GRPO samples completions here), and figures
                                            to sum over ranks
        count(micro)                        what the step's loss is averaged over, on the host
        loss(engine, batch, cfg, train)     (loss_sum, stats): stats are 0-d sums
        metrics(sums, count)                the step's figures from the sums of all ranks
    """

    name = "lm"
    count_name = "target_tokens"
    perplexity = True
    """Whether the loss is a per-token cross-entropy (validation then reports perplexity)."""

    def tokenizer_dir(self, cfg: RunConfig) -> Path:
        return Path(cfg.data.train) / "tokenizer"

    def prepare(self, engine, cfg: RunConfig, where: Dist, tokenizer: Tokenizer) -> RunConfig:
        for key, folder in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
            if folder is not None and load_manifest(folder)["kind"] == "preference":
                raise ConfigError(f"{key}={folder} holds preference pairs: train on them with launch/dpo.py")
        return cfg

    def open_data(self, cfg: RunConfig, where: Dist, folder: str, tokenizer: Tokenizer, shuffle=True, epochs=None):
        return make_stream(cfg, where, folder, tokenizer, shuffle=shuffle, epochs=epochs)

    def rollout(self, engine, micro: list[dict], cfg: RunConfig, where: Dist) -> tuple[list[dict], dict[str, float]]:
        return micro, {}

    def count(self, micro: dict[str, np.ndarray]) -> int:
        return int((micro["labels"] != IGNORE_INDEX).sum())

    def loss(self, engine, batch: dict[str, torch.Tensor], cfg: RunConfig, train: bool = True) -> tuple:
        loss_sum, _ = engine.loss(batch, z_loss=cfg.train.z_loss if train else 0.0)  # validation: the plain loss
        return loss_sum, {}

    def metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Means over the step's global count."""
        return {key: total / count for key, total in sums.items()}


LANGUAGE_MODELING = Objective()


def train(
    cfg: RunConfig,
    data: Iterator[dict] | None = None,
    model_hook: Callable[[Decoder], None] | None = None,
    on_checkpoint: Callable[[Path, dict], None] | None = None,
    objective: Objective = LANGUAGE_MODELING,
) -> dict:
    """Run (or resume) a pretraining or SFT run to cfg.train.max_steps.

    Args:
        cfg: the checked run config.
        data: this rank's micro-batches instead of the packed stream over cfg.data.train (it
            must have state_dict/load_state_dict to be checkpointed).
        model_hook: called with the Decoder once the engine has built it (its parameters
            filled, sharded and wrapped in place) to add hooks.
        on_checkpoint: called on every rank after each checkpoint with (folder, last record).
        objective: what the steps train (default pretraining's and SFT's cross-entropy).
    Returns:
        a summary: losses and skipped steps of this attempt, final step, tokens, run_dir, export
        (the Hugging Face folder; merged with the adapters under LoRA), adapter (LoRA's folder).
    """
    where = init_distributed(needs_group=cfg.engine != "single", timeout_s=cfg.collective_timeout_s)
    check_shared_run_dir(cfg.run_dir, where)
    asked, cfg = cfg.train.precision, resolve_precision(cfg, where.device)  # recorded as chosen
    # Each rank-local part that can fail ends in an agreement, so no rank waits for a failed one.
    with together("loading the tokenizer and the model"):
        tokenizer = load_tokenizer(objective.tokenizer_dir(cfg))
        weights = start_weights(cfg, tokenizer)
    # A skeleton: each rank allocates and reads (or draws) only its own part in the engine.
    model_cfg, model = weights.cfg, model_skeleton(cfg, weights.cfg)
    flops_per_token = model.num_flops_per_token(cfg.data.seq_len, numel=full_numel)
    n_params = model.num_params(numel=full_numel), model.num_params(trainable_only=True, numel=full_numel)
    with contextlib.closing(weights):
        engine = build_engine(model, cfg, where, weights)
    if model_hook is not None:
        with together("running the model hook"):
            model_hook(model)
    given, cfg = cfg, objective.prepare(engine, cfg, where, tokenizer)  # collectives on every rank
    with together("opening the data"):
        stream = data if data is not None else objective.open_data(cfg, where, cfg.data.train, tokenizer)
        if cfg.data.val is not None:  # a bad validation split fails now, not after hours of training
            objective.open_data(cfg, where, cfg.data.val, tokenizer, shuffle=False, epochs=1).close()
    meta = _checkpoint_meta(cfg, engine, model_cfg, tokenizer, where, objective)
    state = _resume(cfg, engine, stream, where, meta, tokenizer)
    with together("writing config.yaml and metrics.jsonl"):
        report = Reporter(cfg.run_dir, where.rank, cfg.train.max_steps, start_step=state.step)
        if where.is_main:
            save_resolved(given, Path(cfg.run_dir) / "config.yaml")  # the user's data, not DPO's scored copy
            report.truncate_after(state.step)
    report.print(_announce(cfg, where, n_params, state, asked))
    tokens_per_step = cfg.batch_arithmetic(where.world_size)["tokens_per_step"]
    peak, losses, skipped, record = peak_flops(where.device), [], [], {}
    checkpoints, keep = checkpoint_dir(cfg.run_dir), cfg.train.keep_checkpoints

    # The stream is read on a thread from here on; closing stops it however the loop ends.
    with contextlib.closing(StepPrefetcher(stream, cfg.train.grad_accum, pin=where.device.type == "cuda")) as steps:
        while state.step < cfg.train.max_steps and not state.stopped_early:
            started = time.perf_counter()
            micro = _next_or_error(steps)
            data_wait = time.perf_counter() - started
            lr = _lr(cfg, state.step + 1)
            result = train_step(engine, micro, cfg, where, lr, objective)
            step_tokens = int(result.stats.pop("step_tokens", tokens_per_step))  # an RL step's own count
            state.step, state.tokens = state.step + 1, state.tokens + step_tokens
            seconds = time.perf_counter() - started
            _count_skips(state, result, engine, skipped, report)
            losses.append(result.loss)
            record = {
                "step": state.step,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "lr": lr,
                "tokens": state.tokens,
                objective.count_name: result.count,
                **result.stats,
                **throughput(step_tokens, seconds, flops_per_token, where.world_size, peak),
                "step_s": seconds,
                "peak_mem_bytes": peak_memory_bytes(where.device),
                "data_wait_frac": data_wait / seconds,
                "skipped": not result.applied,
            }
            state.stopped_early = _evaluate_if_due(engine, cfg, where, tokenizer, state, record, report, objective)
            report.log_step(record)
            if state.bad_in_a_row >= cfg.train.max_bad_steps:
                report.close()
                raise _diverged(state, cfg.run_dir)
            exit_now = state.step == cfg.train.exit_at_step
            final = state.step == cfg.train.max_steps or state.stopped_early or exit_now
            if state.step % cfg.train.checkpoint_every == 0 or final:
                folder = save_checkpoint(engine, checkpoints, state, steps.state_dict(), where, meta, keep, tokenizer)
                if on_checkpoint is not None:
                    on_checkpoint(folder, record)
            if state.stopped_early:
                report.print(
                    f"step {state.step}: no better validation loss in {cfg.train.patience} evaluations; stopping"
                )
            if exit_now:
                report.print(f"step {state.step}: exit_at_step reached; resume=auto continues to {cfg.train.max_steps}")
                break

    finished = state.step == cfg.train.max_steps or state.stopped_early
    export, adapter = _final_exports(engine, cfg, model_cfg, tokenizer, where) if finished else (None, None)
    barrier_last()
    report.print(f"done: step {state.step}, {state.tokens:,} tokens, {state.skipped_steps} skipped step(s)")
    report.close()
    return {
        "losses": losses,
        "skipped_steps": skipped,
        "step": state.step,
        "tokens": state.tokens,
        "resumes": state.resumes,
        "run_dir": cfg.run_dir,
        "export": str(export) if export else None,
        "adapter": str(adapter) if adapter else None,
        "last_record": record,
    }


def _count_skips(state: TrainState, result: StepResult, engine, skipped: list[int], report: Reporter) -> None:
    """Note a step that was not applied, and count non-finite ones in a row (fp16 overflows while
    the loss scale settles are expected: they do not count as bad)."""
    bad = not result.applied and result.count > 0
    bad = bad and not (math.isfinite(result.loss) and engine.overflow_was_expected())
    state.bad_in_a_row = state.bad_in_a_row + 1 if bad else 0
    if not result.applied:
        state.skipped_steps += 1
        skipped.append(state.step)
        report.print(f"step {state.step}: non-finite loss or gradient norm, or nothing to learn; skipped on all ranks")


def _diverged(state: TrainState, run_dir: str) -> TrainingError:
    good = find_latest(run_dir)
    return TrainingError(
        f"{state.bad_in_a_row} non-finite steps in a row (last at step {state.step}): stopping; the last "
        f"good checkpoint is {good or 'none (no checkpoint was written yet)'}. Lower train.lr or check the data."
    )


def train_step(
    engine,
    micro: list[dict] | Exception,
    cfg: RunConfig,
    where: Dist,
    lr: float,
    objective: Objective = LANGUAGE_MODELING,
) -> StepResult:
    """One optimizer step over this rank's `cfg.train.grad_accum` micro-batches (see module doc).

    `micro` is the error instead when reading them failed on this rank: the count's all-reduce
    carries a failure flag, so every rank raises the same error rather than wait for this one.
    The step is queued without waiting for the device: the loss, the gradient norm and whether
    the step was applied are read back together once its work is queued (one transfer)."""
    error = micro if isinstance(micro, Exception) else None
    micro, rolled = (micro, {}) if error else objective.rollout(engine, micro, cfg, where)
    local_count = 0 if error else sum(objective.count(m) for m in micro)  # host: no sync
    micro = [] if error else [_to_device(m, where.device) for m in micro]  # copies queued before the reduction
    global_count, failures = all_reduce_sum([local_count, error is not None], where.device)
    if failures:
        raise_together("reading the step's data", error)
    if global_count == 0:  # only padding on every rank (corrupt shards skipped): nothing to learn
        return StepResult(math.nan, 0, math.nan, False)
    scale = engine.grad_divisor / global_count

    sums = {"loss": torch.zeros((), dtype=torch.float64, device=where.device)}
    sums.update({key: torch.tensor(value, dtype=torch.float64, device=where.device) for key, value in rolled.items()})
    for i, m in enumerate(micro):
        s, stats = objective.loss(engine, m, cfg)
        engine.backward(s * scale, last=i == len(micro) - 1)
        for key, value in {"loss": s, **stats}.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
    applied, grad_norm = engine.step(lr)
    summed = torch.stack(list(sums.values()))
    all_reduce_sum_(summed)
    *totals, grad_norm, applied = torch.cat([summed, grad_norm.double()[None], applied.double()[None]]).tolist()
    means = objective.metrics(dict(zip(sums, totals, strict=True)), global_count)
    return StepResult(means.pop("loss"), int(global_count), grad_norm, bool(applied), means)


@torch.no_grad()
def evaluate(
    engine, cfg: RunConfig, where: Dist, tokenizer: Tokenizer, objective: Objective = LANGUAGE_MODELING
) -> dict:
    """The objective's mean loss (and its figures) over the validation split (cfg.eval_batches
    per rank, or all); for language modeling also the perplexity."""
    stream = objective.open_data(cfg, where, cfg.data.val, tokenizer, shuffle=False, epochs=1)
    engine.model.eval()
    sums, count, batches = {"loss": 0.0}, 0, iter(stream)
    for i in itertools.count():
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        with together(f"reading data.val={cfg.data.val}"):  # agreed before the forward's collectives
            batch = next(batches, None)
        if batch is None:  # every rank has the same number of batches
            break
        count += objective.count(batch)
        s, stats = objective.loss(engine, _to_device(batch, where.device), cfg, train=False)
        for key, value in {"loss": s, **stats}.items():
            sums[key] = sums.get(key, 0) + value.double()
    engine.model.train()
    stream.close()
    *totals, n = all_reduce_sum([*(float(v) for v in sums.values()), count], where.device)
    means = objective.metrics(dict(zip(sums, totals, strict=True)), n) if n else dict.fromkeys(sums, math.nan)
    scores = {f"val_{key}": value for key, value in means.items()}
    if objective.perplexity:
        scores["val_ppl"] = math.exp(min(scores["val_loss"], 50.0)) if n else math.nan
    return {**scores, "val_tokens" if objective.perplexity else f"val_{objective.count_name}": int(n)}


def _evaluate_if_due(engine, cfg, where, tokenizer, state, record: dict, report: Reporter, objective) -> bool:
    """Evaluate every eval_every steps, track the best validation loss; True when patience ran out."""
    if not cfg.train.eval_every or state.step % cfg.train.eval_every:
        return False
    scores = evaluate(engine, cfg, where, tokenizer, objective)
    record.update(scores)
    shown = "  ".join(
        f"{key} {scores[key]:.4f}" for key in ("val_loss", "val_ppl", "val_reward_accuracy") if key in scores
    )
    report.print(f"step {state.step}: {shown}")
    if state.best_val_loss is None or scores["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.evals_since_best = scores["val_loss"], 0
    else:
        state.evals_since_best += 1
    return bool(cfg.train.patience) and state.evals_since_best >= cfg.train.patience


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> tuple[Decoder, ModelConfig]:
    """The run's initial Decoder, whole, on the CPU: what every rank starts from (the loop
    builds a skeleton and fills only each rank's part; see training/startup.py)."""
    with contextlib.closing(start_weights(cfg, tokenizer)) as weights:
        return materialize(model_skeleton(cfg, weights.cfg), weights, torch.device("cpu")), weights.cfg


def make_stream(
    cfg: RunConfig, where: Dist, folder: str, tokenizer: Tokenizer, shuffle: bool = True, epochs: int | None = None
) -> PackedStream:
    """This rank's packed stream over a shard folder, checked against the tokenizer."""
    return PackedStream(
        folder,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.train.micro_batch,
        rank=where.rank,
        world_size=where.world_size,
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer if shuffle else 0,
        on_error=cfg.data.on_error,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        epochs=epochs,
        pad_id=tokenizer.pad_id,
    )


def _final_exports(engine, cfg: RunConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, where: Dist):
    """A finished run's run_dir/hf (if export_hf) and, under LoRA, run_dir/adapter (collectives)."""
    run_dir = Path(cfg.run_dir)
    adapter = export_adapter(engine, cfg, run_dir / "adapter", tokenizer, where)
    export = export_hf(engine, cfg, model_cfg, run_dir / "hf", tokenizer, where) if cfg.export_hf else None
    return export, adapter


def export_hf(engine, cfg: RunConfig, model_cfg: ModelConfig, out: Path, tokenizer: Tokenizer, where: Dist) -> Path:
    """A consolidated Hugging Face export with the run's tokenizer beside it (a collective);
    under LoRA the base with the adapters merged in."""
    state = engine.full_state_dict()
    lora = cfg.train.lora.lora_config()
    with together(f"writing the export {out}"):
        if where.is_main:
            merged = state if lora is None else merge_state_dict(state, model_cfg, lora, in_place=True)
            write_export(merged, model_cfg, out, tokenizer)
    return out


def export_adapter(engine, cfg: RunConfig, out: Path, tokenizer: Tokenizer, where: Dist) -> Path | None:
    """Under LoRA, the trained adapters as a peft adapter folder with the run's tokenizer (a
    collective); None without LoRA."""
    lora = cfg.train.lora.lora_config()
    if lora is None:
        return None
    adapters = engine.full_state_dict(trainable_only=True)
    with together(f"writing the adapter {out}"):
        if where.is_main:
            write_adapter_folder(adapters, lora, out, tokenizer, base=str(Path(cfg.init_from).resolve()))
    return out


def _checkpoint_meta(
    cfg: RunConfig, engine, model_cfg: ModelConfig, tokenizer: Tokenizer, where: Dist, objective
) -> dict:
    """What a checkpoint records beside the counters: enough for launch/export_hf.py to read it."""
    lora = cfg.train.lora.rank > 0
    return {
        "engine": cfg.engine,
        "zero_stage": getattr(engine, "stage", None),
        "model": asdict(model_cfg),
        "tokenizer_dir": str(objective.tokenizer_dir(cfg).resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "train": _plain(asdict(cfg.train)),
        # A LoRA checkpoint holds the adapters only: the base is named, and checked on resume.
        "lora": _plain(asdict(cfg.train.lora)) if lora else None,
        "base": _base_record(cfg, where) if lora else None,
    }


def _base_record(cfg: RunConfig, where: Dist) -> dict:
    """The frozen base of a LoRA run: its folder and its weights' sha256 (hashed on rank 0)."""
    with together(f"hashing init_from={cfg.init_from}"):
        digest = weights_sha256(cfg.init_from) if where.is_main else None
    return {"path": str(Path(cfg.init_from).resolve()), "sha256": broadcast_from_main(digest)}


def _check_same_base(folder: Path, saved: dict, run: dict) -> None:
    """A LoRA checkpoint resumes only with the same LoRA on the same base weights, and a full
    checkpoint only without LoRA (ConfigError naming what differs)."""
    was, now = saved.get("lora"), run["lora"]
    if _adapter_shape(was) != _adapter_shape(now):
        raise ConfigError(
            f"resume={folder}: trained with train.lora={was}, this run has train.lora={now}; resume with the same "
            "train.lora.*, or use another run_dir"
        )
    if now and saved["base"]["sha256"] != run["base"]["sha256"]:
        raise ConfigError(
            f"resume={folder}: its adapters were trained on the base at {saved['base']['path']} (sha256 "
            f"{saved['base']['sha256'][:12]}…), but init_from={run['base']['path']} holds other weights (sha256 "
            f"{run['base']['sha256'][:12]}…); resume on the same base, or use another run_dir"
        )


def _adapter_shape(lora: dict | None) -> tuple | None:
    """What shapes a LoRA run's adapters (dropout may change between runs; targets in any order)."""
    return None if lora is None else (lora["rank"], lora["alpha"], sorted(lora["targets"]))


def _plain(value):
    return json.loads(json.dumps(value))  # as meta.json gives it back (tuples are lists)


def resume_folder(cfg: RunConfig) -> Path | None:
    """The checkpoint that `resume` names (None for a fresh start), after checking that run_dir
    holds nothing newer that this run would mix with (ConfigError)."""
    folder = None if cfg.resume == "never" else find_latest(cfg.run_dir) if cfg.resume == "auto" else Path(cfg.resume)
    start = read_meta(folder)["state"]["step"] if folder else 0
    newer = find_latest(cfg.run_dir)
    if newer is not None and read_meta(newer)["state"]["step"] > start:
        raise ConfigError(
            f"run_dir={cfg.run_dir} already holds {newer.name}, newer than the start (step {start}); resume=auto "
            "continues it, or use another run_dir"
        )
    return folder


def _resume(cfg: RunConfig, engine, stream, where: Dist, run_meta: dict, tokenizer: Tokenizer) -> TrainState:
    """Load the checkpoint that `resume` names (none for a fresh start), after checking that it
    fits this run, whose checkpoint meta is `run_meta` (see resume_folder for the run_dir check)."""
    model_cfg = ModelConfig(**run_meta["model"])
    folder = None
    with together("choosing the checkpoint to resume from"):
        if where.is_main:
            folder = resume_folder(cfg)
    folder = broadcast_from_main(folder)  # one choice, even if a checkpoint completes meanwhile
    if folder is None:
        return TrainState()
    meta = read_meta(folder)
    if ModelConfig(**meta["model"]) != model_cfg or meta["tokenizer_sha256"] != tokenizer.sha256:
        raise ConfigError(
            f"resume={folder}: its model shape or tokenizer differs from this run's (model.*, data.train); "
            "resume with the same model and data, or use another run_dir"
        )
    _check_same_base(folder, meta, run_meta)
    state, stream_state = load_checkpoint(engine, folder, where, cfg.engine)
    with together(f"restoring the data stream from {folder}"):
        stream.load_state_dict(stream_state)
    state.resumes += 1
    if where.is_main:
        print(f"resumed from {folder} at step {state.step}", flush=True)
        saved, now = meta.get("train", {}), _plain(asdict(cfg.train))
        changed = [
            f"train.{k} {saved[k]} -> {v}"
            for k, v in now.items()
            if k != "exit_at_step" and k in saved and saved[k] != v  # exit_at_step ends a run, changes no step
        ]
        if changed:  # allowed (a longer run, a lower lr), but never unnoticed
            print(f"resume: changed since the checkpoint, in effect from step {state.step + 1}: {', '.join(changed)}")
    return state


def _next_or_error(steps: Iterator):
    """The next step's micro-batches, or the error reading them raised (see train_step)."""
    try:
        return next(steps)
    except StopIteration:
        raise
    except Exception as e:  # a corrupt shard under on_error=raise, an id outside the vocabulary
        return e


def _lr(cfg: RunConfig, step: int) -> float:
    t = cfg.train
    return lr_at(
        step,
        lr=t.lr,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        min_lr_ratio=t.min_lr_ratio,
        decay_frac=t.decay_frac,
    )


def _announce(cfg: RunConfig, where: Dist, n_params: tuple[int, int], state: TrainState, asked_precision: str) -> str:
    n_params, n_trained = n_params
    t, arithmetic = cfg.train, cfg.batch_arithmetic(where.world_size)
    precision = f"{t.precision} (train.precision=auto)" if asked_precision == "auto" else t.precision
    lora = f" (LoRA rank {t.lora.rank} trains {n_trained / 1e6:.2f}M)" if t.lora.rank else ""
    return (
        f"{cfg.engine} engine on {where.world_size} × {where.device.type}, {precision}, {n_params / 1e6:.2f}M "
        f"parameters{lora}\nglobal batch {arithmetic['global_batch']} rows = micro batch {t.micro_batch} × "
        f"accumulation {t.grad_accum} × {where.world_size} rank(s); {arithmetic['tokens_per_step']:,} tokens per step; "
        f"steps {state.step + 1}..{t.max_steps}"
    )


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}
