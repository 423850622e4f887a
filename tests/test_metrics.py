"""Reporter's files (rank 0 only, strict JSON, resumable), throughput arithmetic, device figures."""

import json
import math

import pytest
import torch

from training.metrics import PEAK_BF16_FLOPS, Reporter, peak_flops, peak_memory_bytes, throughput


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rank0_writes_one_json_line_per_step(tmp_path):
    with Reporter(tmp_path / "run", rank=0, max_steps=5, tensorboard=False) as rep:
        for step in range(1, 6):
            rep.log_step({"step": step, "loss": 1.0 / step, "tokens_per_s": 1000.0, "lr": 3e-4})
    records = read_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3] == {"step": 4, "loss": 0.25, "tokens_per_s": 1000.0, "lr": 3e-4}


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with Reporter(run_dir, rank=1, max_steps=5) as rep:
        rep.print("hello")
        rep.log_step({"step": 1, "loss": 2.0})
        rep.write_json("config.json", {"a": 1})
        rep.truncate_after(0)
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_non_finite_floats_are_written_as_null(tmp_path):
    with Reporter(tmp_path, rank=0, max_steps=3, tensorboard=False) as rep:
        rep.log_step({"step": 1, "loss": math.nan, "grad_norm": math.inf, "nested": [-math.inf, 1.5]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    expected = {"step": 1, "loss": None, "grad_norm": None, "nested": [None, 1.5]}
    assert read_lines(tmp_path / "metrics.jsonl") == [expected]


def test_record_without_step_is_rejected(tmp_path):
    with Reporter(tmp_path, rank=0, max_steps=3, tensorboard=False) as rep, pytest.raises(KeyError, match="step"):
        rep.log_step({"loss": 1.0})


def test_truncate_after_keeps_steps_up_to_checkpoint_and_drops_half_line(tmp_path, capsys):
    with Reporter(tmp_path, rank=0, max_steps=10, tensorboard=False) as rep:
        for step in range(1, 8):
            rep.log_step({"step": step, "loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the crash came mid-line
    with Reporter(tmp_path, rank=0, max_steps=10, start_step=4, tensorboard=False) as rep:
        rep.truncate_after(4)
        assert [r["step"] for r in read_lines(path)] == [1, 2, 3, 4]
        rep.log_step({"step": 5, "loss": 0.5})  # appended after the kept lines
    assert [r["step"] for r in read_lines(path)] == [1, 2, 3, 4, 5]
    assert "dropped 1 unreadable line" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


def test_write_json_replaces_the_whole_file(tmp_path):
    with Reporter(tmp_path, rank=0, max_steps=1, tensorboard=False) as rep:
        rep.write_json("config.json", {"model": {"dim": 256}, "lr": 3e-4, "list": [1, 2]})
        rep.write_json("config.json", {"lr": 1e-3})
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-3}
    assert (tmp_path / "config.json").read_text().startswith('{\n  "lr"')  # indent=2
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left behind


def test_missing_tensorboard_is_not_an_error(tmp_path):
    # With tensorboard installed this writes event files; without it, nothing and no error.
    with Reporter(tmp_path, rank=0, max_steps=2, tensorboard=True) as rep:
        rep.log_step({"step": 1, "loss": 1.0, "note": "text is skipped", "ok": True})
    assert len(read_lines(tmp_path / "metrics.jsonl")) == 1


def test_throughput_against_hand_numbers():
    # 8 devices process 4M tokens in 2 s at 6e9 FLOPs/token: 2M tok/s in all, 1.5e15 FLOP/s per device.
    got = throughput(tokens=4_000_000, seconds=2.0, flops_per_token=6_000_000_000, world_size=8, peak=1e15 * 3)
    assert got == pytest.approx({"tokens_per_s": 2e6, "tflops": 1500.0, "mfu": 0.5})
    assert throughput(100, 1.0, 10, 1, peak=None) == pytest.approx({"tokens_per_s": 100.0, "tflops": 1e-9, "mfu": None})


def test_peak_flops_table_and_cpu():
    assert peak_flops(torch.device("cpu")) is None
    assert PEAK_BF16_FLOPS["H100 80GB HBM3"] == 989e12


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", None),  # not an L4
        ("NVIDIA A10G", 70e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_matches_device_names(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == expected


def test_peak_memory_on_cpu_is_the_process_rss():
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20  # torch alone takes more than 10 MiB
