"""The DeepSpeed JSON, reconciled with the run config.

    --config zero3.json ─► RunConfig.deepspeed (as read) ─► deepspeed_config(cfg, world_size)
        ─► the dict `deepspeed.initialize(config=...)` gets

The run config is the one source of truth for the batch, precision and clipping: the JSON may
leave those fields out, write "auto", or repeat the run config's value; anything else is a
ConfigError naming both. Its top-level keys must be ones DeepSpeed reads, since DeepSpeed itself
ignores a misspelled one. The launchers' preflight runs this once with no world size, before any
worker starts; ray_job.py runs it with the worker count and the engine with the real world size.
"""

from __future__ import annotations

import difflib
import json

from training.config import ConfigError, RunConfig


def deepspeed_config(cfg: RunConfig, world_size: int | None) -> dict:
    """The DeepSpeed JSON with its batch, precision and clipping fields filled from the run config.

    A field the JSON already sets (other than "auto") must agree with the run config: the run
    config is the one source of truth and the JSON may only repeat it.

    Args:
        cfg: the run config (cfg.deepspeed holds the JSON as read).
        world_size: data-parallel size; None checks only what does not depend on it.
    Returns:
        a new dict for `deepspeed.initialize(config=...)`.
    Raises:
        ConfigError: an unknown top-level key, a disagreeing field (both numbers named), or a
            section this loop owns.
    """
    ds = check_deepspeed_keys(json.loads(json.dumps(cfg.deepspeed or {})))
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(
                f"deepspeed.{owned}: the loop builds the optimizer and learning-rate schedule from train.*; "
                f"remove the {owned!r} section from the DeepSpeed JSON"
            )
    _check_deepspeed_values(ds)
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch", t.micro_batch),
        "gradient_accumulation_steps": ("train.grad_accum", t.grad_accum),
        "gradient_clipping": ("train.grad_clip", t.grad_clip),
    }
    if world_size is not None:
        rows = cfg.batch_arithmetic(world_size)["global_batch"]
        wanted["train_batch_size"] = (f"train.micro_batch × train.grad_accum × world size {world_size}", rows)
    for key, (source, value) in wanted.items():
        _agree(ds, key, value, source)
    for section, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        block = ds.setdefault(section, {})
        if cfg.train.precision == "auto":  # decided on the worker's device, where this runs again
            if block.get("enabled", "auto") != "auto":
                raise ConfigError(
                    f"deepspeed.{section}.enabled={block['enabled']} with train.precision=auto: the run config sets "
                    f"the precision; give train.precision={precision} (or fp32), and 'auto' in the JSON"
                )
            continue
        enabled = cfg.train.precision == precision
        if block.get("enabled", "auto") not in ("auto", enabled):
            raise ConfigError(
                f"deepspeed.{section}.enabled={block['enabled']} disagrees with train.precision={cfg.train.precision}"
            )
        block["enabled"] = enabled
    if cfg.train.precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0: dynamic loss scaling
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage!r}; choose 1, 2 or 3")
    if stage == 0:
        # fp32: DeepSpeed steps the client optimizer directly, without the non-finite check every
        # other setting has; fp16: its FP16_Optimizer unscales a loss that backward never scaled;
        # bf16: the same FP16_Optimizer takes a zero-gradient AdamW step at start (weight decay at
        # train.lr, Adam's step count one ahead) and accumulates and all-reduces in bf16.
        raise ConfigError(
            f"deepspeed.zero_optimization.stage=0 with train.precision={cfg.train.precision}: use stage >= 1 or fsdp"
        )
    ds.setdefault("steps_per_print", 1 << 30)  # the loop reports; keep DeepSpeed's own log quiet
    return ds


def check_deepspeed_keys(ds: dict, source: str = "the DeepSpeed JSON") -> dict:
    """The DeepSpeed JSON, refused when a top-level key is not one DeepSpeed reads.

    DeepSpeed itself ignores an unknown top-level key (it forbids extra keys only inside its
    sections), so "zero_optimisation": {"stage": 3} would silently train with ZeRO-0.

    Args:
        ds: the JSON as read.
        source: its file, for the message (load_config checks each file as it reads it).
    Returns:
        ds.
    Raises:
        ConfigError: naming the file and the key.
    """
    for key in ds:
        if key in _DEEPSPEED_RENAMED:
            raise ConfigError(
                f"{source}: deepspeed.{key} is DeepSpeed's old spelling, which the {_DEEPSPEED_RENAMED[key]!r} "
                f"section this loop fills in overrides; write it as {_DEEPSPEED_RENAMED[key]!r}"
            )
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(str(key), DEEPSPEED_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (DeepSpeed would ignore it)"
            raise ConfigError(f"{source}: unknown DeepSpeed key 'deepspeed.{key}'{hint}")
    return ds


# The top-level keys DeepSpeed's DeepSpeedConfig reads (0.19; tests/test_config.py re-derives
# them from the installed DeepSpeed and fails when they drift). A list, not an import: the
# preflight runs in every launcher and on Ray's driver, and importing deepspeed there would cost
# time and fix its accelerator at first import, before the engine sets DS_ACCELERATOR.
# fmt: off
DEEPSPEED_KEYS = frozenset((
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last",
    "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue",
    "elasticity", "expert_parallel", "flops_profiler", "fp16", "gradient_accumulation_steps",
    "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor", "graph_harvesting",
    "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula",
    "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop", "quantize_training",
    "scheduler", "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients",
    "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
))
# fmt: on
_DEEPSPEED_RENAMED = {"bfloat16": "bf16"}
"""Old spellings DeepSpeed still reads, but only when the new key is absent."""

# DeepSpeed fields whose other values would silently undo what the loop relies on: the value it
# needs, and why (each checked only when the JSON sets it).
_DEEPSPEED_FIXED = {
    "gradient_allreduce_op": ("mean", "the loop's loss scaling (× world size) undoes a mean over ranks, not a sum"),
    "bf16.check_grad_overflow": (True, "a non-finite gradient norm must skip the step on every rank"),
    "zero_optimization.compute_grad_norm": (True, "the loop reports the gradient norm and skips non-finite steps"),
    "torch_autocast.enabled": (False, "train.precision sets the precision (bf16 or fp16 sections, filled by the loop)"),
}
_DEEPSPEED_SECTIONS = ("bf16", "fp16", "zero_optimization", "torch_autocast")


def _check_deepspeed_values(ds: dict) -> None:
    """Refuse a section that is not a mapping, and a field of `_DEEPSPEED_FIXED` set otherwise."""
    for section in _DEEPSPEED_SECTIONS:
        if not isinstance(ds.get(section, {}), dict):
            raise ConfigError(f"deepspeed.{section}={ds[section]!r} must be a mapping of its keys to values")
    for dotted, (needed, why) in _DEEPSPEED_FIXED.items():
        *section, key = dotted.split(".")
        block = ds.get(section[0], {}) if section else ds
        if key not in block:
            continue
        given = block[key].lower() if isinstance(block[key], str) else block[key]
        if given != needed:
            raise ConfigError(f"deepspeed.{dotted}={block[key]!r} is not supported: {why}; remove it")


def _agree(ds: dict, key: str, value, source: str) -> None:
    given = ds.get(key, "auto")
    if given != "auto" and given != value:
        raise ConfigError(f"deepspeed.{key}={given} disagrees with {source}={value}; make them equal or use 'auto'")
    ds[key] = value
