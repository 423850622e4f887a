"""The loop in real processes (gloo on CPU): exact accumulation across ranks, NaN skips, exact
resume through the real launchers, and a Ray worker killed mid-run.

References: world 1 × micro-batch 8 is the reference of world 2 × accumulation 2 × micro-batch 2
(fp32, losses to 1e-5, parameters to 3e-5 after three AdamW steps); an uninterrupted run is the
reference of a resumed one (fp32, losses to 1e-6).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.shards import load_manifest
from data_pipeline.stream import PackedStream, assign_shards
from model.loss import IGNORE_INDEX
from tests.conftest import ROOT
from tests.dist_helpers import errors_of_processes, global_batches, run_processes
from tests.training_data import TEST_MODEL
from training.checkpoint import find_latest, read_meta
from training.config import RunConfig, find_config_file

pytestmark = pytest.mark.slow
SEQ = 256
ENGINES = ("fsdp", "deepspeed")


def make_cfg(run_dir: Path, data: dict, engine: str, **train) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir), engine=engine, resume="never")
    cfg.model.overrides = dict(TEST_MODEL)
    cfg.data.train, cfg.data.seq_len = str(data["sft"]), SEQ
    cfg.train.precision, cfg.train.lr, cfg.train.warmup_steps = "fp32", 3e-3, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "hf" / "model.safetensors"))


@pytest.mark.parametrize("engine", ENGINES)
def test_world2_accum2_mb2_equals_world1_mb8(engine, training_data, tmp_path):
    steps = 3
    stream = PackedStream(training_data["sft"], seq_len=SEQ, batch_size=8, seed=0)
    batches = global_batches(stream, steps)
    masked = [(b["labels"] != IGNORE_INDEX).sum(axis=1) for b in batches]
    assert all(len(set(m.tolist())) > 1 for m in masked), "rows must have uneven target counts"

    ref_cfg = make_cfg(tmp_path / "ref", training_data, engine, max_steps=steps, micro_batch=8, grad_accum=1)
    (ref,) = run_processes(ref_cfg, 1, tmp_path / "ref_out", batches)
    # The two ranks also recompute their blocks in backward (selective checkpointing), which must
    # gather the same sharded weights there as in forward.
    cfg = make_cfg(tmp_path / "dist", training_data, engine, max_steps=steps, micro_batch=2, grad_accum=2)
    cfg.train.activation_checkpointing = "selective"
    dist = run_processes(cfg, 2, tmp_path / "dist_out", batches)

    for rank in dist:
        np.testing.assert_allclose(rank["losses"], ref["losses"], rtol=0, atol=1e-5)
    a, b = exported(tmp_path / "ref"), exported(tmp_path / "dist")
    assert a.keys() == b.keys()
    for name in a:
        # Adam divides by sqrt(v): where a weight's gradient is tiny, the fp32 rounding of another
        # summation order (two ranks, two micro-batches) moves its update by up to ~1e-5 of lr 3e-3
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=3e-5, msg=name)
    assert any((a[n] != exported_init(ref_cfg)[n]).any() for n in a), "the weights must have moved"

    # control: a naive mean of per-micro-batch means weights the rows differently, which moves
    # the gradient far more than the tolerance the runs above agree to
    exact, naive = _init_gradients(ref_cfg, batches[0])
    assert (naive - exact).norm() / exact.norm() > 1e-2


def exported_init(cfg: RunConfig) -> dict[str, torch.Tensor]:
    model, _ = _init_model(cfg)
    from model.hf import state_dict_to_hf

    return state_dict_to_hf(model.state_dict(), model.cfg)


def _init_model(cfg: RunConfig):
    from data_pipeline.tokenizer import load_tokenizer
    from training.loop import build_model

    return build_model(cfg, load_tokenizer(Path(cfg.data.train) / "tokenizer"))


def _init_gradients(cfg: RunConfig, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient at the initial weights of the exact loss (one global token count) and of the
    naive one (the mean over the four micro-batches of 2 rows of each one's own mean)."""
    model, _ = _init_model(cfg)
    grads = []
    for naive in (False, True):
        model.zero_grad()
        parts = []
        for i in range(0, 8, 2):
            row = {k: torch.as_tensor(v[i : i + 2]) for k, v in batch.items()}
            s, n = model(row["tokens"], row["position_ids"], row["doc_ids"], labels=row["labels"])
            parts.append((s, n))
        total = sum(n for _, n in parts)
        loss = sum(s / n for s, n in parts) / len(parts) if naive else sum(s for s, _ in parts) / total
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return grads[0], grads[1]


def poison_third_step_on_rank1(model, rank: int) -> None:
    """Turn rank 1's third training forward into NaN (through the final norm's output)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        calls["n"] += 1
        return output * float("nan") if rank == 1 and calls["n"] == 3 else output

    model.norm.register_forward_hook(hook)


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_on_one_rank_skips_that_step_on_both(engine, training_data, tmp_path):
    cfg = make_cfg(tmp_path / "run", training_data, engine, max_steps=5, micro_batch=2, precision="bf16")
    results = run_processes(cfg, 2, tmp_path / "out", hook=poison_third_step_on_rank1)
    for r in results:
        assert r["skipped_steps"] == [3]
        assert math.isnan(r["losses"][2])
        assert all(math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 2)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped"] for line in lines] == [False, False, True, False, False]
    assert all(torch.isfinite(t).all() for t in exported(tmp_path / "run").values())


def test_a_bad_shard_on_one_rank_fails_every_rank_at_once_with_the_same_error(training_data, tmp_path):
    data = tmp_path / "sft"
    shutil.copytree(training_data["sft"], data)
    shards = load_manifest(data)["shards"]
    for sid in assign_shards(len(shards), 1, 2, 0, 0):  # every shard rank 1 reads in epoch 0
        path = data / shards[sid]["path"]
        path.write_bytes(path.read_bytes()[:-100] + b"x" * 100)
    cfg = make_cfg(tmp_path / "run", {"sft": data}, "fsdp", max_steps=3, micro_batch=2)
    cfg.data.on_error, cfg.collective_timeout_s = "raise", 60  # a rank left waiting would fail the test late
    started = time.monotonic()
    errors = errors_of_processes(cfg, 2, tmp_path / "out")
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("DataError: reading the step's data failed on rank 1: ")
    assert "checksum mismatch" in errors[0]
    assert time.monotonic() - started < 50


# --- exact resume through the real launchers -----------------------------------------------------


def _launch(engine: str, run_dir: Path, data: dict, *overrides: str) -> subprocess.CompletedProcess:
    args = [
        f"run_dir={run_dir}",
        f"data.train={data['sft']}",
        f"data.val={data['sft_val']}",
        f"data.seq_len={SEQ}",
        "model.overrides=" + json.dumps(TEST_MODEL),
        "init_from=null",
        "train.max_steps=20",
        "train.micro_batch=2",
        "train.grad_accum=2",
        "train.precision=fp32",
        "train.checkpoint_every=5",
        "train.eval_every=10",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if engine == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port())]
        cmd += ["launch/sft.py", "--config", "zero3.json", *args]
        env["DS_ACCELERATOR"] = "cpu"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port())]
        cmd += ["launch/sft.py", "--config", "configs/fsdp.yaml", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _port() -> int:
    from training.engine import free_port

    return free_port()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("engine", ENGINES)
def test_exact_resume_through_the_launcher(engine, training_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch(engine, straight, training_data)
    _launch(engine, resumed, training_data, "train.exit_at_step=10")
    assert read_meta(find_latest(resumed))["state"]["step"] == 10
    assert not (resumed / "hf").exists()  # an interrupted run exports nothing
    # a checkpoint cut short mid-write (never renamed, or missing meta.json) is passed over
    (resumed / "checkpoints" / "step_00000015.tmp").mkdir()
    (resumed / "checkpoints" / "step_00000016" / "engine").mkdir(parents=True)
    _launch(engine, resumed, training_data)

    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 21))
    np.testing.assert_allclose([b[s] for s in range(11, 21)], [a[s] for s in range(11, 21)], rtol=0, atol=1e-6)
    assert read_meta(find_latest(resumed))["state"]["resumes"] == 1
    for name, tensor in exported(straight).items():
        torch.testing.assert_close(exported(resumed)[name], tensor, rtol=0, atol=1e-6, msg=name)
    # launch/export_hf.py reads the engine's checkpoint files in one process: the same weights
    cmd = [sys.executable, "launch/export_hf.py", str(straight), "--out", str(tmp_path / "exported")]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    offline = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert all(torch.equal(offline[name], tensor) for name, tensor in exported(straight).items())
    val = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20] and all(math.isfinite(r["val_ppl"]) for r in val)


# --- Ray -------------------------------------------------------------------------------------------


def test_ray_pretrain_survives_a_killed_worker(training_data, tmp_path):
    psutil = pytest.importorskip("psutil")
    run_dir = tmp_path / "ray_run"
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        f"run_dir={run_dir}",
        f"data.train={training_data['pretrain']}",
        "data.seq_len=128",
        "model.overrides=" + json.dumps(TEST_MODEL),
        "train.max_steps=40",
        "train.micro_batch=4",
        "train.checkpoint_every=5",
        "ray.num_workers=2",
        "ray.max_failures=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 300
        while killed is None and time.time() < deadline and job.poll() is None:
            if _last_step(run_dir) >= 12:
                workers = [
                    p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                ]
                if workers:
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        out, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed is not None, "the run ended before a worker could be killed"
    assert job.returncode == 0, out[-4000:]
    state = read_meta(find_latest(run_dir))["state"]
    assert state["step"] == 40 and state["resumes"] >= 1
    assert sorted(_losses(run_dir)) == list(range(1, 41))
    assert (run_dir / "hf" / "model.safetensors").is_file()


def _ray_pretrain(run_dir: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "launch/pretrain.py",
        f"run_dir={run_dir}",
        f"data.train={data}",
        "data.seq_len=128",
        "model.overrides=" + json.dumps(TEST_MODEL),
        "train.micro_batch=4",
        *overrides,
    ]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}  # every worker line, as printed
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_ray_pretrain_stops_on_bad_data_with_one_message_and_no_retraining(training_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(training_data["pretrain"], data)
    shard = data / load_manifest(data)["shards"][1]["path"]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 3 : len(damaged) // 3 + 32] = b"\xee" * 32
    shard.write_bytes(bytes(damaged))
    run_dir = tmp_path / "run"
    done = _ray_pretrain(
        run_dir, data, "data.on_error=raise", "train.max_steps=40", "ray.num_workers=2", "ray.max_failures=2"
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain: error: ") and f"{shard}: checksum mismatch" in last
    fatal = json.loads((run_dir / "fatal_error.json").read_text())
    assert fatal["type"] == "DataError"
    # the two restarts met the recorded error before building a model: the loop started once
    assert done.stdout.count("global batch ") == 1


def test_ray_pretrain_refuses_resume_never_beside_checkpoints_before_starting_ray(training_data, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000005" / "meta.json").write_text(json.dumps({"state": {"step": 5}}))
    done = _ray_pretrain(run_dir, training_data["pretrain"], "resume=never", "train.max_steps=10")
    assert done.returncode == 2 and "already holds step_00000005" in done.stderr, done.stderr[-3000:]
    assert not (run_dir / "ray").exists()  # refused by the driver: no Ray job was started


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0
