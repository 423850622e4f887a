"""benchmarks/bench_startup.py: on the tiny preset, sharded start-up on 2 gloo ranks from scratch
(FSDP2) and from a written HF folder (ZeRO-3) records each rank's memory at every point, the step
runs to a finite loss, and the last line gives the ratios."""

from __future__ import annotations

import json
import math
import re

import pytest

from benchmarks import bench_startup

pytestmark = pytest.mark.slow
TINY = "--preset tiny --startup sharded --world 2 --steps 1 --seq-len 16".split()


# Two configurations cover both engines and both sources; each one starts two fresh processes.
@pytest.mark.parametrize(("engine", "source"), [("fsdp", "scratch"), ("deepspeed", "hf")])
def test_sharded_startup_is_measured_on_every_rank(engine, source, tmp_path, capsys):
    out = tmp_path / "records.json"
    argv = [*TINY, "--engines", engine, "--sources", source, "--hf-dir", str(tmp_path / "hf"), "--json", str(out)]
    assert bench_startup.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"startup_peak_ratio=\d+\.\d\d filled_peak_ratio=\d+\.\d\d", lines[-1])
    records = json.loads(out.read_text())["records"]
    assert [(r["engine"], r["source"], r["rank"], r["status"]) for r in records] == [
        (engine, source, 0, "ok"),
        (engine, source, 1, "ok"),
    ]
    for r in records:
        points = r["points"]
        assert 0 < points["start"]["hwm"] <= points["filled"]["hwm"] <= points["startup"]["hwm"]
        assert points["startup"]["hwm"] <= points["steps"]["hwm"]
        assert points["startup"]["startup_s"] > 0
        assert points["steps"]["applied"] == [True]
        assert math.isfinite(points["steps"]["loss"][0]) and points["steps"]["loss"][0] > 0
    assert not (tmp_path / "hf").exists()  # the folder it wrote is deleted without --keep-hf
