"""benchmarks/bench_train.py: both sides get the same optimizer and run transformers as its
Trainer does, and a small run prints the ratios on its last line."""

import re

import pytest

from benchmarks import bench_train

SMALL = "--preset tiny --vocab 512 --seq-len 32 --batch 2 --steps 1 --warmup 1".split()


def _sides():
    args = bench_train.parse_args(SMALL)
    cfg = bench_train.model_config(args)
    state = bench_train.initial_state(cfg)
    return args, cfg, bench_train.CrucibleSide(cfg, state, args), bench_train.HFSide(cfg, state, args)


def _decayed(optimizer) -> dict[float, int]:
    """Parameter count under each weight decay."""
    return {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}


def test_both_sides_decay_the_same_parameters():
    _, _, crucible, hf = _sides()
    assert _decayed(hf.optimizer) == _decayed(crucible.engine.optimizer)  # the tied embedding too
    assert hf.optimizer.defaults.get("fused") == crucible.engine.optimizer.defaults.get("fused")


def test_hf_side_keeps_no_kv_cache_in_training_as_trainer():
    # Trainer sets config.use_cache = args.use_cache (False); otherwise every layer copies its
    # keys and values into a DynamicCache in each training forward.
    args, cfg, _, hf = _sides()
    tokens, labels = bench_train.batches(args, cfg, 1)[0]
    assert hf.model(input_ids=tokens, labels=labels, shift_labels=labels).cache is None


def test_smoke_run_prints_the_ratios_last(capsys):
    assert bench_train.main(SMALL) == 0  # its memory subprocesses get these arguments, not pytest's
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_hf=\d+\.\d\d peak_mem_ratio_vs_hf=\d+\.\d\d", last)


def test_no_warmup_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args([*SMALL, "--warmup", "0"])
    assert "--warmup" in capsys.readouterr().err
