"""LoRA (Hu et al. 2021) on the Decoder's projections, saved and loaded in PEFT's adapter format.

    apply_lora(model, cfg)            freeze the base; wrap the targeted projections in LoRALinear
    lora_parameters(model)            the adapters, the only parameters that train
    merge_lora(model)                 the base state dict with every adapter added in (for save_hf)
    adapters_disabled(model)          a context in which the model computes its base alone (a reference)
    save_adapter / load_adapter       a folder that `peft.PeftModel.from_pretrained` loads, and back

Crucible's own small layer rather than peft itself: peft wraps one nn.Linear per Hugging Face
projection, so using it would mean unfusing q/k/v and gate/up into seven Linears per block and
giving up the fused matmuls (and `model/` stays pure torch). LoRALinear keeps the fused base
weight under its old name and holds one A and one B per targeted projection, named as peft names
them, so a saved adapter is per projection and loads in peft unchanged. The parts' A products run
as one matmul; the B products as one more, against a block-diagonal B whose untargeted rows are
zero. With dropout > 0 the parts of one fused projection share a dropout mask (peft draws one per
projection): each adapter sees the same distribution, only the masks are correlated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.decoder import Decoder, seeded_rows
from model.decoder import initial_rows as decoder_initial_rows
from model.hf import block_projections

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Hugging Face projection names that LoRA can target."""
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
"""The HF submodule holding each projection (model.layers.{i}.<this>.<projection>)."""
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model.model.layers."
"""peft's key prefix for a CausalLM's layers (PeftModel → LoraModel → *ForCausalLM → model)."""


@dataclass
class LoRAConfig:
    rank: int = 8
    """r: the inner width of each adapter."""
    alpha: float = 16.0
    """The delta is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (not on the base projection's), as peft's lora_dropout."""
    targets: tuple[str, ...] = field(default=TARGETS)
    """The projections that get adapters, by Hugging Face name (a subset of TARGETS)."""

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"train.lora.rank={self.rank!r}: must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"train.lora.alpha={self.alpha!r}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"train.lora.dropout={self.dropout!r}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"train.lora.targets={list(self.targets)}: must be distinct names from {', '.join(TARGETS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )


class LoRALinear(nn.Module):
    """A frozen (possibly fused) Linear plus one adapter per targeted part of its output rows.

    The base weight and bias stay parameters of this module under the names `weight` and
    `bias`, so the model's state dict keeps its base keys; adapters are `lora_A.<part>` (rank, in)
    and `lora_B.<part>` (part rows, rank), in fp32 whatever the base's dtype. `enabled` (a plain
    attribute, see `adapters_disabled`) switches the adapters off without touching a parameter.
    """

    def __init__(self, base: nn.Linear, parts: tuple[tuple[str, int], ...], cfg: LoRAConfig):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.parts = parts
        self.targets = tuple(name for name, _ in parts if name in cfg.targets)
        self.rank, self.alpha, self.scale = cfg.rank, cfg.alpha, cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(device=base.weight.device, dtype=torch.float32)
        in_features = base.in_features  # (not weight.shape: a partitioned weight may hold no rows)
        self.lora_A = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(cfg.rank, in_features, **kw)) for n in self.targets}
        )
        rows = dict(parts)
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.empty(rows[n], cfg.rank, **kw)) for n in self.targets})
        self.enabled = True
        self.reset_adapters()

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """peft's init: A kaiming-uniform (a = √5, nn.Linear's), B zero, so the delta starts at 0."""
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.lora_B.values():
            nn.init.zeros_(b)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): every targeted part's A stacked (P·rank, in) and a block-diagonal B (out, P·rank)
        whose rows of an untargeted part are zero, so the delta is one matmul after another."""
        a = torch.cat([self.lora_A[n] for n in self.targets])
        empty = self.lora_A[self.targets[0]].new_zeros  # an untargeted part: rows, no columns
        b = torch.block_diag(*[self.lora_B[n] if n in self.lora_B else empty(rows, 0) for n, rows in self.parts])
        return a, b

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' output (..., out) for input x (..., in), in x's dtype; computed in the
        adapters' dtype (fp32), or under autocast in its dtype (peft casts the input the same way)."""
        if not self.enabled:
            # Zeros rather than skipping: the Decoder's FeedForward adds w2's delta itself.
            return x.new_zeros(*x.shape[:-1], sum(rows for _, rows in self.parts))
        a, b = self._stacked()
        return (F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b) * self.scale).to(x.dtype)

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        return base + self.lora_delta(x) if self.enabled else base


def initial_rows(model_cfg: ModelConfig, name: str, shape, start: int, stop: int, seed: int) -> torch.Tensor:
    """Rows [start, stop) of a parameter's initial value (see model.decoder.initial_rows), the
    adapters' as peft initialises them: A kaiming-uniform with a = √5 (uniform within
    ±1/√in_features), B zero, so that every adapter starts as a no-op."""
    if ".lora_B." in name:
        return torch.zeros(max(0, min(stop, shape[0]) - start), *shape[1:])
    if ".lora_A." in name:
        bound = 1 / math.sqrt(shape[1])
        return seeded_rows(name, shape, start, stop, seed, lambda t, g: t.uniform_(-bound, bound, generator=g))
    return decoder_initial_rows(model_cfg, name, shape, start, stop, seed)


def apply_lora(model: Decoder, cfg: LoRAConfig) -> Decoder:
    """Freeze every base parameter and wrap the targeted projections, in place.

    Args:
        model: a Decoder with its base weights (adapters go on each base weight's device).
        cfg: rank, alpha, dropout and targets.
    Returns:
        the same model; only `lora_parameters(model)` require grad.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already carries LoRA adapters")
    model.requires_grad_(False)
    for block in model.layers:
        for path, parts in block_projections(model.cfg).items():
            if not any(name in cfg.targets for name, _ in parts):
                continue
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), parts, cfg))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (what the optimizer gets)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (*m.lora_A.values(), *m.lora_B.values())]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which every LoRALinear of `model` computes its frozen base projection alone:
    the LoRA model's base as the reference of DPO or the KL term of GRPO (issue 20), without a
    second copy of the weights.

    Only a flag is set, which each LoRALinear reads in forward and in `lora_delta` (the Decoder's
    feed-forward calls that itself): parameters, their sharding (the modules, found by isinstance
    over `model.modules()`, stay the same objects under FSDP2's fully_shard and ZeRO-3) and the
    autograd graph outside the context are untouched. The flags are restored on exit, after an
    exception too; nesting is fine (each level restores what it found).

    Args:
        model: a model carrying LoRA adapters (after `apply_lora`).
    Returns:
        a context manager yielding `model`.
    Raises:
        ValueError: the model carries no adapters (its "base" would silently be the model itself).
    """
    modules = _lora_modules(model)
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, previous, strict=True):
            m.enabled = enabled


def peft_key(name: str) -> str:
    """A Crucible adapter name → peft's key: `layers.0.attn.wqkv.lora_A.q_proj` →
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, the key
    `PeftModel.save_pretrained` writes for a *ForCausalLM (without the adapter name "default",
    which peft strips)."""
    layers, i, _, _, kind, part = name.split(".")
    if layers != "layers" or kind not in ("lora_A", "lora_B") or part not in _MODULE:
        raise ValueError(f"{name!r} is not a LoRA adapter's name")
    return f"{_PEFT_PREFIX}{i}.{_MODULE[part]}.{part}.{kind}.weight"


def is_adapter(name: str) -> bool:
    """Whether a state-dict name is an adapter's (lora_A / lora_B of a LoRALinear)."""
    return ".lora_A." in name or ".lora_B." in name


def named_adapters(model: Decoder):
    """Yield (peft key, parameter) for every adapter tensor (see `peft_key`)."""
    for name, p in model.named_parameters():
        if is_adapter(name):
            yield peft_key(name), p


def adapter_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The adapters under peft's keys (see `peft_key`), detached."""
    return {key: p.detach() for key, p in named_adapters(model)}


@torch.no_grad()
def merge_lora(model: Decoder) -> dict[str, torch.Tensor]:
    """The base state dict with each adapter's delta added to its rows, under the base names, so
    that `model.hf.save_hf(model, cfg, path, state_dict=merge_lora(model))` writes a merged folder.

    Returns:
        {Crucible name: tensor} in each base weight's dtype (the sum is taken in fp32).
    """
    modules = _lora_modules(model)
    return merge_state_dict(model.state_dict(), model.cfg, LoRAConfig(modules[0].rank, modules[0].alpha))


@torch.no_grad()
def merge_state_dict(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, cfg: LoRAConfig, in_place: bool = False
) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict (base weights and adapters, Crucible names, as an engine
    gathers it) → the base names with every delta added to its weight's rows (scale · B @ A,
    summed in fp32, stored in the base weight's dtype). Only rank and alpha of `cfg` are used:
    the targets are the adapters present.

    Args:
        in_place: add the deltas into `state`'s own weights (a gathered copy the caller owns)
            rather than into copies: no second copy of the model.
    """
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    scale = cfg.alpha / cfg.rank
    for i in range(model_cfg.n_layers):
        for path, parts in block_projections(model_cfg).items():
            prefix = f"layers.{i}.{path}."
            if not any(f"{prefix}lora_A.{part}" in state for part, _ in parts):
                continue
            w = merged[prefix + "weight"] if in_place else merged[prefix + "weight"].clone()
            merged[prefix + "weight"], start = w, 0
            for part, rows in parts:
                a = state.get(f"{prefix}lora_A.{part}")
                if a is not None:
                    delta = (state[f"{prefix}lora_B.{part}"].float() @ a.float()) * scale
                    w[start : start + rows] = (w[start : start + rows].float() + delta.to(w.device)).to(w.dtype)
                start += rows
    return merged


def _lora_modules(model: Decoder) -> list[LoRALinear]:
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not modules:
        raise ValueError("the model carries no LoRA adapters: call apply_lora first")
    return modules


def save_adapter(model: Decoder, cfg: LoRAConfig, out_dir: str | Path, base_model_path: str | None = None) -> Path:
    """Write a peft LoRA adapter folder (see `write_adapter`) from a model after
    `apply_lora(model, cfg)` (unsharded)."""
    _lora_modules(model)
    return write_adapter(adapter_state_dict(model), cfg, out_dir, base_model_path)


def write_adapter(
    adapters: dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | Path, base_model_path: str | None = None
) -> Path:
    """Write a peft LoRA adapter folder: adapter_config.json and adapter_model.safetensors.

    Args:
        adapters: every adapter tensor under its Crucible name (`layers.0.attn.wqkv.lora_A.q_proj`)
            or peft key; other tensors are refused.
        cfg: the LoRAConfig the adapters were trained with.
        out_dir: the folder (created).
        base_model_path: written as base_model_name_or_path (the base's HF folder or hub id).
    Returns:
        the folder.
    """
    tensors = {}
    for name, t in adapters.items():
        if t.numel() == 0:  # a ZeRO-3 partition placeholder saved in place of the tensor
            raise ValueError(f"adapter {name!r} is an empty tensor: gather the adapters before writing them")
        tensors[name if name.startswith(_PEFT_PREFIX) else peft_key(name)] = t.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base_model_path), indent=2) + "\n")
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def peft_config(cfg: LoRAConfig, base_model_path: str | os.PathLike | None = None) -> dict:
    """The adapter_config.json of a peft LoRA adapter for causal language modelling."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "bias": "none",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def read_adapter_config(folder: str | Path) -> tuple[LoRAConfig, str | None]:
    """(LoRAConfig, base_model_name_or_path) of a peft LoRA adapter folder.

    Raises:
        FileNotFoundError: no adapter_config.json there.
        ValueError: not JSON, not LoRA, or a feature Crucible's LoRALinear does not compute
            (rsLoRA, DoRA, per-module ranks, bias training); the message names the file and key.
    """
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {folder} a LoRA adapter folder?")
    try:
        config = json.loads(path.read_text())
        cfg = LoRAConfig(
            rank=config["r"],
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
            targets=_targets(config.get("target_modules")),
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a LoRA adapter config Crucible reads ({type(e).__name__}: {e})") from None
    unsupported = {"peft_type": "LORA", "bias": "none", "use_rslora": False, "use_dora": False}
    for key, want in unsupported.items():
        if config.get(key, want) != want:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (only {want!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported")
    return cfg, config.get("base_model_name_or_path")


def _targets(modules) -> tuple[str, ...]:
    """peft's target_modules (a list of names, or "all-linear") as LoRAConfig targets."""
    if modules == "all-linear":
        return TARGETS
    if isinstance(modules, str) or not isinstance(modules, list):
        raise ValueError(f"target_modules={modules!r}: expected a list of projection names")
    return tuple(modules)


def _check_adapter_config(cfg: LoRAConfig, modules: list[LoRALinear], source: Path) -> None:
    """Refuse an adapter whose rank, alpha or targets differ from the applied ones."""
    checks = {
        "r": (modules[0].rank, cfg.rank),
        "lora_alpha": (modules[0].alpha, cfg.alpha),
        "target_modules": (sorted({n for m in modules for n in m.targets}), sorted(cfg.targets)),
    }
    for key, (want, got) in checks.items():
        if want != got:
            raise ValueError(f"{source}: {key}={got!r}, but the model's LoRA has {want!r}")


@torch.no_grad()
def load_adapter(model: Decoder, folder: str | Path) -> Decoder:
    """Read a peft LoRA adapter folder into a model that `apply_lora` prepared with the same
    rank, alpha and targets.

    Args:
        model: the Decoder with adapters applied.
        folder: holds adapter_config.json and adapter_model.safetensors.
    Returns:
        the model, its adapters overwritten.
    Raises:
        ValueError: the config or a tensor does not fit (a different rank, alpha or targets, a
            missing, unexpected or misshapen key); the message names the file and the key.
    """
    folder = Path(folder)
    modules = _lora_modules(model)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    cfg, _ = read_adapter_config(folder)  # a damaged or unsupported config is an error naming the file
    _check_adapter_config(cfg, modules, config_path)
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    params = dict(named_adapters(model))
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        what = "missing" if missing else "unexpected"
        raise ValueError(
            f"{weights_path}: tensor {key!r} {what} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, p in params.items():
        if tensors[key].shape != p.shape:
            raise ValueError(
                f"{weights_path}: {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}"
            )
        p.copy_(tensors[key])
    return model
