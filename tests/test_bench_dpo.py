"""benchmarks/bench_dpo.py: both sides train on the same pairs with the same targets and
reference log-probs step by step; a small run prints both first-step losses (ln 2, the policy
being its reference) and the ratios last."""

import math
import re

import numpy as np
import pytest

from benchmarks import bench_dpo, bench_train
from model.loss import IGNORE_INDEX

pytestmark = pytest.mark.slow
SMALL = "--preset tiny --vocab 512 --seq-len 32 --batch 2 --steps 1 --warmup 1".split()


def test_both_sides_take_the_same_pairs_targets_and_reference(tmp_path):
    args = bench_dpo.parse_args([*SMALL, "--prompt-frac", "0.25"])
    cfg, state = bench_train.source(args)
    pairs = bench_dpo.make_pairs(args, cfg)
    crucible = bench_dpo.CrucibleDPO(cfg, state, args, pairs, tmp_path)
    trainer = bench_dpo.trl_trainer(cfg, state, args, pairs, tmp_path)
    B, L = args.batch, args.seq_len
    for ours, theirs in zip(crucible.batches, trainer.get_train_dataloader(), strict=True):
        # Crucible: one pair a row, chosen then rejected; TRL: the chosen rows, then the rejected
        halves = [(slice(None), slice(0, L)), (slice(None), slice(L, 2 * L))]
        for k, half in enumerate(halves):
            rows = slice(k * B, (k + 1) * B)
            np.testing.assert_array_equal(ours["tokens"][half], theirs["input_ids"][rows].numpy())
            targets = theirs["completion_mask"][rows, 1:].numpy() == 1  # TRL scores the answers' tokens
            np.testing.assert_array_equal(ours["labels"][half][:, :-1] != IGNORE_INDEX, targets)
            assert (ours["labels"][half][:, -1] == IGNORE_INDEX).all()
            ref = theirs["ref_chosen_logps" if k == 0 else "ref_rejected_logps"].double().numpy()
            np.testing.assert_allclose(ours["ref_logps"][half].sum(1), ref, rtol=1e-5)
    assert (pairs[0][1][-1], pairs[0][2][-1]) == (bench_dpo.EOS, bench_dpo.EOS)
    mine, theirs = crucible.engine.optimizer, trainer.create_optimizer()
    assert {k: mine.defaults[k] for k in ("lr", "betas", "eps", "fused")} == {
        k: theirs.defaults[k] for k in ("lr", "betas", "eps", "fused")
    }
    assert {g["weight_decay"] for o in (mine, theirs) for g in o.param_groups} == {0.0}


def test_smoke_run_prints_both_first_losses_and_the_ratios_last(capsys):
    assert bench_dpo.main(SMALL) == 0  # its memory subprocesses run bench_dpo.py with these arguments
    out = capsys.readouterr().out.splitlines()
    assert "2 pairs per step, each two sequences of 32 tokens (prompt 16, answers 16)" in out[0]
    first = [re.fullmatch(r"first-step loss: crucible (\S+), trl (\S+) \(difference \S+\), ln 2 \S+", s) for s in out]
    first = next(filter(None, first), None)  # a library may print a warning before it
    assert first and all(abs(float(first[k]) - math.log(2)) <= 1e-4 for k in (1, 2))
    assert re.fullmatch(r"speedup_vs_trl=\d+\.\d\d peak_mem_ratio_vs_trl=\d+\.\d\d", out[-1])
