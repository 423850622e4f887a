"""python benchmarks/bench_train.py [--preset tiny|125m|... | --init-from HF_FOLDER] [--seq-len 512] [--batch 8]
    [--prompt-frac 0.5] [--compile off|crucible|both] [--ac none|full|selective]
python benchmarks/bench_train.py --make-qwen2-0.5b DIR

One training step, side by side: Crucible's Decoder with its chunked loss and the engine's
AdamW step (training.engine.TorchEngine, engine single) against transformers'
LlamaForCausalLM with its own loss and the same torch AdamW, built from the same ModelConfig
(model/hf.py), starting from the same weights and fed the same batches.

`--init-from HF_FOLDER` takes the model from a Hugging Face folder instead: Crucible's side
through model.hf.load_hf, transformers' as `AutoModelForCausalLM.from_pretrained(folder)` (a
Qwen2 folder gives Qwen2ForCausalLM), both in fp32. `--make-qwen2-0.5b DIR` writes such a folder
with Qwen2.5-0.5B's shapes and random weights (nothing is downloaded), then exits.

Batches are random ids. `--prompt-frac F` makes them SFT batches: the first F of each row's
labels are IGNORE_INDEX, as a prompt's are (default 0: every position trained, as in pretraining).

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
import importlib
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
from model.hf import config_to_hf, load_hf, save_hf, state_dict_to_hf  # noqa: E402
from model.loss import IGNORE_INDEX  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.engine import Dist, TorchEngine  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402
from training.optim import FUSED_ADAMW_DEVICES, param_groups  # noqa: E402

SIDES = ("crucible", "hf")
QWEN2_0_5B = ModelConfig(
    vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, norm_eps=1e-6,
    rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True, arch="qwen2",
)  # fmt: skip
"""The shapes of Qwen/Qwen2.5-0.5B's config.json (494M parameters, 136M of them the tied embedding)."""


def arg_parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    """This benchmark's command line, for `parse_args` (bench_lora.py adds its flags to it)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (model/config.py; default tiny)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--init-from", metavar="HF_FOLDER", help="the model of a Hugging Face folder, not a preset")
    parser.add_argument(
        "--make-qwen2-0.5b", metavar="DIR", dest="make_qwen2", help="write a random Qwen2.5-0.5B-shaped folder, exit"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument(
        "--prompt-frac", type=float, default=0.0, help="share of each row's first labels masked, as an SFT prompt's"
    )
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
    parser.add_argument("--memory-of", choices=SIDES, help=argparse.SUPPRESS)  # the memory subprocess
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check `argv` with `parser` (default: `arg_parser()`)."""
    parser = parser or arg_parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must each be at least 1")  # the first loss is checked in warm-up
    if args.init_from and (args.preset or args.vocab):
        parser.error("--init-from takes the model's shapes from its folder: leave out --preset and --vocab")
    if not 0 <= args.prompt_frac < 1:
        parser.error("--prompt-frac must be at least 0 and below 1 (some label must be trained)")
    args.preset = None if args.init_from else args.preset or "tiny"
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def model_config(args) -> ModelConfig:
    overrides = {"max_seq_len": max(args.seq_len, 16)}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    return preset(args.preset, **overrides)


def batches(args, cfg: ModelConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (tokens, labels) pairs of random ids; labels are the next tokens (aligned), the first
    `args.prompt_frac` of each row IGNORE_INDEX."""
    g = torch.Generator().manual_seed(1)
    prompt = int(args.prompt_frac * args.seq_len)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, :prompt] = IGNORE_INDEX
        out.append((ids[:, :-1].contiguous().to(args.device), labels.to(args.device)))
    return out


class CrucibleSide:
    """Decoder + chunked loss + TorchEngine's step (clip by global norm, AdamW)."""

    def __init__(self, cfg: ModelConfig, state: dict, args):
        run = RunConfig()
        run.engine, run.train.precision, run.train.compile = "single", args.precision, args.compile != "off"
        run.train.activation_checkpointing = args.ac
        device = torch.device(args.device)
        model = self.make_model(cfg, state, args)
        self.engine = TorchEngine(model.to(device), run, Dist(rank=0, world_size=1, local_rank=0, device=device))
        self.lr = run.train.lr

    def make_model(self, cfg: ModelConfig, state: dict, args) -> Decoder:
        """The Decoder with the weights `state`, on the CPU."""
        model = Decoder(cfg)
        model.load_state_dict(state)
        return model

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


def hf_pretrained(folder: str, dtype: torch.dtype = torch.float32):
    """The folder's model as transformers loads it (AutoModelForCausalLM, SDPA attention, in `dtype`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")


class HFSide:
    """LlamaForCausalLM (or the HF folder's CausalLM class) + its loss (logits upcast to fp32) +
    the same AdamW and clipping, as transformers' Trainer runs them."""

    def __init__(self, cfg: ModelConfig, state: dict, args):
        self.model = self.make_model(cfg, state, args)
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
        self.optimizer = self.make_optimizer(args)
        self.clip = RunConfig().train.grad_clip
        self.autocast = args.precision == "bf16"
        self.device_type = torch.device(args.device).type

    def make_model(self, cfg: ModelConfig, state: dict, args):
        """The HF folder's model, or LlamaForCausalLM with the Decoder weights `state`; fp32, on the CPU."""
        return hf_pretrained(args.init_from) if args.init_from else hf_llama(cfg, state)

    def make_optimizer(self, args) -> torch.optim.AdamW:
        """training.optim's groups and fused AdamW; the (tied) embedding is undecayed under its HF name too."""
        run = RunConfig().train
        groups = param_groups(self.model, run.weight_decay)
        embedding = self.model.get_input_embeddings().weight
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not embedding]
        groups[-1]["params"].append(embedding)
        fused = torch.device(args.device).type in FUSED_ADAMW_DEVICES
        return torch.optim.AdamW(groups, lr=run.lr, betas=run.betas, eps=run.eps, fused=fused)

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


def source(args) -> tuple[ModelConfig, dict]:
    """The model both sides start from: (config, Crucible state dict), from the HF folder
    (in fp32) or the preset (random)."""
    if not args.init_from:
        cfg = model_config(args)
        return cfg, initial_state(cfg)
    model, cfg = load_hf(args.init_from, dtype=torch.float32)
    if cfg.context_len < args.seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than {args.init_from}'s context ({cfg.context_len})")
    return cfg, model.state_dict()


def make_hf_folder(cfg: ModelConfig, out: str | Path) -> Path:
    """A Hugging Face folder of `cfg`'s shapes with random weights (init_weights, and the q/k/v
    biases drawn like the weights: init_weights leaves them zero, a trained model's are not).

    Args:
        cfg: the shapes (e.g. QWEN2_0_5B).
        out: the folder to write (created).
    Returns:
        out, which load_hf and AutoModelForCausalLM both read.
    """
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=cfg.init_std)
    return save_hf(model, cfg, out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(sides: dict, data: list, args) -> dict[str, list[float]]:
    """Warm up each side, then time them step by step in turn; seconds per step by side.

    The first step's losses must agree (same weights, same batch): the two do the same work."""
    first = {name: [float(runner.step(t, y)) for t, y in data[: args.warmup]][0] for name, runner in sides.items()}
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2
    difference = abs(first["crucible"] - first["hf"])
    if difference > tolerance * abs(first["hf"]):
        raise SystemExit(f"the first losses differ: {first}; the two sides are not doing the same work")
    print(f"first-step loss: crucible {first['crucible']:.6f}, hf {first['hf']:.6f}", end=" ")
    print(f"(difference {difference:.1e})", flush=True)
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


def peak_memory(side: str, argv: list[str], script: str | Path = __file__) -> int:
    """Peak memory of `side`'s steps, measured in a fresh subprocess of `script` (whose main calls
    measure_memory_here) run with this run's arguments `argv`."""
    done = subprocess.run([sys.executable, str(script), *argv, "--memory-of", side], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the memory run of {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def measure_memory_here(args, build=build) -> None:
    """The subprocess of peak_memory: build one side with `build`, run its steps, print its peak."""
    cfg, state = source(args)  # on CPU in both sides' processes alike: measured from here on
    # load_hf maps much of a folder's weights from its files: read them in before the baseline,
    # or the Crucible side, which copies them, would count those pages too (~1 GiB at Qwen2-0.5B).
    for tensor in state.values():
        tensor.sum()
    data = batches(args, cfg, args.warmup + args.steps)
    # Both sides import the HF model's code before the baseline: it is not the HF side's memory.
    arch = config_to_hf(cfg)["model_type"]
    importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    importlib.import_module("transformers.models.auto.modeling_auto")

    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    runner = build(args.memory_of, cfg, state, args)
    for tokens, labels in data:
        runner.step(tokens, labels)
    _sync(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak - before}))


def main(argv: list[str] | None = None) -> int:
    return benchmark(parse_args(argv), argv, build, __file__)


def benchmark(args, argv: list[str] | None, build, script: str | Path, setting: str = "") -> int:
    """The benchmark: `--memory-of`'s subprocess, `--make-qwen2-0.5b`, or the comparison.

    Args:
        args: parsed by `parse_args`.
        argv: the command line (None: sys.argv), passed on to the memory subprocesses.
        build: (side, cfg, state, args) → an object whose step(tokens, labels) runs one
            optimizer step and returns the loss.
        script: the file whose main this is (run again as the memory subprocess).
        setting: appended to the first line printed (what else the sides share).
    Returns:
        the exit status.
    """
    if args.memory_of:
        measure_memory_here(args, build)
        return 0
    if args.make_qwen2:
        print(f"wrote {make_hf_folder(QWEN2_0_5B, args.make_qwen2)} (Qwen2.5-0.5B's shapes, random weights)")
        return 0
    torch.manual_seed(0)
    cfg, state = source(args)
    data = batches(args, cfg, args.warmup + args.steps)
    tokens_per_step = args.batch * args.seq_len
    n_params = sum(v.numel() for v in state.values())
    model = args.preset if args.preset else f"{args.init_from} ({config_to_hf(cfg)['architectures'][0]})"
    print(
        f"{model}: {n_params / 1e6:.1f}M parameters (vocab {cfg.vocab_size}), seq_len {args.seq_len}, "
        f"batch {args.batch}, prompt_frac {args.prompt_frac}, {args.precision} on {args.device}{setting}, "
        f"compile={args.compile}, ac={args.ac}, {args.steps} steps per side after {args.warmup} warm-up, "
        f"torch {torch.__version__}",
        flush=True,
    )
    sides = {name: build(name, cfg, state, args) for name in SIDES}
    del state  # each side holds its own copy
    times = alternate(sides, data, args)
    speed = {name: tokens_per_step * len(t) / sum(t) for name, t in times.items()}
    del sides
    memory = {name: peak_memory(name, sys.argv[1:] if argv is None else argv, script) for name in SIDES}
    for name in SIDES:
        ms = [t * 1e3 for t in times[name]]
        print(
            f"{name:9s} {speed[name]:12,.1f} tokens/s  (step median {statistics.median(ms):,.1f} ms, "
            f"{min(ms):,.1f}–{max(ms):,.1f})  peak memory {memory[name] / 2**20:9,.1f} MiB"
        )
    ratio = memory["crucible"] / memory["hf"]
    print(f"speedup_vs_hf={speed['crucible'] / speed['hf']:.2f} peak_mem_ratio_vs_hf={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
