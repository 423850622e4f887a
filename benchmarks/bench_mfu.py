"""python benchmarks/bench_mfu.py [--preset 1b] [--seq-len 2048 4096] [--compile both]
    [--ac none selective full] [--loss chunked full]

Model FLOPs utilisation (MFU) of one training step of a preset on one GPU, over a matrix of
variants: sequence length × torch.compile (per block) × activation checkpointing × the chunked
loss (or full logits and `model.loss.causal_lm_loss`). The goal is 50% for the 1b preset on
one H100 in bf16.

Each variant runs the real path: a fresh `Decoder` (built on the meta device, initialised on
the GPU) inside `training.engine.TorchEngine` (engine "single": bf16 autocast, compile and
activation checkpointing applied by `parallelize`, fused AdamW, clipping in `engine.step`),
fed random token batches from a seeded generator.

Figures per variant, after the warm-up steps (which also compile):
  tokens/s   the measured steps' tokens over their wall time, CUDA-synchronised at both ends
  TFLOP/s    tokens/s × Decoder.num_flops_per_token(seq_len) / 1e12: model FLOPs (6N plus
             attention, PaLM appendix B); recomputation under checkpointing is not counted
  MFU        TFLOP/s over the device's dense bf16 peak (989 for an H100 SXM; --peak-tflops)
  memory     torch.cuda.max_memory_allocated, reset for each variant
A variant that runs out of memory is reported as OOM and the rest go on.

The output is a markdown table, one row per variant, under a line naming the device, torch,
dtype and date, ready for benchmarks/RESULTS.md. Without a CUDA GPU it prints one line and exits
with status 2; `--device cpu --preset tiny` is a smoke run of the same code (MFU then n/a unless
--peak-tflops is given, memory n/a).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ModelConfig, preset  # noqa: E402
from model.decoder import RECOMPUTE_MODES, Decoder  # noqa: E402
from model.loss import causal_lm_loss  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.engine import Dist, TorchEngine  # noqa: E402

NO_GPU = "bench_mfu needs a CUDA GPU; none is visible here — no figures (see RESULTS.md)"
TOKENS_PER_STEP = 16384
"""Default rows per step are chosen so that each step holds about this many tokens."""

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched
# against torch.cuda.get_device_name in this order. "H100 80GB HBM3" is how the SXM part names itself.
PEAK_BF16_TFLOPS = (
    (("H200",), 989.0),
    (("H100", "HBM3"), 989.0),
    (("H100", "SXM"), 989.0),
    (("H100", "PCIe"), 756.0),
    (("A100",), 312.0),
)


@dataclass
class Variant:
    seq_len: int
    batch: int
    compile: bool
    ac: str  # activation checkpointing: one of model.decoder.RECOMPUTE_MODES
    loss: str  # "chunked" (Decoder.forward with labels) or "full" (logits, then causal_lm_loss)


@dataclass
class Result:
    tokens_per_s: float
    peak_bytes: int | None  # None on CPU
    skipped_steps: int  # measured steps whose optimizer step was skipped (non-finite gradients)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    both = ("off", "on", "both")
    parser.add_argument("--preset", default="1b", help="model preset (model/config.py)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--compile", choices=both, default="both", help="torch.compile each block")
    parser.add_argument(
        "--ac",
        choices=RECOMPUTE_MODES,
        nargs="+",
        default=["none", "selective"],
        help="activation checkpointing modes (train.activation_checkpointing)",
    )
    parser.add_argument("--loss", choices=("chunked", "full"), nargs="+", default=["chunked", "full"])
    parser.add_argument("--batch", type=int, default=None, help=f"rows per step (default: {TOKENS_PER_STEP} tokens)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant first (at least 1)")
    parser.add_argument("--device", default="cuda", help="cuda (the default), or cpu for a smoke run")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by device name)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def check_device(args: argparse.Namespace) -> str | None:
    """Why this run cannot go ahead (one line), or None."""
    if args.device == "cpu":
        return None if args.preset == "tiny" else "--device cpu is a smoke run: give it with --preset tiny"
    if not args.device.startswith("cuda"):
        return f"--device {args.device}: use cuda, or cpu with --preset tiny for a smoke run"
    if not torch.cuda.is_available():
        return NO_GPU
    return None


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str | None]:
    """(the device's dense bf16 peak in TFLOP/s or None on CPU, an error line or None)."""
    if args.peak_tflops is not None:
        return args.peak_tflops, None
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    tflops = peak_for_name(name)
    if tflops is None:
        return None, f"no bf16 peak is known for {name!r}: pass --peak-tflops (its dense bf16 TFLOP/s)"
    return tflops, None


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a CUDA device by its name, or None if it is not in the table."""
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(w.lower() in name.lower() for w in words):
            return tflops
    return None


def variants(args: argparse.Namespace) -> list[Variant]:
    """The requested matrix, in the order of the table."""
    flags = {"off": [False], "on": [True], "both": [False, True]}
    out = []
    for seq_len in args.seq_len:
        batch = args.batch or max(1, TOKENS_PER_STEP // seq_len)
        for compiled in flags[args.compile]:
            for ac in args.ac:
                out.extend(Variant(seq_len, batch, compiled, ac, loss) for loss in args.loss)
    return out


def build_engine(cfg: ModelConfig, v: Variant, args: argparse.Namespace, device: torch.device) -> TorchEngine:
    """A freshly initialised Decoder in the single engine, as the training loop builds it."""
    run = RunConfig()
    run.engine, run.train.precision = "single", args.precision
    run.train.compile, run.train.activation_checkpointing = v.compile, v.ac
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device=device)
    torch.manual_seed(run.train.seed)
    model.init_weights()
    return TorchEngine(model, run, Dist(rank=0, world_size=1, local_rank=0, device=device))


def batches(cfg: ModelConfig, v: Variant, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (tokens, labels) pairs of random ids from a seeded generator; labels are the next tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (v.batch, v.seq_len + 1), generator=g)
        out.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))
    return out


def train_step(engine: TorchEngine, tokens: torch.Tensor, labels: torch.Tensor, loss: str, lr: float) -> torch.Tensor:
    """One optimizer step (forward, loss, backward, clip, AdamW), queued without waiting for the
    device; whether it was applied, as a 0-d tensor on the device."""
    with engine.forward_context():
        if loss == "chunked":
            loss_sum, count = engine.model(tokens, labels=labels)
        else:
            loss_sum, count = causal_lm_loss(engine.model(tokens), labels)
    engine.backward(loss_sum / count, last=True)
    applied, _ = engine.step(lr)
    return applied


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: ModelConfig, v: Variant, args: argparse.Namespace, device: torch.device) -> Result:
    """Build, warm up (compiling, if asked) and time one variant."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = build_engine(cfg, v, args, device)
    lr = engine.cfg.train.lr
    data = batches(cfg, v, args.warmup + args.steps, device)
    for tokens, labels in data[: args.warmup]:
        train_step(engine, tokens, labels, v.loss, lr)
    _sync(device)
    started = time.perf_counter()
    applied = [train_step(engine, tokens, labels, v.loss, lr) for tokens, labels in data[args.warmup :]]
    _sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Result(v.batch * v.seq_len * args.steps / seconds, peak, sum(not bool(a) for a in applied))


def release(device: torch.device, compiled: bool) -> None:
    """Free what the last variant held, and its compiled graphs, before the next one is built."""
    if compiled:
        torch.compiler.reset()  # a fresh cache per variant: no recompile limit carried over
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table_header(args: argparse.Namespace, model: Decoder, device: torch.device, peak: float | None) -> str:
    cfg, n_params = model.cfg, model.num_params()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    dtype = "bf16 autocast (fp32 weights)" if args.precision == "bf16" else "fp32"
    peak_text = f"peak {peak:g} TFLOP/s dense bf16" if peak else "no peak given (MFU n/a)"
    return (
        f"bench_mfu · {args.preset} ({n_params / 1e6:,.1f}M parameters, vocab {cfg.vocab_size}) · {where} · "
        f"torch {torch.__version__} · {dtype} · {datetime.date.today().isoformat()} · "
        f"{args.steps} steps after {args.warmup} warm-up · {peak_text}\n\n"
        "| seq_len | batch | compile | act. ckpt | loss | tokens/s | TFLOP/s | MFU | peak memory |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )


def table_row(v: Variant, r: Result | None, flops_per_token: int, peak: float | None) -> str:
    """One markdown row; `r` None means the variant ran out of memory."""
    cells = [str(v.seq_len), str(v.batch), "on" if v.compile else "off", v.ac, v.loss]
    if r is None:
        return "| " + " | ".join(cells + ["OOM"] * 4) + " |"
    achieved = r.tokens_per_s * flops_per_token / 1e12
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
    memory = f"{r.peak_bytes / 2**30:.2f} GiB" if r.peak_bytes is not None else "n/a"
    return "| " + " | ".join(cells + [f"{r.tokens_per_s:,.0f}", f"{achieved:.4g}", mfu, memory]) + " |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_device(args)
    device = torch.device(args.device)
    peak, peak_problem = peak_tflops(args, device) if problem is None else (None, None)
    if problem or peak_problem:
        print(problem or peak_problem, file=sys.stderr)
        return 2
    cfg = preset(args.preset, max_seq_len=max(args.seq_len))
    with torch.device("meta"):
        shapes = Decoder(cfg)  # for its parameter count and FLOPs per token only
    print(table_header(args, shapes, device, peak), flush=True)
    notes = []
    for v in variants(args):
        try:
            result = measure(cfg, v, args, device)
        except torch.OutOfMemoryError:
            result = None
        release(device, v.compile)  # outside the except block, so the traceback's frames are gone
        print(table_row(v, result, shapes.num_flops_per_token(v.seq_len), peak), flush=True)
        if result is not None and result.skipped_steps:
            notes.append(f"{v}: {result.skipped_steps} measured steps skipped (non-finite)")
    for note in notes:
        print(f"\nnote: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
