"""benchmarks/bench_data.py empties its --out on each run: only a folder it made (or an empty one)."""

import pytest

from benchmarks.bench_data import BENCH_MARKER, claim_out, main


def test_refuses_a_folder_it_did_not_make_and_deletes_nothing(tmp_path, capsys):
    (tmp_path / "thesis.txt").write_text("years of work\n")
    with pytest.raises(SystemExit) as refusal:
        main(["--out", str(tmp_path)])
    message = str(refusal.value.code)
    assert f"--out {tmp_path}" in message and BENCH_MARKER in message
    assert (tmp_path / "thesis.txt").read_text() == "years of work\n"
    assert not (tmp_path / BENCH_MARKER).exists()
    file = tmp_path / "thesis.txt"
    with pytest.raises(SystemExit, match="--out .* is a file"):
        claim_out(file)
    assert file.read_text() == "years of work\n"


def test_empties_a_folder_it_made(tmp_path):
    out = tmp_path / "bench"
    claim_out(out)  # a new folder
    assert [p.name for p in out.iterdir()] == [BENCH_MARKER]
    (out / "shard-000000.tar").write_bytes(b"from the last run")
    claim_out(out)
    assert [p.name for p in out.iterdir()] == [BENCH_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_out(empty)
    assert [p.name for p in empty.iterdir()] == [BENCH_MARKER]
