"""The engines against references: the gradient norm and clipping of FSDP2 and ZeRO-3 in real
processes (gloo on CPU) against `clip_grad_norm_` on the whole fp32 model, and the DeepSpeed JSON
fields that would silently undo the loop's loss scaling, non-finite skips or precision.

Tolerances: norms to 1e-5 relative, weights to 1e-6 (fp32, one step of a tiny model).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.config import preset
from model.decoder import Decoder
from training.config import ConfigError, RunConfig
from training.deepspeed_config import deepspeed_config
from training.engine import free_port
from training.optim import param_groups

MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "vocab_size": 256}
ROWS, SEQ, CLIP = 8, 32, 0.3
ZERO3 = {"zero_optimization": {"stage": 3}}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (ROWS, SEQ), generator=g)
    labels = torch.randint(0, MODEL["vocab_size"], (ROWS, SEQ), generator=g)
    for r in range(ROWS):
        labels[r, : 3 * r] = -100  # uneven target counts per row
    positions = torch.arange(SEQ).expand(ROWS, SEQ).clone()
    return {"tokens": tokens, "labels": labels, "position_ids": positions, "doc_ids": torch.zeros_like(tokens)}


def _model() -> Decoder:
    torch.manual_seed(0)
    model = Decoder(preset("tiny", **MODEL))
    model.init_weights()
    return model


def _cfg(engine: str) -> RunConfig:
    cfg = RunConfig(engine=engine)
    cfg.train.precision, cfg.train.grad_clip, cfg.train.grad_accum, cfg.train.micro_batch = "fp32", CLIP, 2, 2
    # eps far above |g| makes AdamW's first step lr·g/eps, so a wrong clip shows in the weights
    cfg.train.lr, cfg.train.eps, cfg.train.weight_decay = 1.0, 100.0, 0.1
    cfg.deepspeed = dict(ZERO3) if engine == "deepspeed" else None
    return cfg


def _worker(rank: int, world: int, port: int, engine: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from training.engine import build_engine, exit_without_teardown, init_distributed
    from training.loop import train_step

    cfg, batch = _cfg(engine), _batch()
    where = init_distributed(needs_group=True)
    engine_ = build_engine(_model(), cfg, where)
    mb, accum = cfg.train.micro_batch, cfg.train.grad_accum
    rows = [(rank * accum + m) * mb for m in range(accum)]
    micro = [{k: v[r : r + mb].numpy() for k, v in batch.items()} for r in rows]
    result = train_step(engine_, micro, cfg, where, lr=0.5)
    weights = engine_.full_state_dict()
    if rank == 0:
        Path(out).write_bytes(pickle.dumps((result, weights)))
    exit_without_teardown(0)  # as launch/sft.py: gloo's threads can abort the teardown of a finished run


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    """One process, fp32, the whole batch: clip_grad_norm_ on the full model, one AdamW step."""
    cfg, batch, model = _cfg("single"), _batch(), _model()
    loss_sum, count = model(batch["tokens"], batch["position_ids"], batch["doc_ids"], labels=batch["labels"])
    (loss_sum / count).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    t = cfg.train
    torch.optim.AdamW(param_groups(model, t.weight_decay), lr=0.5, betas=t.betas, eps=t.eps).step()
    return float(norm), {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_grad_norm_and_clip_equal_the_full_model_reference(engine, tmp_path):
    out = tmp_path / "rank0.pkl"
    mp.start_processes(_worker, args=(2, free_port(), engine, str(out)), nprocs=2, start_method="spawn")
    result, weights = pickle.loads(out.read_bytes())
    norm, expected = _reference()
    assert norm > CLIP, "the reference must clip"
    assert result.applied and result.grad_norm == pytest.approx(norm, rel=1e-5)  # pre-clip, all shards
    initial = _model().state_dict()
    assert any((expected[k] - initial[k]).abs().max() > 1e-4 for k in expected), "the step must move weights"
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)


# --- DeepSpeed JSON fields that conflict with the run config -----------------------------------------


def _ds_cfg(precision: str = "bf16", **json_fields) -> RunConfig:
    cfg = RunConfig(engine="deepspeed")
    cfg.train.precision = precision
    cfg.deepspeed = {"zero_optimization": {"stage": 2}, **json_fields}
    return cfg


def test_zero_stage_0_is_refused_in_every_precision():
    """Stage 0 with bf16 runs DeepSpeed's FP16_Optimizer, which takes a zero-gradient AdamW step
    when it is built (decaying the master weights at train.lr) and reduces gradients in bf16."""
    for precision in ("bf16", "fp16", "fp32"):
        cfg = _ds_cfg(precision, zero_optimization={"stage": 0})
        with pytest.raises(ConfigError, match=rf"stage=0 with train\.precision={precision}: use stage >= 1"):
            deepspeed_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match="stage=0"):
        deepspeed_config(_ds_cfg(zero_optimization={"offload_optimizer": {"device": "cpu"}}), world_size=2)


@pytest.mark.parametrize(
    "fields, named",
    [
        # a sum over ranks doubles the gradients of 2 ranks: the loop multiplies by the world size
        ({"gradient_allreduce_op": "sum"}, r"deepspeed\.gradient_allreduce_op='sum'.*world size"),
        # ZeRO-2 in bf16 then steps on a NaN gradient instead of skipping
        ({"bf16": {"enabled": "auto", "check_grad_overflow": False}}, r"deepspeed\.bf16\.check_grad_overflow=False"),
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, r"zero_optimization\.compute_grad_norm"),
        ({"torch_autocast": {"enabled": True}}, r"deepspeed\.torch_autocast\.enabled=True.*train\.precision"),
        ({"bf16": True}, r"deepspeed\.bf16=True must be a mapping"),
        ({"zero_optimization": 3}, r"deepspeed\.zero_optimization=3 must be a mapping"),
        ({"zero_optimization": {"stage": "3"}}, r"deepspeed\.zero_optimization\.stage='3'; choose 1, 2 or 3"),
    ],
)
def test_deepspeed_fields_that_would_undo_the_run_config_are_refused_by_name(fields, named):
    with pytest.raises(ConfigError, match=named):
        deepspeed_config(_ds_cfg(**fields), world_size=2)


def test_deepspeed_fields_that_repeat_what_the_loop_needs_pass():
    fields = {"gradient_allreduce_op": "MEAN", "bf16": {"enabled": "auto", "check_grad_overflow": True}}
    fields["torch_autocast"] = {"enabled": False}
    ds = deepspeed_config(_ds_cfg(**fields), world_size=2)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["gradient_allreduce_op"] == "MEAN"
    assert not math.isnan(ds["gradient_clipping"])


def _master_worker(rank: int, world: int, port: int, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from training.engine import build_engine, exit_without_teardown, init_distributed

    cfg = _ds_cfg("bf16", zero_optimization={"stage": stage})
    engine = build_engine(_model(), cfg, init_distributed(needs_group=True))
    weights = engine.full_state_dict()
    Path(out).write_bytes(pickle.dumps(weights))
    exit_without_teardown(0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_master_weights_start_from_the_fp32_weights(stage, tmp_path):
    """DeepSpeed builds its fp32 masters from the bf16 cast of the module: without putting the
    fp32 values back, ZeRO bf16 starts from rounded weights (~2e-4 off here) that FSDP keeps."""
    out = tmp_path / "weights.pkl"
    mp.start_processes(_master_worker, args=(1, free_port(), stage, str(out)), nprocs=1, start_method="spawn")
    weights, initial = pickle.loads(out.read_bytes()), _model().state_dict()
    for name, tensor in initial.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
