"""Start-up whose memory shrinks with the world size: no rank ever holds the whole model.

    start_weights(cfg, tokenizer)             where the values come from, checked (nothing read)
    model_skeleton(cfg, model_cfg)            the Decoder without values, on the meta device
    engine shards it                          FSDP2's fully_shard on the meta device; ZeRO-3's
                                              partitions (training.engine.partition_zero3)
    materialize / fill_partitions             each rank allocates its part and fills it from
                                              StartWeights: only its own rows

`StartWeights` gives any rows of any parameter without the rest: from an `init_from` folder it
reads them from the safetensors files (model.hf.HFSlices); otherwise it draws them from the
seeded, per-block init (model.decoder.initial_rows, model.lora.initial_rows for adapters), so
world 1 and world 2 start from the same weights. Stored bf16 stays bf16 until it is copied into
the parameter that holds it: fp32 where it trains, the run's precision for a frozen LoRA base.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.decoder import Decoder
from model.hf import HFSlices, flat_from_rows
from model.lora import apply_lora, initial_rows, is_adapter


class StartWeights:
    """The initial value of every parameter, rows at a time.

    Args:
        model_cfg: the model's shape (default: init_from's).
        seed: the seed of whatever is drawn (every weight from scratch; a LoRA run's adapters).
        init_from: an HF folder whose weights are read instead of drawn (adapters are drawn).
        held: values already in memory, by parameter name, given instead of read or drawn (a
            model built whole before the engine: its fp32 values, kept from DeepSpeed's cast).
    """

    def __init__(
        self,
        model_cfg: ModelConfig | None,
        seed: int = 0,
        init_from: str | Path | None = None,
        held: dict[str, torch.Tensor] | None = None,
    ):
        self.hf = HFSlices(init_from) if init_from is not None else None
        self.cfg = self.hf.cfg if self.hf is not None else model_cfg
        self.seed, self.held = seed, held or {}

    @classmethod
    def of_model(cls, model: Decoder) -> StartWeights:
        """The values a built model's trainable parameters hold now (references, not copies)."""
        return cls(model.cfg, held={name: p.data for name, p in model.named_parameters() if p.requires_grad})

    def close(self) -> None:
        if self.hf is not None:
            self.hf.close()

    def rows(self, name: str, shape: torch.Size, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of parameter `name` (of full `shape`): stored dtype, or fp32 drawn."""
        if name in self.held:
            return self.held[name][start:stop]
        if self.hf is not None and not is_adapter(name):
            return self.hf.rows(name, start, stop)
        return initial_rows(self.cfg, name, shape, start, stop, self.seed)

    def flat(self, name: str, shape: torch.Size, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened parameter (a ZeRO-3 partition's range)."""
        return flat_from_rows(lambda first, last: self.rows(name, shape, first, last), shape, start, stop)


def start_weights(cfg, tokenizer) -> StartWeights:
    """Where the run's initial weights come from, checked: init_from's folder (opened, its
    headers read, no weights), or the preset with model.overrides drawn from train.seed.

    Args:
        cfg: the run config.
        tokenizer: the data's tokenizer (vocab size; checked against init_from's).
    Raises:
        ConfigError: init_from does not read, or the model does not fit the data or tokenizer.
    """
    from training.config import ConfigError, model_config
    from training.preflight import check_init_from_tokenizer, check_model_fits

    if cfg.init_from is not None:
        try:
            weights = StartWeights(None, cfg.train.seed, init_from=cfg.init_from)
        except (OSError, ValueError) as e:  # a missing tensor, a wrong shape, a damaged file
            raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
        check_init_from_tokenizer(cfg, tokenizer)
        shape = f"init_from={cfg.init_from}"
    else:
        weights = StartWeights(model_config(cfg, tokenizer.vocab_size), cfg.train.seed)
        shape = f"model.preset={cfg.model.preset}"
    try:
        check_model_fits(cfg, tokenizer, weights.cfg, shape)
    except ConfigError:
        weights.close()
        raise
    return weights


def model_skeleton(cfg, model_cfg: ModelConfig) -> Decoder:
    """The run's Decoder without its values (see `StartWeights` for them), on the meta device.

    Args:
        cfg: the run config (train.lora.*, train.precision already resolved).
        model_cfg: the model's shape.
    Returns:
        the model. What trains is fp32; under LoRA the base is frozen in the run's precision
        and the fp32 adapters train.
    """
    from training.engine import DTYPES

    lora = cfg.train.lora.lora_config()
    with torch.device("meta"):
        model = Decoder(model_cfg)
        if lora is not None:
            model.to(DTYPES[cfg.train.precision])  # the frozen base, in the run's precision
            apply_lora(model, lora)
    return model


@torch.no_grad()
def materialize(model: nn.Module, weights: StartWeights, device: torch.device) -> nn.Module:
    """Allocate a skeleton's parameters on `device` and fill them: whole, or under FSDP2 (each
    parameter a DTensor sharded on dim 0) only this rank's rows."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param.data
        start = _row_offset(param) if isinstance(param, DTensor) else 0
        for lo, hi in _spans(local.shape[0], max(1, _FILL_CHUNK // math.prod(local.shape[1:]))):
            local[lo:hi].copy_(weights.rows(_plain_name(name), param.shape, start + lo, start + hi))
    return model


_FILL_CHUNK = 1 << 24
"""Elements filled at a time: the transient copy a fill holds beside the part it fills (64 MB
in fp32, where a whole part at once would be 0.5 GB for a 1B model's embedding on 2 ranks)."""


def _spans(n: int, step: int):
    """The [lo, hi) pieces of range(n), `step` long (the last one shorter)."""
    return ((lo, min(lo + step, n)) for lo in range(0, n, step))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's full size, also once ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(param, "ds_numel", param.numel())


def _row_offset(param) -> int:
    """The first row of this rank's Shard(0) part of a DTensor (torch.chunk's split)."""
    mesh = param.device_mesh
    chunk = -(-param.shape[0] // mesh.size())
    return min(chunk * mesh.get_local_rank(), param.shape[0])


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (torch.compile's _orig_mod)."""
    return name.replace("_orig_mod.", "")


@torch.no_grad()
def fill_partitions(model: nn.Module, weights: StartWeights) -> None:
    """Fill each ZeRO-3 partition (training.engine.partition_zero3) from `weights`: this rank's
    flat range of every parameter, its padding zero."""
    for name, param in model.named_parameters():
        start, stop = _partition_range(param)
        part = param.ds_tensor
        for lo, hi in _spans(stop - start, _FILL_CHUNK):
            part[lo:hi].copy_(weights.flat(_plain_name(name), param.ds_shape, start + lo, start + hi))
        part[stop - start :].zero_()  # the padding of the last partition


def _partition(param, weights: StartWeights, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `param` as `weights` give it (padded with zeros)."""
    start, stop = _partition_range(param)
    out = torch.zeros(param.ds_tensor.ds_numel, dtype=dtype or param.ds_tensor.dtype)
    out[: stop - start] = weights.flat(name, param.ds_shape, start, stop)
    return out


def _partition_range(param) -> tuple[int, int]:
    """The flat elements [start, stop) of `param` in this rank's ZeRO-3 partition (the rest of
    the partition, at the end of the last ranks', is padding)."""
    size = param.ds_tensor.ds_numel
    start = min(size * _partition_rank(param), param.ds_numel)
    return start, min(start + size, param.ds_numel)


def _partition_rank(param) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=param.ds_process_group)


def set_fp32_masters(engine_module: nn.Module, weights: StartWeights, zero3: bool) -> None:
    """Give DeepSpeed's fp32 master weights the values `weights` hold: it copied them from the
    module's bf16/fp16 cast, which rounded them. Each rank sets its own partition under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, param in engine_module.named_parameters():
        if not param.requires_grad:
            continue
        name = _plain_name(name)
        if zero3:
            safe_set_local_fp32_param(param, _partition(param, weights, name, torch.float32))
        else:
            full = weights.rows(name, param.shape, 0, param.shape[0]).float()
            safe_set_full_fp32_param(param, full.to(param.device))
