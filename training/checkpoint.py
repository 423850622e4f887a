"""Checkpoints: whole-run state in atomic folders, the last K kept, the newest found for resume.

    run_dir/checkpoints/step_00000100/
        engine/             model + optimizer (torch.distributed.checkpoint, or DeepSpeed's files)
        rank_00000.pt ...   per rank: data-stream state and RNG states
        meta.json           step, tokens, counters, loss scale, model shape: written last

A checkpoint is written into `step_XXXXXXXX.tmp/` and renamed when every rank has finished, so a
crash mid-write leaves a `.tmp` folder (or one without meta.json) that `find_latest` passes over;
the previous checkpoint stays usable. The learning-rate schedule is a function of the step, so
the step is its whole state. The folder must be on storage every rank sees (one machine, or a
shared file system on a cluster).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import ConfigError
from training.engine import Dist, barrier, single_process_dcp

META = "meta.json"
_STEP_NAME = re.compile(r"step_\d{8,}")


@dataclass
class TrainState:
    """The loop's counters, saved in meta.json."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    resumes: int = 0
    best_val_loss: float | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    bad_in_a_row: int = 0
    """Non-finite steps in a row so far (train.max_bad_steps counts across a resume)."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in run_dir, or None. Unfinished folders, and folders whose
    names are not step_XXXXXXXX (a copy such as step_00000100.bak), are passed over."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    return max(_complete(root, warn=True), key=_step_of, default=None)


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def _complete(root: Path, warn: bool = False) -> list[Path]:
    """The complete checkpoint folders under root: named step_ and (eight or more) digits, with a meta.json."""
    complete = []
    for folder in root.glob("step_*"):
        named = _STEP_NAME.fullmatch(folder.name) is not None
        if named and (folder / META).is_file():
            complete.append(folder)
        elif warn:
            why = "an unfinished checkpoint" if named or folder.suffix == ".tmp" else "not a checkpoint's name"
            warnings.warn(f"{folder}: {why}; passed over", stacklevel=3)
    return complete


def save_checkpoint(
    engine, folder_root: Path, state: TrainState, stream_state: dict, where: Dist, meta: dict, keep: int
) -> Path:
    """Write one checkpoint atomically (a collective: every rank calls it).

    Args:
        engine: the training engine (saves model and optimizer).
        folder_root: run_dir/checkpoints.
        state: the loop's counters.
        stream_state: this rank's data-stream state.
        where: this rank.
        meta: more to record in meta.json (engine name, world size, model shape, ...).
        keep: complete checkpoints to keep (older ones are deleted).
    Returns:
        the final folder.
    """
    final = folder_root / f"step_{state.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if where.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp / "engine")
    rank_state = {"stream": stream_state, "rng": _rng_state(), "engine": engine.extra_state()}
    torch.save(rank_state, tmp / f"rank_{where.rank:05d}.pt")
    barrier()
    if where.is_main:
        # Every file on disk before meta.json marks the folder complete, and the rename on disk
        # after: a power cut cannot leave a meta.json beside truncated engine files.
        _fsync_tree(tmp)
        record = {**meta, "state": asdict(state), "world_size": where.world_size}
        _write_synced(tmp / META, json.dumps(record, indent=2))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(folder_root, folder=True)
        _prune(folder_root, keep)
    barrier()
    return final


def load_checkpoint(engine, folder: Path, where: Dist, engine_name: str) -> tuple[TrainState, dict]:
    """Restore model, optimizer, RNG states and counters; return (state, this rank's stream state).

    Raises:
        ConfigError: the checkpoint was written by another engine or number of ranks (the data
            streams are per rank, so a resume needs the same world size), or its files are
            missing or damaged (the message names the folder).
    """
    meta = read_meta(folder)
    if meta["world_size"] != where.world_size or meta["engine"] != engine_name:
        raise ConfigError(
            f"{folder}: written by {meta['world_size']} rank(s) of engine {meta['engine']}, resumed with "
            f"{where.world_size} of {engine_name}: resume with the same engine and number of ranks"
        )
    rank_file = folder / f"rank_{where.rank:05d}.pt"
    with _named_if_damaged(folder, "its engine/ files do not load"):
        engine.load(folder / "engine")
    with _named_if_damaged(folder, f"{rank_file.name} does not load"):
        rank_state = torch.load(rank_file, weights_only=False)
    engine.load_extra_state(rank_state["engine"])
    _set_rng_state(rank_state["rng"])
    return TrainState(**meta["state"]), rank_state["stream"]


def read_meta(folder: str | os.PathLike) -> dict:
    """A checkpoint's meta.json. Raises ConfigError naming the folder when it is missing or damaged."""
    try:
        return json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError) as e:
        raise _damaged(Path(folder), f"its {META} is missing or unreadable ({e})") from e


@contextlib.contextmanager
def _named_if_damaged(folder: Path, what: str):
    """Turn any failure to read the checkpoint's files into one ConfigError naming the folder."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        yield
    except ConfigError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise _damaged(folder, f"{what} ({_first_line(e)})") from e


def _first_line(error: BaseException) -> str:
    failures = getattr(error, "failures", None)  # DCP's CheckpointException: {rank: (error, trace)}
    if failures:
        error = next(iter(failures.values()))[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _damaged(folder: Path, why: str) -> ConfigError:
    return ConfigError(
        f"checkpoint {folder}: {why}; move the folder out of {folder.parent} (resume=auto then continues "
        "from the checkpoint before it)"
    )


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (whichever rank wrote them: fsync acts on the file)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder), folder=True)


def _fsync(path: Path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (network ones) cannot fsync a folder
        if not (folder and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    for old in sorted(_complete(root), key=_step_of)[:-keep]:
        # meta.json first: a crash halfway through leaves an unfinished folder, never a complete-looking one.
        (old / META).unlink()
        shutil.rmtree(old)
    for stale in root.glob("step_*.tmp"):  # left by a crash; the rename above has finished ours
        shutil.rmtree(stale, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_export(state_dict: dict[str, torch.Tensor], model_cfg, out: Path, tokenizer_dir: Path) -> Path:
    """A Hugging Face folder: config.json + model.safetensors (model/hf.py) + the tokenizer files,
    made from tokenizer_dir's tokenizer.model (not copied: the folder may hold that file alone, or
    beside the files of a tokenizer it has since replaced), generation_config.json included."""
    from data_pipeline.tokenizer import Tokenizer
    from model.hf import save_hf

    save_hf(None, model_cfg, out, state_dict=state_dict)
    Tokenizer.load(tokenizer_dir).save_hf(out)
    return Path(out)


def load_model_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a checkpoint, read in one process without its engine.

    Args:
        folder: a complete checkpoint folder (step_XXXXXXXX).
    Returns:
        a state dict with the Decoder's parameter names.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    with _named_if_damaged(folder, "its engine/ files do not load"):
        return _model_weights(folder, meta)


def _model_weights(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    if meta["engine"] != "deepspeed":
        import torch.distributed.checkpoint as dcp

        from model.config import ModelConfig
        from model.decoder import Decoder

        with torch.device("meta"):
            shapes = Decoder(ModelConfig(**meta["model"])).state_dict()
        state = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in shapes.items()}
        with single_process_dcp():
            dcp.load({"model": state}, checkpoint_id=str(folder / "engine"))
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # ZeRO stages 1-3 (the config refuses 0): the fp32 masters, merged from every rank's partition.
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="engine")


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A trained model and its tokenizer from a Hugging Face export, a checkpoint or a run dir.

    Args:
        path: an HF folder (config.json + weights + tokenizer files), a step_XXXXXXXX checkpoint,
            or a run directory (its hf/ export if finished, else its newest checkpoint).
        device: where the weights go.
        dtype: their dtype.
    Returns:
        (Decoder in eval mode, ModelConfig, Tokenizer).
    Raises:
        FileNotFoundError: nothing loadable at `path` (the message names it).
        ValueError: the checkpoint's tokenizer folder holds another tokenizer than it trained with.
    """
    from data_pipeline.tokenizer import Tokenizer
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import load_hf

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        model, model_cfg = load_hf(path, device=device, dtype=dtype)
        return model.eval(), model_cfg, Tokenizer.load(path)
    folder = path if (path / META).is_file() else find_latest(path)
    if folder is None:
        raise FileNotFoundError(
            f"{path}: not a Hugging Face export (config.json), a checkpoint or a run directory with one"
        )
    meta = read_meta(folder)
    tok = Tokenizer.load(meta["tokenizer_dir"])
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise ValueError(f"{meta['tokenizer_dir']}: not the tokenizer checkpoint {folder} was trained with")
    model_cfg = ModelConfig(**meta["model"])
    with torch.device("meta"):
        model = Decoder(model_cfg)
    model.load_state_dict(load_model_weights(folder), assign=True)
    return model.to(device, dtype).eval(), model_cfg, tok
