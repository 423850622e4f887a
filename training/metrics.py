"""Throughput and memory figures, and `Reporter`: the one rank-0 helper for output and files.

Every print, metrics line, progress bar and file of a run goes through a `Reporter`, so that
only rank 0 ever writes; on the other ranks each call does nothing.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.files import write_atomically

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's datasheets, keyed by a word of
# torch.cuda.get_device_name(). Checked in order, so a more specific name comes first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 80GB HBM3": 989e12,  # H100 SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # H200 SXM
    "A100": 312e12,  # SXM and PCIe alike
    "L4": 121e12,  # whole words only, so "L40S" is not an L4
    "A10G": 70e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device, for MFU.

    Args:
        device: the training device.
    Returns:
        FLOP/s from `PEAK_BF16_FLOPS`, or None on CPU or a GPU not in the table.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE):
            return flops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory used so far: allocated tensors on CUDA, the process's peak RSS on CPU.

    Args:
        device: the training device.
    Returns:
        bytes.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: VmHWM on Linux, where getrusage's ru_maxrss
    would keep a larger parent's peak across fork and exec; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def throughput(tokens: int, seconds: float, flops_per_token: int, world_size: int, peak: float | None) -> dict:
    """Tokens per second, achieved TFLOP/s and model FLOPs utilisation.

    Args:
        tokens: tokens processed by all ranks together in `seconds`.
        seconds: wall time.
        flops_per_token: training FLOPs per token (`Decoder.num_flops_per_token`).
        world_size: number of devices sharing the work.
        peak: peak FLOP/s of one device (`peak_flops`), or None when unknown.
    Returns:
        {"tokens_per_s": global tokens/s, "tflops": TFLOP/s per device, "mfu": achieved / peak
        per device, or None when `peak` is None}.
    """
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token / world_size
    return {
        "tokens_per_s": tokens_per_s,
        "tflops": flops_per_device / 1e12,
        "mfu": None if peak is None else flops_per_device / peak,
    }


def _json_safe(value):
    # Strict JSON has no NaN or Infinity; a diverged loss is written as null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _summary_writer(log_dir: Path, purge_step: int | None):
    # TensorBoard is optional: without it the run simply has no event files.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


class Reporter:
    """Rank-0 printing, metrics lines, progress bar, TensorBoard scalars and run files.

    Files in `run_dir`: `metrics.jsonl` (one JSON object per `log_step`, non-finite floats
    written as null), `tensorboard/` (when tensorboard is installed) and whatever `write_json`
    is given. On any rank but 0 every method does nothing and no file is created.

    Args:
        run_dir: the run directory, created on rank 0 if missing.
        rank: this process's global rank.
        max_steps: the last step, the progress bar's total.
        start_step: the step already done (the checkpoint's step on resume).
        tensorboard: also write TensorBoard scalars, if tensorboard is installed.
    """

    def __init__(self, run_dir: str | Path, rank: int, max_steps: int, start_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.max_steps = max_steps
        self.start_step = start_step
        self._bar = None  # opened by the first log_step, so setup messages print plainly
        self._file = None
        self._writer = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                # On resume, drop events after the checkpoint: those steps are about to be redone.
                purge_step = start_step + 1 if start_step > 0 else None
                self._writer = _summary_writer(self.run_dir / "tensorboard", purge_step)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def print(self, msg: str) -> None:
        """Print a line on rank 0, above the progress bar when it is open.

        Args:
            msg: the text.
        """
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(msg)
        else:
            print(msg, flush=True)

    def log_step(self, record: dict) -> None:
        """Record one step: a metrics.jsonl line, the progress bar, TensorBoard scalars.

        Args:
            record: the step's figures; must hold "step". The bar shows "loss" and
                "tokens_per_s" when present.
        """
        if "step" not in record:
            raise KeyError(f"a metrics record needs a 'step' field; got {sorted(record)}")
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.metrics_path, "a")
        # Flushed line by line so that a crash keeps every finished step.
        self._file.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._file.flush()
        self._update_bar(record)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, record["step"])

    def _update_bar(self, record: dict) -> None:
        if self._bar is None:
            self._bar = tqdm(total=self.max_steps, initial=self.start_step, unit="step", dynamic_ncols=True)
        self._bar.update(record["step"] - self._bar.n)
        postfix = {}
        if record.get("loss") is not None:
            postfix["loss"] = f"{record['loss']:.4f}"
        if record.get("tokens_per_s") is not None:
            postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        for key, shown in (("reward_accuracy", "acc"), ("reward_margin", "margin"), ("reward", "reward")):
            if record.get(key) is not None:  # preference and RL stages
                postfix[shown] = f"{record[key]:.3f}"
        self._bar.set_postfix(postfix, refresh=False)

    def truncate_after(self, step: int) -> None:
        """On resume, keep only the metrics lines of steps up to `step` (later ones are redone).

        Lines that do not parse (a crash mid-write) are dropped as well, and counted in a message.

        Args:
            step: the checkpoint's step.
        """
        if not self.enabled or not self.metrics_path.exists():
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        kept, n_broken = [], 0
        for line in self.metrics_path.read_text().splitlines():
            try:
                keep = json.loads(line)["step"] <= step
            except (json.JSONDecodeError, KeyError, TypeError):
                n_broken += 1
                continue
            if keep:
                kept.append(line + "\n")
        write_atomically(self.metrics_path, "".join(kept))
        if n_broken:
            self.print(f"dropped {n_broken} unreadable line(s) from {self.metrics_path}")

    def write_json(self, name: str, obj) -> None:
        """Write `run_dir/name` atomically as indented JSON (non-finite floats as null).

        Args:
            name: file name inside the run directory.
            obj: anything JSON-serialisable.
        """
        if self.enabled:
            write_atomically(self.run_dir / name, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")

    def close(self) -> None:
        """Close the progress bar, the metrics file and the TensorBoard writer."""
        for handle in (self._bar, self._file, self._writer):
            if handle is not None:
                handle.close()
        self._bar = self._file = self._writer = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
