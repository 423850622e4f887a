"""Reading the next optimizer steps' batches while the current step runs.

The packed stream builds its batches in Python (shard reads, shuffle buffer, packing); done
between steps, that time is a stall of the device, most of all at an epoch boundary where the
stream reopens its shards and refills its buffer. `StepPrefetcher` runs the stream on one
background thread, up to `depth` steps ahead, and hands out each step's micro-batches as host
tensors, pinned when they go to a GPU so that the copy to it is asynchronous.

Exact resume. The thread reads ahead of the training, so the stream's own state is ahead of
what the steps used. With each step's batches the thread takes the stream's state after them;
`state_dict()` is the state after the last step handed out, which is what a checkpoint must
record: the read-ahead batches are read again after a resume, not lost.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

_END = object()  # the stream has no more batches


class StepPrefetcher:
    """An iterator of optimizer steps: each item is that step's `per_step` micro-batches.

    Args:
        stream: an iterator of micro-batches (dicts of arrays); with `state_dict()` if the run
            is checkpointed. Only this prefetcher's thread reads it from here on.
        per_step: micro-batches per optimizer step (gradient accumulation).
        pin: pin the host tensors in page-locked memory (for a CUDA device).
        depth: steps read ahead and held, at most.
    """

    def __init__(self, stream: Iterator[dict], per_step: int, pin: bool = False, depth: int = 2):
        self.stream, self.per_step, self.pin = stream, per_step, pin
        self._state = self._stream_state()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, name="crucible-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> StepPrefetcher:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        micro, self._state = item
        return micro

    def state_dict(self) -> dict | None:
        """The stream's state after the last step handed out (None if the stream has none)."""
        return self._state

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue: drain it). The stream stays open."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _stream_state(self) -> dict | None:
        state_dict = getattr(self.stream, "state_dict", None)
        return None if state_dict is None else state_dict()

    def _read_ahead(self) -> None:
        try:
            while not self._stop.is_set():
                micro = [self._host_tensors(next(self.stream)) for _ in range(self.per_step)]
                self._put((micro, self._stream_state()))
        except StopIteration:
            self._put(_END)
        except BaseException as e:  # a corrupt shard, a bad record: raised again in the training thread
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _host_tensors(self, batch):
        if not isinstance(batch, dict):
            return batch  # not arrays (an RL step's prompts): the objective's rollout makes its batches
        tensors = {key: torch.as_tensor(value) for key, value in batch.items()}  # numpy: shared, not copied
        return {key: t.pin_memory() for key, t in tensors.items()} if self.pin else tensors
