"""Running training.loop.train in real processes (gloo on CPU) for the multi-process tests."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from training.config import RunConfig
from training.engine import exit_without_teardown, free_port


class FixedBatches:
    """This rank's share of fixed global batches: rank r's micro-batch m of a step holds rows
    (r·accum + m)·mb ... of that step's global batch, so any (world, accum, mb) with the same
    product sees the same rows each step."""

    def __init__(self, global_batches: list[dict], rank: int, world: int, accum: int, mb: int):
        self.batches, self.rank, self.world, self.accum, self.mb = global_batches, rank, world, accum, mb
        self.index = 0  # micro-batches handed out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        step, m = divmod(self.index, self.accum)
        start = (self.rank * self.accum + m) * self.mb
        self.index += 1
        return {k: v[start : start + self.mb] for k, v in self.batches[step].items()}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def _worker(rank: int, world: int, port: int, cfg: RunConfig, batches, hook, out: str, objective=None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from training import loop

    data = None
    if batches is not None:
        data = FixedBatches(batches, rank, world, cfg.train.grad_accum, cfg.train.micro_batch)
    model_hook = (lambda m: hook(m, rank)) if hook else None
    summary = loop.train(cfg, data=data, model_hook=model_hook, objective=objective or loop.LANGUAGE_MODELING)
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(summary, f)
    exit_without_teardown(0)  # as launch/sft.py: gloo's threads can abort the teardown of a finished run


def run_processes(
    cfg: RunConfig, world: int, out: Path, batches: list[dict] | None = None, hook=None, objective=None
) -> list[dict]:
    """Run `loop.train(cfg)` (with `objective`) on `world` spawned gloo processes; return each
    rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), cfg, batches, hook, str(out), objective)
    mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
    results = []
    for rank in range(world):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _failing_worker(rank: int, world: int, port: int, cfg: RunConfig, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from training import loop

    try:
        loop.train(cfg)
        outcome = None
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    Path(out, f"rank{rank}.txt").write_text(repr(outcome))
    exit_without_teardown(0)


def errors_of_processes(cfg: RunConfig, world: int, out: Path) -> list[str | None]:
    """Run `loop.train(cfg)` on `world` gloo processes; each rank's error as "Type: message" (or None)."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_failing_worker, args=(world, free_port(), cfg, str(out)), nprocs=world, start_method="spawn")
    return [ast.literal_eval(Path(out, f"rank{rank}.txt").read_text()) for rank in range(world)]


def global_batches(stream, n: int) -> list[dict]:
    return [{k: np.asarray(v) for k, v in next(stream).items()} for _ in range(n)]
