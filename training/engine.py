"""The parallelism engines the loop runs over: one process, FSDP2, or DeepSpeed ZeRO.

Each engine owns the model wrapper, the optimizer and mixed precision, and offers the loop the
same few calls: `loss(batch)`, `backward(loss, last)`, `step(lr)`, `save(dir)`, `load(dir)`,
`full_state_dict()`. Parallelism is applied to the plain Decoder from outside, in
`parallelize`, in this order: activation checkpointing → compile → FSDP (or ZeRO).

Frozen parameters (a LoRA base) are in no optimizer and no checkpoint: a checkpoint holds what
trains, and its meta.json names the base it was trained on (training/loop.py).

Loss scaling. The loop divides each micro-batch's loss sum by the global target-token count of
the whole optimizer step. Backends that average gradients over data-parallel ranks (FSDP's
reduce-scatter, DeepSpeed's reduction) divide by the world size again, so the loop multiplies by
`grad_divisor` to undo it; DeepSpeed is also told not to divide by the accumulation steps.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.records import DataError
from model.decoder import Block, Decoder
from training.config import ConfigError, RunConfig
from training.deepspeed_config import deepspeed_config
from training.optim import build_optimizer, set_lr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Dist:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(needs_group: bool, timeout_s: float = 1800) -> Dist:
    """Join the process group that the launcher (torchrun, deepspeed, Ray Train) describes.

    A process started without a launcher is rank 0 of 1; engines that need a process group
    (fsdp, deepspeed) then get a one-process group on 127.0.0.1. The backend is NCCL on CUDA
    and gloo on CPU.

    Args:
        needs_group: create a group even for a single process.
        timeout_s: how long a rank waits in a collective for the others before failing.
    Returns:
        this process's Dist.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # A group made before us over gloo (Ray Train's CPU workers, even on a GPU node) means CPU.
    on_gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    if torch.cuda.is_available() and not on_gloo:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized() and (world > 1 or needs_group):
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set, as a launcher would
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,  # binds NCCL to this rank's GPU
        )
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, device)


def resolve_precision(cfg: RunConfig, device: torch.device) -> RunConfig:
    """cfg with train.precision "auto" decided for this device (a copy; cfg itself unchanged):
    bf16 on a GPU that supports it, else fp32 (on a CPU, bf16 autocast runs ~10x slower than
    fp32 for the tiny model)."""
    if cfg.train.precision != "auto":
        return cfg
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return replace(cfg, train=replace(cfg.train, precision=precision))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few host numbers over all ranks (in fp64). Without other ranks they are returned
    as they are, without a round trip through the device (which would wait for it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    return all_reduce_sum_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over all ranks in place, without reading it back (a no-op without
    other ranks)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def exit_without_teardown(code: int) -> None:
    """End this process now, skipping the interpreter's teardown (stdout and stderr flushed).

    After a finished run, gloo's threads can abort the process while the interpreter tears down
    ("terminate called without an active exception", pytorch/pytorch#179291): the launcher then
    reports a failed rank. Checkpoints, metrics and exports are closed and synced by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier_last() -> None:
    """A barrier as a process's last collective before the group is destroyed.

    Gloo's worker threads can still hold the last operation's tensors when a collective returns;
    if that last operation held tensors made in Python, the thread releasing them during the
    interpreter's teardown aborts the process ("terminate called without an active exception",
    pytorch/pytorch#179291). A barrier's own tensor is made in C++, so after it nothing is left.
    """
    if dist.is_initialized():
        dist.barrier()


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class RankError(RuntimeError):
    """A rank-local part of a collective step failed on some rank (named in the message)."""


# Errors that keep their type when every rank raises another rank's failure.
_SHARED_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError)}


@contextlib.contextmanager
def together(what: str):
    """Run a rank-local part of a collective step, then agree on its outcome (a collective).

    A rank that fails alone would leave the others waiting in their next collective until the
    process-group timeout. After the body, every rank learns whether any rank failed, and if one
    did, all of them raise the same error: "{what} failed on rank R: {cause}" (a ConfigError or
    DataError keeps its type; anything else becomes a RankError). Without other ranks the
    body's own error is raised unchanged.

    Args:
        what: the step, for the message ("saving checkpoint step_00000100").
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as e:
        if not _multi_rank():
            raise
        error = e
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not _multi_rank() or isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = e
    if not _multi_rank():
        return
    agreed = agree_on_failure(what, error)
    if agreed is not None:
        raise agreed from error


def agree_on_failure(what: str, error: BaseException | None) -> Exception | None:
    """Every rank's error (None for success) → one error all ranks raise alike, or None.

    A collective: one all-reduce of a flag, and only after a failure an all-gather of the causes.
    """
    failed = torch.tensor([float(error is not None)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(failed)
    if not failed.item():
        return None
    causes: list = [None] * dist.get_world_size()
    mine = None if error is None else (type(error).__name__, _one_line(error))
    dist.all_gather_object(causes, mine)
    barrier_last()  # the ranks raise next, and may exit
    failures = [(r, c) for r, c in enumerate(causes) if c is not None]
    rank, (kind, message) = failures[0]
    others = f" (and on rank(s) {', '.join(str(r) for r, _ in failures[1:])})" if len(failures) > 1 else ""
    text = f"{what} failed on rank {rank}{others}: {message}"
    if kind in _SHARED_ERRORS:
        return _SHARED_ERRORS[kind](text)
    return RankError(f"{text} ({kind})")


def raise_together(what: str, error: BaseException | None):
    """Raise on every rank alike the error some rank met in `what` (this rank's, or None here);
    for callers that already know, from a reduction of their own, that a rank failed."""
    if not _multi_rank():
        raise error
    raise agree_on_failure(what, error) from error


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _collective_device() -> torch.device:
    """The device the group's backend reduces on (NCCL: this rank's GPU; gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(value):
    """Rank 0's value of a small picklable object, on every rank (itself without other ranks)."""
    if not _multi_rank():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parallelize(model: Decoder, cfg: RunConfig, where: Dist) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 to a Decoder: a skeleton on the meta
    device (training/startup.py materialises it after), or a built one (moved to the device).

    (DeepSpeed wraps the model itself, in `DeepSpeedEngine`.)
    """
    model.set_recompute(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        for layer in model.layers:
            layer.compile()  # per block: small graphs, compiled once, shared by every layer
    if not model.tok_embeddings.weight.is_meta:
        model.to(where.device)
    if cfg.engine != "fsdp":
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = dist.device_mesh.init_device_mesh(where.device.type, (where.world_size,))
    # Every parameter is gathered in the run's precision, so a unit may mix dtypes: a LoRA
    # block holds a frozen base in that precision and fp32 adapters (their fp32 copy is what
    # the optimizer steps; gradients are reduced in fp32).
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.train.precision], reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.fsdp.reshard_after_forward)
    # the root holds the embedding, final norm and output projection (used inside `loss`)
    model = fully_shard(model, mesh=mesh, mp_policy=mp)
    for method in ("loss", "token_logprobs"):  # gather the root's parameters as forward does
        register_fsdp_forward_method(model, method)
    return model


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018): halve on a non-finite step,
    double after `window` finite ones. The scale never goes below 1."""

    def __init__(self, enabled: bool, scale: float = 2.0**16, window: int = 1000):
        self.enabled, self.scale, self.window, self.good_steps = enabled, scale if enabled else 1.0, window, 0
        self.lowered = False
        """Whether the last update was an overflow answered by halving the scale (one that
        happens at scale 1 is the gradients' own, not the scale's)."""

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        self.lowered = not finite and self.scale > 1.0
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps % self.window == 0:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        # Only fp16 to fp16 carries the scale over: a disabled scaler must stay at 1 (an fp16
        # scale kept after a switch to bf16/fp32 would multiply every gradient by it, unscaled),
        # and an fp16 run resumed from a bf16/fp32 checkpoint starts from the initial scale.
        if self.enabled and state.get("enabled", True):
            self.scale, self.good_steps = state["scale"], state["good_steps"]


class TorchEngine:
    """One process, or FSDP2: a torch AdamW over the (possibly sharded) parameters, bf16 through
    autocast (single) or FSDP's MixedPrecisionPolicy, fp16 with `LossScaler`.

    Args:
        model: a built Decoder, or a skeleton (training/startup.py) with `weights`.
        cfg, where: the run and this process.
        weights: a skeleton's values (StartWeights): each rank fills only its shard.
    """

    def __init__(self, model: Decoder, cfg: RunConfig, where: Dist, weights=None):
        if cfg.engine == "single" and where.world_size > 1:
            raise ConfigError(
                f"engine=single runs one process, but {where.world_size} were started: add "
                "--config configs/fsdp.yaml or a DeepSpeed JSON (--config zero3.json)"
            )
        self.cfg, self.where = cfg, where
        self.model = parallelize(model, cfg, where)
        if weights is not None:
            from training.startup import materialize

            with together("filling this rank's part of the model"):  # reads files: may fail on one rank
                materialize(self.model, weights, where.device)
        t = cfg.train
        self.optimizer = build_optimizer(self.model, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        self.scaler = LossScaler(t.precision == "fp16")
        self.grad_divisor = where.world_size if cfg.engine == "fsdp" else 1
        self.autocast = cfg.engine == "single" and t.precision != "fp32"
        self.frozen = any(not p.requires_grad for p in model.parameters())

    def loss(self, batch: dict[str, torch.Tensor], z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, n_target_tokens) of one micro-batch: `Decoder.loss` in the run's precision."""
        with self.forward_context():
            return self.model.loss(batch["tokens"], batch["labels"], batch["position_ids"], batch["doc_ids"], z_loss)

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) fp32 log-probabilities of the batch's labels: `Decoder.token_logprobs`."""
        with self.forward_context():
            return self.model.token_logprobs(batch["tokens"], batch["labels"], batch["position_ids"], batch["doc_ids"])

    def overflow_was_expected(self) -> bool:
        """Whether the last skipped step was an fp16 overflow that the loss scaler answered by
        lowering its scale: expected while the scale settles, so the loop does not count it."""
        return self.scaler.lowered

    def forward_context(self):
        if self.autocast:
            return torch.autocast(self.where.device.type, dtype=DTYPES[self.cfg.train.precision])
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss * self.scaler.scale).backward()

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, and step unless the global gradient norm is non-finite.

        Queues the work without waiting for the device: with the fused AdamW (CUDA, CPU) the
        decision to skip stays on the device, as `found_inf` (the flag GradScaler hands the
        optimizer: a flagged step leaves weights, moments and step count as they were). fp16's
        loss scaler, and an unfused optimizer, need the norm on the host and wait for it.

        Returns:
            (applied, grad_norm before clipping, nan/inf when the step was skipped), as 0-d
            tensors on the device for the caller to read with the loss.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler.enabled:
            for p in params:
                p.grad.mul_(1.0 / self.scaler.scale)
        max_norm = self.cfg.train.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        applied = torch.isfinite(norm)
        set_lr(self.optimizer, lr)
        if self.optimizer.defaults.get("fused") and not self.scaler.enabled:
            self.optimizer.found_inf = (~applied).float()
            self.optimizer.step()
        else:
            finite = bool(applied)
            if finite:
                self.optimizer.step()
            self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        with single_process_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        with single_process_dcp():
            dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._options(strict=not self.frozen),  # the frozen base stays as it was built
        )

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.frozen, **kw)  # a frozen base is not saved

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole model's weights (fp32 where they train) on CPU, on rank 0 (None elsewhere);
        a collective under FSDP. `trainable_only`: only the parameters that train (LoRA's adapters)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.model, options=options)
        return state if self.where.is_main else None

    @contextlib.contextmanager
    def gathered_model(self):
        """The whole model as a plain Decoder on every rank (a collective), for generation: the
        single engine's own model; under FSDP2 a copy from the gathered full state dict, so
        that decoding runs no collective per token (every rank decodes alone)."""
        if self.cfg.engine == "single":
            yield getattr(self.model, "_orig_mod", self.model)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        yield _plain_model(state, self.cfg, self.model.cfg)

    def extra_state(self) -> dict:
        return {"loss_scaler": self.scaler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.scaler.load_state_dict(state["loss_scaler"])


@contextlib.contextmanager
def single_process_dcp():
    """Silence DCP's warning that it runs without a process group: the single engine and
    launch/export_hf.py mean it to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0–3 from the run's DeepSpeed JSON (batch, precision and clipping filled
    from the run config); DeepSpeed handles precision, clipping and its own non-finite check.

    Args:
        model: a built Decoder, or a meta-device skeleton with `weights` (under ZeRO-3 it may
            be partitioned already by `partition_zero3`).
        cfg, where: the run and this process.
        weights: a skeleton's values (StartWeights): under ZeRO-3 each rank fills only its
            partitions.
    """

    def __init__(self, model: Decoder, cfg: RunConfig, where: Dist, weights=None):
        deepspeed = _import_deepspeed(where)
        self.cfg, self.where = cfg, where
        ds_config = deepspeed_config(cfg, where.world_size)
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        model.set_recompute(cfg.train.activation_checkpointing)
        if self.stage == 3:
            # Gather each Block's parameters at once when it runs, as FSDP does: a block uses a
            # weight without calling its module (FeedForward's w2), and one hook per block is
            # cheaper than one per Linear.
            deepspeed.utils.set_z3_leaf_modules(model, [Block])
            if not model.tok_embeddings.weight.requires_grad:
                # ZeRO-3 gathers a block's weights again for its backward in a hook on its
                # inputs' gradients; a frozen embedding (LoRA) gives the first block an input
                # without one, and its backward would find its weights released.
                model.tok_embeddings.register_forward_hook(_require_grad)
        from training.startup import StartWeights, fill_partitions, materialize, set_fp32_masters

        if weights is None:  # a built model: its fp32 values, for the masters of a bf16/fp16 run only
            weights = StartWeights.of_model(model) if cfg.train.precision != "fp32" else None
        else:
            if self.stage == 3 and any(p.is_meta for p in model.parameters()):
                partition_zero3(model, ds_config, where)  # collectives: not inside `together`
            with together("filling this rank's part of the model"):  # reads files: may fail on one rank
                if self.stage == 3:
                    fill_partitions(model, weights)
                else:
                    materialize(model, weights, torch.device("cpu"))  # DeepSpeed moves it to the device
        t = cfg.train
        optimizer = build_optimizer(model, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        self.frozen = any(not p.requires_grad for p in model.parameters())
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if t.precision != "fp32":
            # DeepSpeed copied its fp32 master weights from the module's bf16/fp16 cast; they get
            # the unrounded values. Frozen parameters (a LoRA base) have none: they stay as cast.
            set_fp32_masters(self.model.module, weights, zero3=self.stage == 3)
        if self.stage == 3:
            # The output projection is used inside Decoder.forward, not through its own module's
            # forward, so ZeRO-3 must be told to gather it with the root module.
            deepspeed.zero.register_external_parameter(self.model.module, self.model.module.output_weight)
        self.grad_divisor = where.world_size
        self.fp16 = ds_config.get("fp16", {}).get("enabled", False)

    def overflow_was_expected(self) -> bool:
        """An fp16 overflow is DeepSpeed's to handle: its scaler lowers the scale and raises
        once the scale is at its minimum."""
        return self.fp16

    def loss(self, batch: dict[str, torch.Tensor], z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, n_target_tokens) of one micro-batch, through the module call: ZeRO-3
        gathers the root's own parameters (the output projection) in its forward hooks."""
        b = batch
        return self.model(b["tokens"], b["position_ids"], b["doc_ids"], labels=b["labels"], z_loss=z_loss)

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) fp32 log-probabilities of the batch's labels, through the module call."""
        b = batch
        return self.model(b["tokens"], b["position_ids"], b["doc_ids"], labels=b["labels"], per_token=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss, scale_wrt_gas=False)  # the loop's loss is already per-step exact

    def step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed's step (it reads its overflow flag on the host itself); (applied, grad_norm)
        as 0-d tensors on the device, as TorchEngine returns them."""
        set_lr(self.optimizer, lr)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        values = [float(self.model.was_step_applied()), math.nan if norm is None else float(norm)]
        applied, norm = torch.tensor(values, dtype=torch.float64, device=self.where.device)
        return applied.bool(), norm

    def save(self, folder: Path) -> None:
        self.model.save_checkpoint(
            str(folder.parent), tag=folder.name, save_latest=False, exclude_frozen_parameters=self.frozen
        )

    def load(self, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(folder.parent),
            tag=folder.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=not self.frozen,  # without the frozen base, which stays as loaded
        )
        if path is None:
            raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint to load")

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The weights on rank 0 (None elsewhere; a collective): the fp32 masters of those that
        train, gathered from the ZeRO partitions, and the frozen ones (a LoRA base) gathered in
        their own dtype unless `trainable_only`. Never a ZeRO-3 partition's empty placeholder."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.model.module.named_parameters():
            if param.requires_grad:
                full = safe_get_full_fp32_param(param)  # ZeRO 1-3 keep fp32 masters (stage 0 is refused)
                if self.where.is_main:
                    state[name] = full.detach().cpu().clone()
            elif not trainable_only:
                with deepspeed.zero.GatheredParameters([param]):  # a no-op below stage 3
                    if self.where.is_main:
                        state[name] = param.data.detach().cpu().clone()
        return state if self.where.is_main else None

    @contextlib.contextmanager
    def gathered_model(self):
        """The whole model as a plain Decoder on every rank (a collective), for generation: each
        parameter gathered once (ZeRO-3) and copied, so that decoding runs no collective."""
        import deepspeed

        state = {}
        for name, param in self.model.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):  # a no-op below stage 3
                state[name] = param.data.detach().clone()
        yield _plain_model(state, self.cfg, self.model.module.cfg)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def _plain_model(state: dict[str, torch.Tensor], cfg: RunConfig, model_cfg) -> Decoder:
    """A Decoder (with the run's LoRA layout) holding the tensors of a full state dict."""
    from training.startup import model_skeleton

    model = model_skeleton(cfg, model_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _require_grad(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_() if torch.is_grad_enabled() else output


def build_engine(model: Decoder, cfg: RunConfig, where: Dist, weights=None) -> TorchEngine | DeepSpeedEngine:
    """The engine named by cfg.engine around a built Decoder, or a skeleton and its `weights`
    (training/startup.py)."""
    cfg = resolve_precision(cfg, where.device)
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, where, weights)
    return TorchEngine(model, cfg, where, weights)


def partition_zero3(model: nn.Module, ds_config: dict, where: Dist) -> nn.Module:
    """ZeRO-3's partitions of a meta-device skeleton, in the config's dtype, their values unset
    (each rank fills its own: training.startup.fill_partitions). No rank holds the whole model.

    Each module gets storage (`to_empty`: address space, no page written) and goes to DeepSpeed
    (`zero.Init(module=...)`), which broadcasts it from rank 0 and keeps this rank's partition.
    Largest modules first: the one full-size module in flight comes while few partitions are
    resident. On the CPU every module gets its storage at once before any is freed (only the
    broadcast touches its pages), so that no freed module leaves holes in the heap. Unlike
    building the model under `with zero.Init()`, no module runs its own init on full-size
    weights that are overwritten anyway (97 s of an 8B start-up).
    """
    deepspeed = _import_deepspeed(where)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins the group made already
    dtype = {"bf16": torch.bfloat16, "fp16": torch.half}
    model.to(next((v for k, v in dtype.items() if ds_config.get(k, {}).get("enabled")), torch.float32))
    if where.device.type == "cpu":
        model.to_empty(device=where.device)
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    for module in sorted(holders, key=lambda m: -sum(p.numel() for p in m.parameters(recurse=False))):
        # zero.Init(module=) converts the module's whole subtree (a LoRALinear's adapters too)
        for sub in module.modules():
            if any(p.is_meta for p in sub.parameters(recurse=False)):
                sub.to_empty(device=where.device, recurse=False)
        # mem_efficient_linear=False: DeepSpeed would otherwise replace F.linear process-wide.
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, mem_efficient_linear=False)
    return model


def _import_deepspeed(where: Dist):
    """deepspeed, imported for this device."""
    if where.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed

    if where.device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op (45-65 s on 2 cores, again for
        # every new environment) that only its inference all-reduce uses; training
        # collectives go through torch.distributed. Marking it unbuildable skips the compile.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
