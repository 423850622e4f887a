"""benchmarks/bench_mfu.py: its CPU smoke path computes TFLOP/s from the model's FLOPs per token,
and without a GPU it says so instead of printing figures."""

import pytest
import torch

from benchmarks.bench_mfu import NO_GPU, main, peak_for_name
from model.config import preset
from model.decoder import Decoder


def _rows(out: str) -> list[list[str]]:
    """The table's data rows, as cells (header and separator left out)."""
    lines = [line.strip().strip("|") for line in out.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines]
    return [row for row in rows if row[0].isdigit()]


def test_cpu_smoke_run_reports_model_flops(capsys):
    argv = "--device cpu --preset tiny --seq-len 64 --batch 2 --steps 2 --warmup 1"
    assert main([*argv.split(), "--compile", "off", "--ac", "selective", "--loss", "chunked"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 1
    seq_len, batch, compiled, ac, loss, tokens_per_s, tflops, mfu, memory = rows[0]
    assert (seq_len, batch, compiled, ac, loss) == ("64", "2", "off", "selective", "chunked")
    tokens_per_s = float(tokens_per_s.replace(",", ""))
    assert tokens_per_s > 0
    with torch.device("meta"):
        flops_per_token = Decoder(preset("tiny")).num_flops_per_token(64)
    # Tolerance from the printing alone: tokens/s is rounded to the unit (a relative error of
    # 0.5 / tokens_per_s, large on a loaded machine), TFLOP/s to 4 digits.
    expected = tokens_per_s * flops_per_token / 1e12
    assert float(tflops) == pytest.approx(expected, rel=1e-3 + 0.5 / tokens_per_s, abs=0.5 * flops_per_token / 1e12)
    assert (mfu, memory) == ("n/a", "n/a")  # no --peak-tflops, and no CUDA allocator on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_gpu_it_exits_2_with_one_line(capsys):
    assert main(["--steps", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == NO_GPU
    assert captured.out == ""


def test_peak_by_device_name():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0  # the SXM part
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H200") == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA L4") is None
