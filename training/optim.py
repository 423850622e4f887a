"""The optimizer and its learning-rate schedule: AdamW parameter groups, and the lr of each step.

Pure functions: nothing here keeps state, so a resumed run recomputes the same lr from the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")
FUSED_ADAMW_DEVICES = {"cuda", "cpu"}
"""Devices where torch's AdamW has a fused kernel that build_optimizer uses."""


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm gains and biases are vectors; decaying them toward zero only fights the model. The
    # embedding is a lookup table whose rare rows would be shrunk between their few updates.
    # `in` rather than startswith: wrappers prefix names (`_orig_mod.`, `_fsdp_wrapped_module.`).
    # A ZeRO-3 partitioned parameter is a flat shard: its real shape is ds_shape.
    return len(getattr(param, "ds_shape", param.shape)) < 2 or "tok_embeddings" in name


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that get no weight decay.

    Args:
        model: the model (wrapped or not).
    Returns:
        the names of norms, biases and embeddings that require grad.
    """
    return {n for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices, none on norms, biases and embeddings.

    A tied output projection is the embedding and so is not decayed; an untied `output.weight`
    is a matrix like any other and is. Groups hold only "params" and "weight_decay", since
    DeepSpeed and torch optimizers treat extra keys inconsistently.

    Args:
        model: the model; only parameters with `requires_grad` are included.
        weight_decay: decoupled weight decay of the matrix group.
    Returns:
        one or two groups, an empty one omitted.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`.

    Args:
        model: the model, already on its device (and sharded, if it is going to be).
        lr: initial learning rate; the loop sets each step's lr with `set_lr`.
        betas: Adam's moment decay rates.
        eps: Adam's denominator epsilon.
        weight_decay: decoupled weight decay of the matrices.
    Returns:
        the optimizer; its fused kernel (one pass over each tensor) when every parameter is on
        CUDA or every one is on CPU: on CPU it steps ~5x faster than the foreach path.
    """
    groups = param_groups(model, weight_decay)
    device_types = {p.device.type for g in groups for p in g["params"]}
    extra = {"fused": True} if len(device_types) == 1 and device_types <= FUSED_ADAMW_DEVICES else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)


def lr_at(
    step: int,
    *,
    lr: float,
    max_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """The learning rate of optimizer step `step`: linear warmup, then the named schedule.

    Schedules after warmup:
    - "cosine": from `lr` down to `min_lr = lr * min_lr_ratio` at `max_steps`.
    - "wsd" (warmup-stable-decay, Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
      Beyond Fixed Training Durations"): constant `lr`, then a linear decay to `min_lr` over the
      last `decay_frac * max_steps` steps.
    - "constant": `lr`.
    Steps beyond `max_steps` keep the final value.

    Args:
        step: 1-based optimizer step (the first step taken is step 1).
        lr: peak learning rate.
        max_steps: the last step of the schedule.
        warmup_steps: steps of linear warmup, `lr * step / warmup_steps`; 0 for none.
        schedule: one of `SCHEDULES`.
        min_lr_ratio: final lr as a fraction of `lr` ("cosine" and "wsd").
        decay_frac: fraction of `max_steps` spent decaying ("wsd").
    Returns:
        the learning rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    step = min(step, max_steps)
    min_lr = lr * min_lr_ratio
    if schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = round(decay_frac * max_steps)
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step <= decay_start:
            return lr
        return lr - (lr - min_lr) * (step - decay_start) / (max_steps - decay_start)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group.

    Args:
        optimizer: the optimizer.
        lr: the new learning rate.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
