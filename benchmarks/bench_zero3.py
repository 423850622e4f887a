"""python benchmarks/bench_zero3.py [--preset tiny] [--seq-len 256] [--batch 4] [--steps 10] [--warmup 2] [--rounds 2]

The full distributed training step on 2 CPU processes (gloo), side by side: Crucible's
`training.loop.train_step` over `training.engine.DeepSpeedEngine` (Decoder, chunked loss, global
target-count normalisation) against transformers' `Trainer.train()` on LlamaForCausalLM, both
under DeepSpeed ZeRO-3 from configs/zero3.json. Needs transformers' accelerate:
`pip install -e .[bench]`.

Same work on both sides: one ModelConfig and one set of initial weights (model/hf.py converts
them), the same random batches with rank r taking rows r·batch … of each step's global batch
(Trainer's sequential sampler, sharded by accelerate, hands out the same rows), fp32, micro
batch `--batch` per rank, no accumulation, clipping at train.grad_clip, AdamW with train.lr,
betas, eps and weight decay at a constant learning rate. Crucible fills the JSON's "auto" fields
with `training.deepspeed_config.deepspeed_config`, Trainer with its TrainingArguments; the two DeepSpeed
engines' resolved batch, clipping, precision and ZeRO settings are compared, and the first
step's loss must agree, or the benchmark stops. One difference is Trainer's own: it also decays
the (tied) embedding, which Crucible does not; that changes the weights after the first step,
not the work of a step.

Each side runs in a fresh pair of processes (two ZeRO-3 engines in one process would share
DeepSpeed's global state), and the sides alternate for --rounds rounds, so that drift of the
machine falls on both alike.

Throughput: tokens of all ranks over the wall time from the end of the last warm-up step to the
end of the last step (the slower rank); each side's median over the rounds, which one round
slowed by the machine does not move (this 2-core machine's speed drifts by tens of percent
over minutes).

Peak memory per rank: VmHWM (the peak RSS of the process image; not ru_maxrss, which keeps the
parent's size across fork and exec) above the RSS held once the libraries were imported and the
batches and initial weights made, i.e. the model, its gradients and optimizer state, the
activations and the framework's own buffers. The largest over ranks and rounds is reported.

The last line printed is `speedup_vs_hf=<x.xx> peak_mem_ratio_vs_hf=<y.yy>` (Crucible over
transformers: tokens/s, and peak memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import hf_llama, initial_state, model_config, rss_bytes  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.decoder import Decoder  # noqa: E402
from training.config import RunConfig, find_config_file  # noqa: E402
from training.engine import DeepSpeedEngine, Dist, free_port, init_distributed  # noqa: E402
from training.loop import train_step  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402

SIDES = ("crucible", "hf")
WORLD = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (model/config.py)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (at least 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of crucible then hf, each in fresh processes")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must each be at least 1")
    return args


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run config of both sides: ZeRO-3 from configs/zero3.json, fp32, no accumulation,
    a constant learning rate; the optimizer and clipping settings are RunConfig's defaults."""
    cfg = RunConfig(engine="deepspeed", deepspeed=json.loads(find_config_file("zero3.json").read_text()))
    cfg.data.seq_len = args.seq_len
    t = cfg.train
    t.precision, t.micro_batch, t.grad_accum = "fp32", args.batch, 1
    t.schedule, t.warmup_steps, t.max_steps = "constant", 0, args.warmup + args.steps
    return cfg


def global_batches(args: argparse.Namespace, cfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Each step's global batch (batch × WORLD rows) of random ids, as data_pipeline.stream
    yields them: labels aligned (the next tokens), positions 0..T-1, one document per row."""
    g = torch.Generator().manual_seed(1)
    rows, T = args.batch * WORLD, args.seq_len
    out = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (rows, T + 1), generator=g).numpy()
        out.append(
            {
                "tokens": ids[:, :-1].copy(),
                "labels": ids[:, 1:].copy(),
                "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), (rows, T)).copy(),
                "doc_ids": np.zeros((rows, T), np.int64),
            }
        )
    return out


def engine_settings(ds_engine) -> dict:
    """What must be equal between the two sides' DeepSpeed engines (JSON-comparable): the
    resolved config's batch, clipping, precision and ZeRO fields, and the client AdamW's groups."""
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
    settings = {k: ds_engine.config[k] for k in (*keys, "bf16", "fp16", "zero_optimization")}
    adamw = ds_engine.optimizer.optimizer  # the client optimizer inside ZeRO-3
    settings["optimizer"] = type(adamw).__name__
    hyper = ("lr", "betas", "eps", "weight_decay", "foreach", "fused")
    settings["groups"] = sorted(json.dumps([g[k] for k in hyper]) for g in adamw.param_groups)
    return settings


def run_crucible(args: argparse.Namespace, where: Dist, state: dict, batches: list[dict], clock: list[float]):
    """Crucible's real step: DeepSpeedEngine around the Decoder, training.loop.train_step.

    Returns:
        (the global mean loss of each step, the engine's settings).
    """
    cfg = run_config(args)
    model = Decoder(model_config(args))
    model.load_state_dict(state)
    engine = DeepSpeedEngine(model, cfg, where)
    b, r = args.batch, where.rank
    losses = []
    for batch in batches:
        mine = [{k: v[r * b : (r + 1) * b] for k, v in batch.items()}]  # one micro-batch per step
        result = train_step(engine, mine, cfg, where, cfg.train.lr)  # constant lr, as Trainer's
        losses.append(result.loss)
        clock.append(time.perf_counter())
    return losses, engine_settings(engine.model)


def run_hf(args: argparse.Namespace, where: Dist, state: dict, batches: list[dict], clock: list[float], out: Path):
    """transformers' Trainer.train() under the same ZeRO-3 JSON, its "auto" fields filled by
    Trainer from TrainingArguments.

    Returns:
        (this rank's loss of each step as Trainer backpropagates it, the engine's settings).
    """
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.append(time.perf_counter())

    losses: list[torch.Tensor] = []

    class LossKeepingTrainer(Trainer):
        """Trainer unchanged, keeping each micro-batch's loss."""

        def training_step(self, *args, **kwargs) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            losses.append(loss)
            return loss

    cfg = run_config(args)
    t = cfg.train
    model = hf_llama(model_config(args), state)
    # labels are already aligned; passing them as shift_labels stops the model shifting them again
    rows = [
        {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "shift_labels": torch.from_numpy(y)}
        for batch in batches
        for x, y in zip(batch["tokens"], batch["labels"], strict=True)
    ]
    targs = TrainingArguments(
        output_dir=str(out / "hf"),
        deepspeed=cfg.deepspeed,
        use_cpu=True,
        max_steps=len(batches),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=t.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",  # Trainer's default; training.optim builds the same fused AdamW on CPU
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_epsilon=t.eps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = LossKeepingTrainer(model=model, args=targs, train_dataset=rows, callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # it prints the run's summary metrics from rank 0
    trainer.train()
    return [float(loss) for loss in losses], engine_settings(trainer.model_wrapped)


def _worker(rank: int, side: str, args: argparse.Namespace, port: int, out: str) -> None:
    """One rank of one side: prepare alike, measure, write rank<r>.json into `out`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    # 2 ranks share the cores. The variable too: accelerate sets 2 threads per rank when it is unset.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # DeepSpeed's collectives call torch.distributed functions that torch 2.13 deprecates, with a
    # warning per call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    import transformers.trainer  # noqa: F401  (imported on both sides, so the memory baselines match)

    # As training.engine does: skip JIT-building DeepSpeed's inference-only shm all-reduce op.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    where = init_distributed(needs_group=True)  # the same gloo group for both sides
    batches = global_batches(args, model_config(args))
    state = initial_state(model_config(args))
    before, clock = rss_bytes(), []
    if side == "crucible":
        losses, settings = run_crucible(args, where, state, batches, clock)
    else:
        losses, settings = run_hf(args, where, state, batches, clock, Path(out))
    result = {"losses": losses, "clock": clock, "peak_bytes": peak_rss_bytes() - before, "settings": settings}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Run one side on WORLD fresh processes; its tokens/s, step times, first loss, peaks and settings."""
    with tempfile.TemporaryDirectory(prefix=f"bench_zero3_{side}_") as out:
        mp.start_processes(_worker, args=(side, args, free_port(), out), nprocs=WORLD, start_method="spawn")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    w = args.warmup
    # Crucible's loss is already the global mean; Trainer's is rank-local (sum / global count × WORLD)
    first = ranks[0]["losses"][0] if side == "crucible" else sum(r["losses"][0] for r in ranks) / WORLD
    seconds = max(r["clock"][-1] - r["clock"][w - 1] for r in ranks)
    return {
        "tokens_per_s": args.steps * args.batch * WORLD * args.seq_len / seconds,
        "step_ms": [1e3 * (b - a) for a, b in zip(ranks[0]["clock"][w - 1 :], ranks[0]["clock"][w:], strict=False)],
        "first_loss": first,
        "peaks": [r["peak_bytes"] for r in ranks],
        "settings": ranks[0]["settings"],
    }


def check_same_work(crucible: dict, hf: dict) -> None:
    """Stop unless both engines run the same DeepSpeed settings and the first losses agree."""
    if crucible["settings"] != hf["settings"]:
        differ = {k: (v, hf["settings"].get(k)) for k, v in crucible["settings"].items() if hf["settings"].get(k) != v}
        raise SystemExit(f"the two DeepSpeed engines differ (crucible, hf): {differ}")
    a, b = crucible["first_loss"], hf["first_loss"]
    if abs(a - b) > 1e-4 * abs(b):
        raise SystemExit(f"the first losses differ: crucible {a:.6f}, hf {b:.6f}; the sides do not do the same work")


def run_rounds(args: argparse.Namespace) -> dict[str, list[dict]]:
    """--rounds rounds of crucible then hf, printing each run and each round's speed ratio."""
    runs = {side: [] for side in SIDES}
    for round_ in range(1, args.rounds + 1):
        for side in SIDES:
            r = run_side(side, args)
            runs[side].append(r)
            peaks = ", ".join(f"{p / 2**20:,.0f}" for p in r["peaks"])
            print(
                f"round {round_} {side:8s} {r['tokens_per_s']:9,.0f} tokens/s  "
                f"(median step {statistics.median(r['step_ms']):7.1f} ms)  first loss "
                f"{r['first_loss']:.6f}  peak MiB per rank {peaks}",
                flush=True,
            )
        check_same_work(runs["crucible"][-1], runs["hf"][-1])
        ratio = runs["crucible"][-1]["tokens_per_s"] / runs["hf"][-1]["tokens_per_s"]
        print(f"round {round_} speed crucible/hf {ratio:.2f}")
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("transformers' Trainer needs the accelerate package: pip install -e .[bench]")
    cfg = model_config(args)
    n_params = sum(v.numel() for v in initial_state(cfg).values())
    print(
        f"{args.preset}: {n_params / 1e6:.1f}M parameters (vocab {cfg.vocab_size}), seq_len {args.seq_len}, "
        f"{WORLD} ranks × batch {args.batch}, fp32, ZeRO-3 (configs/zero3.json) on CPU/gloo; "
        f"{args.steps} steps per side and round after {args.warmup} warm-up, {args.rounds} round(s), "
        f"torch {torch.__version__}",
        flush=True,
    )
    runs = run_rounds(args)
    speed = {s: statistics.median(r["tokens_per_s"] for r in runs[s]) for s in SIDES}
    memory = {s: max(p for r in runs[s] for p in r["peaks"]) for s in SIDES}
    for side in SIDES:
        print(f"{side:8s} {speed[side]:9,.0f} tokens/s (median of rounds), peak {memory[side] / 2**20:,.0f} MiB")
    ratio = memory["crucible"] / memory["hf"]
    print(f"speedup_vs_hf={speed['crucible'] / speed['hf']:.2f} peak_mem_ratio_vs_hf={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
