"""The quick start end to end at toy size: every real entry point of `make demo` in order
(corpus → prepare_data → Ray pretraining → deepspeed ZeRO-3 SFT → torchrun FSDP2 GRPO → evaluate
→ report → chat)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_quick_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "launch/demo.py", "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text())
    rows = result["checkpoints"]
    stages = ("pretrain", "sft", "grpo")
    assert [r["checkpoint"] for r in rows] == [str(out / stage / "hf") for stage in stages]
    assert result["gsb"]["baseline"] == str(out / "sft" / "hf")  # RL is judged against SFT
    for row in rows:
        for key in ("perplexity", "rouge_l", "persona_accuracy", "lore_accuracy"):
            assert isinstance(row[key], float), key
    assert sum(result["gsb"][k] for k in ("good", "same", "bad")) > 0
    answers = [json.loads(line) for line in (out / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) == sum(result["gsb"][k] for k in ("good", "same", "bad"))
    assert all(set(a["answers"]) == {r["checkpoint"] for r in rows} and a["gsb"] for a in answers)
    report = (out / "report.md").read_text()
    assert "| checkpoint |" in report and "**user:**" in report and (out / "loss.png").stat().st_size > 1000
    assert "RL (GRPO)" in report and "generation" in report  # its run, and its sampling speed
    for stage in stages:
        assert (out / stage / "hf" / "model.safetensors").is_file() and (out / stage / "metrics.jsonl").is_file()
