"""benchmarks/bench_loss.py: the three ways it times give the same loss, it restores the loss's
matmul choice, and it refuses ways that disagree."""

import pytest

import model.loss as loss_module
from benchmarks import bench_loss


def test_smoke_run_prints_the_ratios_and_restores_the_matmul_choice(capsys):
    before = loss_module._ONEDNN_LINEAR
    assert bench_loss.main("--tokens 96 --dim 16 --vocab 101 --masked 0.3 --rounds 2 --warmup 1".split()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == list(bench_loss.WAYS)
    ratios = dict(field.split("=") for field in lines[-1].split())
    assert set(ratios) == {"speedup_vs_full", "onednn_speedup"} and all(float(v) > 0 for v in ratios.values())
    assert loss_module._ONEDNN_LINEAR == before
    assert bench_loss.main("--tokens 96 --dim 16 --vocab 101 --rounds 1 --warmup 0 --eval".split()) == 0
    assert "forward under no_grad" in capsys.readouterr().out


def test_ways_that_disagree_stop_it(monkeypatch):
    real = bench_loss.causal_lm_loss
    monkeypatch.setattr(bench_loss, "causal_lm_loss", lambda logits, labels: real(logits * 1.01, labels))
    before = loss_module._ONEDNN_LINEAR
    with pytest.raises(SystemExit, match="do not do the same work"):
        bench_loss.main("--tokens 32 --dim 8 --vocab 50 --rounds 1".split())
    assert loss_module._ONEDNN_LINEAR == before
