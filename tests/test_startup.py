"""Sharded start-up (training/startup.py) in real processes (gloo on CPU).

Reference: `build_model`, the whole initial model built in one process. Two ranks that each
allocate and fill only their own FSDP2 shards or ZeRO-3 partitions, from scratch or from a bf16
Hugging Face folder, must gather to exactly its weights (bit for bit), in the dtypes the run
keeps them in: fp32 where they train, a LoRA base in the run's precision.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data_pipeline.tokenizer import load_tokenizer
from model.config import preset
from model.decoder import Decoder
from model.hf import load_hf
from tests.training_data import TEST_MODEL, VOCAB
from training.checkpoint import write_export
from training.config import RunConfig, find_config_file
from training.engine import exit_without_teardown, free_port

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, cfg: RunConfig, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from training.engine import build_engine, init_distributed, resolve_precision
    from training.optim import param_groups
    from training.startup import model_skeleton, start_weights

    where = init_distributed(needs_group=True)
    cfg = resolve_precision(cfg, where.device)
    weights = start_weights(cfg, load_tokenizer(Path(cfg.data.train) / "tokenizer"))
    model = model_skeleton(cfg, weights.cfg)
    engine = build_engine(model, cfg, where, weights)
    decay = [(g["weight_decay"], len(g["params"])) for g in param_groups(model, 0.1)]  # sharded
    weights.close()
    local = {
        n: (p.dtype, tuple(p.to_local().shape) if hasattr(p, "to_local") else None) for n, p in model.named_parameters()
    }
    state = engine.full_state_dict()
    if where.is_main:
        with open(Path(out) / "state.pkl", "wb") as f:
            pickle.dump({"state": state, "local": local, "decay": decay}, f)
    exit_without_teardown(0)


def sharded_start(cfg: RunConfig, tmp_path: Path) -> dict:
    mp.start_processes(_worker, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn")
    with open(tmp_path / "state.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def bf16_base(training_data, tmp_path_factory) -> Path:
    """A bf16 HF folder of TEST_MODEL's shape (odd row counts, so shards are uneven)."""
    cfg = preset("tiny", **TEST_MODEL, vocab_size=VOCAB + 3)
    torch.manual_seed(11)
    model = Decoder(cfg)
    model.init_weights()
    state = {k: v.bfloat16() for k, v in model.state_dict().items()}
    return write_export(state, cfg, tmp_path_factory.mktemp("startup") / "base", training_data["sft"] / "tokenizer")


def make_cfg(data: dict, engine: str, init_from: Path | None = None, **train) -> RunConfig:
    cfg = RunConfig(engine=engine, init_from=None if init_from is None else str(init_from))
    cfg.model.overrides = dict(TEST_MODEL, vocab_size=VOCAB + 3)
    cfg.data.train, cfg.data.seq_len = str(data["sft"]), 256
    cfg.train.precision, cfg.train.seed = "fp32", 5
    for key, value in train.items():
        setattr(cfg.train, key, value)
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


def whole(cfg: RunConfig) -> dict[str, torch.Tensor]:
    from training.loop import build_model

    model, _ = build_model(cfg, load_tokenizer(Path(cfg.data.train) / "tokenizer"))
    return model.state_dict()


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
@pytest.mark.parametrize("source", ["scratch", "hf"])
def test_two_ranks_fill_their_shards_with_the_whole_models_weights(engine, source, training_data, bf16_base, tmp_path):
    cfg = make_cfg(training_data, engine, bf16_base if source == "hf" else None)
    got = sharded_start(cfg, tmp_path)
    want = whole(cfg)
    assert got["state"].keys() == want.keys()
    for name, tensor in want.items():
        assert tensor.dtype == torch.float32, name  # what trains is fp32, whatever the file stores
        assert torch.equal(got["state"][name], tensor), name
    if source == "hf":  # the file's bf16 values, exactly
        base, _ = load_hf(bf16_base)
        assert all(torch.equal(want[n], t.float()) for n, t in base.state_dict().items())
    # The same weight decay groups as the whole model's (a partitioned ZeRO-3 weight looks 1-D).
    from training.optim import param_groups

    plain = Decoder(preset("tiny", **TEST_MODEL, vocab_size=VOCAB + 3))
    assert got["decay"] == [(g["weight_decay"], len(g["params"])) for g in param_groups(plain, 0.1)]
    if engine == "fsdp":  # each rank held about half of every parameter
        for name, (_, shape) in got["local"].items():
            assert shape[0] == -(-want[name].shape[0] // 2), name


def test_a_lora_base_stays_in_the_files_bf16_and_adapters_are_fp32(training_data, bf16_base, tmp_path):
    cfg = make_cfg(training_data, "fsdp", bf16_base, precision="bf16")
    cfg.train.lora.rank = 4
    got = sharded_start(cfg, tmp_path)
    base, _ = load_hf(bf16_base)
    for name, tensor in base.state_dict().items():
        assert got["local"][name][0] == torch.bfloat16, name
        assert torch.equal(got["state"][name], tensor), name  # bit-identical to the file
    adapters = {n: d for n, (d, _) in got["local"].items() if ".lora_" in n}
    assert adapters and set(adapters.values()) == {torch.float32}
    want = whole(cfg)
    for name in adapters:
        assert torch.equal(got["state"][name], want[name]), name
