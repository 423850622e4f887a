"""python benchmarks/bench_data.py [--vocab-size 8000] [--seq-len 1024] [--out /tmp/bench_data]

Data-pipeline throughput on ../shared/data (not a timed test; record the figures in
benchmarks/RESULTS.md):
  1. prepare: the real Ray Data job of launch/prepare_data.py (read, clean, dedup, train the
     tokenizer, tokenize, write shards) on the English and Chinese pretraining texts, in MB/s of
     input and tokens/s of output, with the time spent training the tokenizer shown apart;
  2. stream: PackedStream reading, shuffling and packing those shards into (B, seq_len) batches,
     in tokens/s for one worker (one rank).

--out is emptied before each run, so it must be a folder this benchmark made (it leaves a
BENCH_MARKER file in it), an empty folder, or a new one: any other folder is refused.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BENCH_MARKER = ".crucible_bench_data"
"""The file that marks a folder as made by this benchmark, so that a later run may empty it."""


def claim_out(out: Path) -> None:
    """Make `out` an empty folder holding only BENCH_MARKER.

    Args:
        out: the --out folder: new, empty, or made by an earlier run of this benchmark.
    Raises:
        SystemExit: `out` holds files and no marker (a folder this benchmark did not make), or
            is a file; nothing is deleted.
    """
    if out.exists() and not out.is_dir():
        raise SystemExit(f"bench_data: --out {out} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / BENCH_MARKER).is_file():
            raise SystemExit(
                f"bench_data: --out {out} holds files this benchmark did not write (no {BENCH_MARKER}), and "
                "each run empties it: give a new or empty folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / BENCH_MARKER).write_text("made by benchmarks/bench_data.py, which empties this folder on each run\n")


def bench_prepare(out: Path, vocab_size: int) -> None:
    """Two runs of the job: training a tokenizer, then reusing it (the tokenization throughput)."""
    from data_pipeline.prepare import PrepareOptions
    from launch.prepare_data import run
    from training.ray_cluster import init_ray

    inputs = [DATA / "pretrain" / "tinyshakespeare.txt", DATA / "pretrain" / "journey_to_the_west.txt"]
    n_mib = sum(p.stat().st_size for p in inputs) / 2**20
    init_ray()  # started before the clock: a cluster is up before a job is submitted
    import ray

    try:
        for label, tokenizer, target in (
            ("train tokenizer", None, out),
            ("reuse tokenizer", out / "tokenizer", out / "again"),
        ):
            opts = PrepareOptions(
                kind="pretrain", inputs=[str(p) for p in inputs], out=str(target), split=r"^第.+回", shard_bytes=1 << 20
            )
            start = time.perf_counter()
            result = run(opts, tokenizer=str(tokenizer) if tokenizer else None, vocab_size=vocab_size)
            seconds = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in result.shards)
            print(
                f"prepare ({label}): {n_mib:.2f} MiB in {seconds:.1f} s = {n_mib / seconds:.2f} MiB/s, "
                f"{tokens:,} tokens = {tokens / seconds:,.0f} tokens/s, {result.report.kept_records} docs, "
                f"{len(result.shards)} shards"
            )
    finally:
        ray.shutdown()


def bench_stream(out: Path, seq_len: int, batch_size: int) -> float:
    from data_pipeline.stream import PackedStream

    stream = PackedStream(out, seq_len=seq_len, batch_size=batch_size, seed=0, epochs=1)
    start, tokens = time.perf_counter(), 0
    for batch in stream:
        tokens += batch["tokens"].size
    seconds = time.perf_counter() - start
    print(f"stream+pack: {tokens:,} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s per worker")
    return tokens / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/crucible_bench_data", help="scratch folder, emptied on each run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    claim_out(out)  # before anything else: a wrong --out is refused at once
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: this benchmark reads the shared real data")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}")
    bench_prepare(out, args.vocab_size)
    bench_stream(out, args.seq_len, args.batch_size)


if __name__ == "__main__":
    main()
