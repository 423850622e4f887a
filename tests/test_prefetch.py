"""StepPrefetcher: the stream's batches in order, grouped by step; exact resume although it reads
ahead; errors and the end of the stream reach the training thread; close never hangs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.records import DataError
from tests.test_shards import write_dataset
from tests.test_stream import _damaged_copy, _pretrain_samples, rows, same, stream, take
from training.prefetch import StepPrefetcher

PER_STEP = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("pretrain"), _pretrain_samples())


def as_numpy(micro: list[dict[str, torch.Tensor]]) -> list[dict]:
    return [{k: v.numpy() for k, v in m.items()} for m in micro]


def wait_until_full(prefetcher: StepPrefetcher, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not prefetcher._queue.full():
        assert time.monotonic() < deadline, "the prefetcher did not read ahead"
        time.sleep(0.01)


def test_steps_are_the_streams_batches_and_the_state_is_that_of_the_steps_handed_out(data_dir):
    kw = dict(rank=1, world_size=2, seed=3)
    reference = stream(data_dir, **kw)
    n_steps = (2 * reference.batches_per_epoch + 2) // PER_STEP  # into the third epoch
    expected = take(reference, n_steps * PER_STEP)

    for k in (0, 1, n_steps // 2):
        prefetcher = StepPrefetcher(stream(data_dir, **kw), PER_STEP, depth=2)
        got = [as_numpy(next(prefetcher)) for _ in range(k)]
        assert all(len(step) == PER_STEP for step in got)
        assert same(rows([m for step in got for m in step]), rows(expected[: k * PER_STEP]))
        wait_until_full(prefetcher)  # two more steps read ahead: the stream itself is past them
        state = json.loads(json.dumps(prefetcher.state_dict()))
        prefetcher.close()
        after_k = stream(data_dir, **kw)
        take(after_k, k * PER_STEP)
        assert state == json.loads(json.dumps(after_k.state_dict()))

        resumed = stream(data_dir, **kw)
        resumed.load_state_dict(state)
        rest = take(resumed, (n_steps - k) * PER_STEP)
        assert same(rows(rest), rows(expected[k * PER_STEP :])), f"resumed after {k} steps"


def test_the_end_of_the_stream_ends_the_steps(data_dir):
    s = stream(data_dir, epochs=1)
    prefetcher = StepPrefetcher(s, 1)
    steps = list(prefetcher)
    assert len(steps) == s.plan(0).batches_per_epoch
    with pytest.raises(StopIteration):  # and again, not a hang
        next(prefetcher)
    prefetcher.close()


def test_a_stream_error_is_raised_in_the_training_thread_after_the_good_steps(data_dir, tmp_path):
    bad = _damaged_copy(data_dir, tmp_path / "data")
    reference = stream(data_dir)
    prefetcher = StepPrefetcher(stream(tmp_path / "data", on_error="raise"), 1)
    good = []
    with pytest.raises(DataError, match=f"{bad}: checksum mismatch"):
        for step in prefetcher:
            good.append(step)
    assert good, "the shards before the damaged one were read"
    assert same(rows([m for step in good for m in as_numpy(step)]), rows(take(reference, len(good))))
    with pytest.raises(DataError):  # the error stays: a retry does not skip data
        next(prefetcher)
    prefetcher.close()


def test_close_stops_a_thread_blocked_on_a_full_queue_and_pins_only_when_asked(data_dir):
    prefetcher = StepPrefetcher(stream(data_dir), PER_STEP, depth=1)
    wait_until_full(prefetcher)
    started = time.monotonic()
    prefetcher.close()
    assert not prefetcher._thread.is_alive() and time.monotonic() - started < 5
    step = next(StepPrefetcher(iter([{"tokens": np.arange(4)}]), 1))
    assert isinstance(step[0]["tokens"], torch.Tensor) and not step[0]["tokens"].is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_for_a_gpu_are_pinned():
    step = next(StepPrefetcher(iter([{"tokens": np.arange(4)}]), 1, pin=True))
    assert step[0]["tokens"].is_pinned()
