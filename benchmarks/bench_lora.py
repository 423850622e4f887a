"""python benchmarks/bench_lora.py [--preset tiny|125m|... | --init-from HF_FOLDER] [--seq-len 512] [--batch 8]
    [--rank 16] [--alpha 32] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
    [--prompt-frac 0.5] [--precision fp32|bf16] [--compile off|crucible|both] [--ac none|full|selective]
python benchmarks/bench_lora.py --make-qwen2-0.5b DIR

One LoRA fine-tuning step, side by side: Crucible's Decoder with model/lora.py's adapters
(`apply_lora`: the fused q/k/v and gate/up projections keep their one base matmul each) and
the engine's step (training.engine.TorchEngine, engine single: clipping, then training.optim's
fused AdamW, which sees only the adapters since the base no longer requires grad) against
transformers' CausalLM wrapped by peft (`get_peft_model` with a LoraConfig of the same rank,
alpha and targets, dropout 0) with transformers' own loss and the same AdamW (build_optimizer
over the same adapter tensors: same groups, lr, betas, eps, weight decay, fused) and clipping.

Both start from the same base, built as in bench_train.py (a preset with random weights, or
`--init-from HF_FOLDER`), and from the same adapters: A drawn as peft draws it (kaiming-uniform)
and B from N(0, 0.02²) instead of peft's zeros, so that the first step's gradients reach every
A and B (with B = 0, no A gets a gradient). The adapters are made under peft's keys once, copied
into Crucible's model by key and into peft's by `set_peft_model_state_dict`. Both sides freeze
the whole base, the (tied) embedding included.

Precision, the same on both sides: fp32 on the CPU (the default there). With `--precision bf16`
(the default on CUDA) each base is held in bf16 (Crucible's Decoder cast before `apply_lora`;
transformers' model loaded or cast to bf16), the adapters stay in fp32 (model/lora.py makes them
so; peft's `autocast_adapter_dtype` does) and each step runs under torch.autocast(bf16).

Everything else is bench_train.py's and reused from it: `--make-qwen2-0.5b DIR` writes a random
Qwen2.5-0.5B-shaped folder for `--init-from`; the first-step losses must agree (their difference
is printed); after warm-up the two sides alternate step by step in this one process; peak memory
is measured for each side in a fresh subprocess (CUDA: max_memory_allocated; CPU: peak RSS above
what it held before its model was built).

The last line printed is `speedup_vs_hf=<x.xx> peak_mem_ratio_vs_hf=<y.yy>` (Crucible over
transformers + peft: tokens/s, and peak memory).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import peft  # imported here, before the memory subprocess's baseline, on both sides alike
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_train  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.decoder import Decoder  # noqa: E402
from model.hf import read_hf_config  # noqa: E402
from model.lora import TARGETS, LoRAConfig, apply_lora, named_adapters  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.optim import build_optimizer  # noqa: E402

B_STD = 0.02
"""Standard deviation of the adapters' B at the start (peft's is 0, which would leave A without gradient)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_train.arg_parser(__doc__)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (the delta is scaled by alpha / r)")
    parser.add_argument(
        "--targets",
        type=lambda s: tuple(t.strip() for t in s.split(",")),
        default=TARGETS,
        help=f"comma-separated projections with adapters (default: {','.join(TARGETS)})",
    )
    args = bench_train.parse_args(argv, parser)
    try:
        lora_config(args)
    except ValueError as e:  # LoRAConfig names the field; say which flag sets it
        parser.error(f"--rank/--alpha/--targets: {e}")
    return args


def lora_config(args) -> LoRAConfig:
    return LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=0.0, targets=args.targets)


def base_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.precision == "bf16" else torch.float32


def initial_adapters(cfg: ModelConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters both sides start from, under peft's keys (fp32, on the CPU, seeded).

    A as peft's init (kaiming_uniform_ with a = √5: uniform within ±1/√in), B from N(0, B_STD²)."""
    with torch.device("meta"):  # only the keys and shapes
        model = apply_lora(Decoder(cfg), lora)
    g = torch.Generator().manual_seed(2)
    adapters = {}
    for key, p in named_adapters(model):
        if ".lora_A." in key:
            adapters[key] = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[1])
        else:
            adapters[key] = torch.randn(p.shape, generator=g) * B_STD
    return adapters


class CrucibleLoRASide(bench_train.CrucibleSide):
    """bench_train's Crucible side (chunked loss, TorchEngine's step) on a frozen base with adapters."""

    def make_model(self, cfg: ModelConfig, state: dict, args) -> Decoder:
        model = super().make_model(cfg, state, args).to(base_dtype(args))
        lora = lora_config(args)
        apply_lora(model, lora)
        adapters = initial_adapters(cfg, lora)
        with torch.no_grad():
            for key, p in named_adapters(model):
                p.copy_(adapters[key])
        return model


class PeftSide(bench_train.HFSide):
    """bench_train's transformers side (its loss, clipping, autocast) wrapped by peft, with
    training.optim's AdamW over peft's adapters."""

    def make_model(self, cfg: ModelConfig, state: dict, args):
        dtype = base_dtype(args)
        if args.init_from:
            base = bench_train.hf_pretrained(args.init_from, dtype)
        else:
            base = bench_train.hf_llama(cfg, state).to(dtype)
        lora = lora_config(args)
        config = peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets),
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = peft.get_peft_model(base, config)
        adapters = initial_adapters(cfg, lora)
        loaded = peft.set_peft_model_state_dict(model, adapters)
        missed = [k for k in loaded.missing_keys if ".lora_" in k]
        if loaded.unexpected_keys or missed:
            raise RuntimeError(f"peft did not take the adapters: unexpected {loaded.unexpected_keys}, missing {missed}")
        return model

    def make_optimizer(self, args) -> torch.optim.AdamW:
        t = RunConfig().train  # as TorchEngine builds Crucible's
        return build_optimizer(self.model, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)


def build(side: str, cfg: ModelConfig, state: dict, args):
    return (CrucibleLoRASide if side == "crucible" else PeftSide)(cfg, state, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lora = lora_config(args)
    setting = f", LoRA r={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}"
    if not (args.memory_of or args.make_qwen2):
        cfg = read_hf_config(args.init_from) if args.init_from else bench_train.model_config(args)
        n_trainable = sum(t.numel() for t in initial_adapters(cfg, lora).values())
        setting += f" ({n_trainable / 1e6:.2f}M trainable)"
    return bench_train.benchmark(args, argv, build, __file__, setting)


if __name__ == "__main__":
    sys.exit(main())
