"""python benchmarks/bench_train.py [--preset tiny|125m|...] [--seq-len 512] [--batch 8] [--compile off|crucible|both]
    [--ac none|full|selective]

One training step, side by side: Crucible's Decoder with its chunked loss and the engine's
AdamW step (training.engine.TorchEngine, engine single) against transformers'
LlamaForCausalLM with its own loss and the same torch AdamW, built from the same ModelConfig
(model/hf.py), starting from the same weights and fed the same batches.

Throughput: after warm-up the two sides alternate step by step in this one process, so drift
of the machine (frequency, other load) falls on both alike; tokens/s is the steps' tokens over
their summed wall time (CUDA synchronised around each step).

`--compile crucible` compares Crucible as a user runs it with `train.compile=true` (each block
compiled) against transformers as its Trainer runs by default (eager); `--compile both` compiles
the whole LlamaForCausalLM too.

`--ac full|selective` turns on Crucible's activation checkpointing (train.activation_checkpointing)
and transformers' gradient checkpointing (`activation_checkpointing_enable`, which recomputes
whole decoder layers: the counterpart of "full").

Peak memory: each side runs its steps again in a fresh subprocess, which reports its peak above
what it held before its model was built: weights, gradients, optimizer state and activations.
On CUDA that is torch.cuda.max_memory_allocated; on CPU the peak RSS (allocator slack included).

The last line printed is `speedup_vs_hf=<x.xx> peak_mem_ratio_vs_hf=<y.yy>` (Crucible over
transformers: tokens/s, and peak memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig, preset  # noqa: E402
from model.decoder import RECOMPUTE_MODES, Decoder  # noqa: E402
from model.hf import config_to_hf, state_dict_to_hf  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.engine import Dist, TorchEngine  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402
from training.optim import FUSED_ADAMW_DEVICES, param_groups  # noqa: E402

SIDES = ("crucible", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (model/config.py)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per side first (at least 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument(
        "--compile",
        choices=("off", "crucible", "both"),
        default="off",
        help="torch.compile: neither side, Crucible only (train.compile=true against transformers as Trainer "
        "runs it by default), or both",
    )
    parser.add_argument(
        "--ac",
        choices=RECOMPUTE_MODES,
        default="none",
        help="activation checkpointing: Crucible's mode; transformers' gradient checkpointing unless none",
    )
    parser.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)  # the CPU memory subprocess
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must each be at least 1")  # the first loss is checked in warm-up
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def model_config(args) -> ModelConfig:
    overrides = {"max_seq_len": max(args.seq_len, 16)}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return preset(args.preset, **overrides)


def batches(args, cfg: ModelConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (tokens, labels) pairs of random ids; labels are the next tokens (aligned)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
        out.append((ids[:, :-1].contiguous().to(args.device), ids[:, 1:].contiguous().to(args.device)))
    return out


class CrucibleSide:
    """Decoder + chunked loss + TorchEngine's step (clip by global norm, AdamW)."""

    def __init__(self, cfg: ModelConfig, state: dict, args):
        run = RunConfig()
        run.engine, run.train.precision, run.train.compile = "single", args.precision, args.compile != "off"
        run.train.activation_checkpointing = args.ac
        device = torch.device(args.device)
        model = Decoder(cfg)
        model.load_state_dict(state)
        self.engine = TorchEngine(model.to(device), run, Dist(rank=0, world_size=1, local_rank=0, device=device))
        self.lr = run.train.lr

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.engine.forward_context():
            loss_sum, count = self.engine.model(tokens, labels=labels)
        loss = loss_sum / count
        self.engine.backward(loss, last=True)
        self.engine.step(self.lr)
        return loss.detach()


def hf_llama(cfg: ModelConfig, state: dict):
    """LlamaForCausalLM (SDPA attention) with the Decoder weights `state`, through model/hf.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    missing, unexpected = model.load_state_dict(state_dict_to_hf(state, cfg), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(f"weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()  # a tied lm_head is the embedding, as in Crucible's Decoder
    return model


class HFSide:
    """LlamaForCausalLM + its loss (logits upcast to fp32) + the same AdamW and clipping, as
    transformers' Trainer runs them."""

    def __init__(self, cfg: ModelConfig, state: dict, args):
        self.model = hf_llama(cfg, state)
        self.model.config.use_cache = False  # as Trainer sets it: no KV cache copied in training
        self.model.to(args.device).train()
        if args.ac != "none":
            kwargs = {"use_reentrant": False}  # both recompute whole decoder layers
            if hasattr(self.model, "activation_checkpointing_enable"):  # its name since transformers 5
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if args.compile == "both":
            self.model = torch.compile(self.model)
        run = RunConfig().train
        # training.optim's groups and fused AdamW; the (tied) embedding is undecayed under its HF name too
        groups = param_groups(self.model, run.weight_decay)
        embedding = self.model.get_input_embeddings().weight
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not embedding]
        groups[-1]["params"].append(embedding)
        fused = torch.device(args.device).type in FUSED_ADAMW_DEVICES
        self.optimizer = torch.optim.AdamW(groups, lr=run.lr, betas=run.betas, eps=run.eps, fused=fused)
        self.clip = run.grad_clip
        self.autocast = args.precision == "bf16"
        self.device_type = torch.device(args.device).type

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=tokens, labels=labels, shift_labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build(side: str, cfg: ModelConfig, state: dict, args):
    return (CrucibleSide if side == "crucible" else HFSide)(cfg, state, args)


def initial_state(cfg: ModelConfig) -> dict:
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.init_weights()
    return model.state_dict()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(sides: dict, data: list, args) -> dict[str, list[float]]:
    """Warm up each side, then time them step by step in turn; seconds per step by side.

    The first step's losses must agree (same weights, same batch): the two do the same work."""
    first = {name: [float(runner.step(t, y)) for t, y in data[: args.warmup]][0] for name, runner in sides.items()}
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2
    if abs(first["crucible"] - first["hf"]) > tolerance * abs(first["hf"]):
        raise SystemExit(f"the first losses differ: {first}; the two sides are not doing the same work")
    print(f"first-step loss: crucible {first['crucible']:.6f}, hf {first['hf']:.6f}", flush=True)
    _sync(args.device)
    times = {name: [] for name in sides}
    for tokens, labels in data[args.warmup :]:
        for name, runner in sides.items():
            started = time.perf_counter()
            runner.step(tokens, labels)
            _sync(args.device)
            times[name].append(time.perf_counter() - started)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory(side: str, argv: list[str]) -> int:
    """Peak memory of `side`'s steps, measured in a fresh subprocess (measure_memory_here) run
    with this run's arguments `argv`."""
    done = subprocess.run([sys.executable, __file__, *argv, "--memory-of", side], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the memory run of {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure_memory_here(args) -> None:
    """The subprocess of peak_memory: build one side, run its steps, print its peak."""
    cfg = model_config(args)
    data = batches(args, cfg, args.warmup + args.steps)
    state = initial_state(cfg)  # on CPU in both sides' processes alike: measured from here on
    import transformers.models.llama.modeling_llama  # noqa: F401  (both sides: not the HF side's import)

    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    runner = build(args.memory_of, cfg, state, args)
    for tokens, labels in data:
        runner.step(tokens, labels)
    _sync(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - before}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_of:
        measure_memory_here(args)
        return 0
    torch.manual_seed(0)
    cfg = model_config(args)
    state = initial_state(cfg)
    data = batches(args, cfg, args.warmup + args.steps)
    tokens_per_step = args.batch * args.seq_len
    n_params = sum(v.numel() for v in state.values())
    print(
        f"{args.preset}: {n_params / 1e6:.1f}M parameters (vocab {cfg.vocab_size}), seq_len {args.seq_len}, "
        f"batch {args.batch}, {args.precision} on {args.device}, compile={args.compile}, ac={args.ac}, "
        f"{args.steps} steps per side after {args.warmup} warm-up, torch {torch.__version__}",
        flush=True,
    )
    sides = {name: build(name, cfg, state, args) for name in SIDES}
    times = alternate(sides, data, args)
    speed = {name: tokens_per_step * len(t) / sum(t) for name, t in times.items()}
    del sides
    memory = {name: peak_memory(name, sys.argv[1:] if argv is None else argv) for name in SIDES}
    for name in SIDES:
        print(
            f"{name:9s} {speed[name]:12,.0f} tokens/s  (median step {statistics.median(times[name]) * 1e3:8.1f} ms)  "
            f"peak memory {memory[name] / 2**20:9,.1f} MiB"
        )
    ratio = memory["crucible"] / memory["hf"]
    print(f"speedup_vs_hf={speed['crucible'] / speed['hf']:.2f} peak_mem_ratio_vs_hf={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
