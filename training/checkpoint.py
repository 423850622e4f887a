"""Checkpoints: whole-run state in atomic folders, the last K kept, the newest found for resume.

    run_dir/checkpoints/step_00000100/
        engine/             model + optimizer (torch.distributed.checkpoint, or DeepSpeed's files)
        rank_00000.pt ...   per rank: data-stream state, RNG states, the engine's extra state
                            (fp16 loss scale): plain values and tensors, read with weights_only=True
        tokenizer/          the tokenizer the run trained with (tokenizer.model and its HF files)
        meta.json           step, tokens, counters, model shape, tokenizer sha256: written last

A checkpoint is written into `step_XXXXXXXX.tmp/` and renamed when every rank has finished, so a
crash mid-write leaves a `.tmp` folder (or one without meta.json) that `find_latest` passes over;
the previous checkpoint stays usable. The learning-rate schedule is a function of the step, so
the step is its whole state. The folder must be on storage every rank sees (one machine, or a
shared file system on a cluster): `check_shared_run_dir` checks it at the start, and rank 0
checks that it sees every rank's file before it writes meta.json.

Each rank-local part of a save or a load (this rank's files, restoring its state) runs inside
`together`: when it fails on one rank, every rank raises the same error naming that rank, rather
than the others waiting in their next collective until the process-group timeout. The engine's
own save and load do not: they are collectives with barriers of their own.

Trust. A checkpoint is code: DCP's metadata and DeepSpeed's files are pickles, and unpickling can
run code. Load only your own runs' checkpoints (resume, launch/export_hf.py, or
`load_for_inference(..., trust_checkpoint=True)`); share a model as its Hugging Face export, or
a LoRA run's adapter folder (safetensors and JSON: data), which `load_for_inference` always loads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import secrets
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import ConfigError
from training.engine import Dist, broadcast_from_main, single_process_dcp, together

META = "meta.json"
TOKENIZER = "tokenizer"
_STEP_NAME = re.compile(r"step_\d{8,}")
_SHARED_STORAGE = "run_dir must be on storage every rank sees (a shared file system across nodes)"


class UntrustedCheckpoint(ValueError):
    """A training checkpoint (code) was given where only a Hugging Face export (data) loads
    without trust_checkpoint=True."""


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


def check_shared_run_dir(run_dir: str | os.PathLike, where: Dist) -> None:
    """Check that run_dir is the same folder on every rank (a collective; nothing to check alone).

    Rank 0 writes a file with a random token into run_dir, and every rank looks for it: a
    run_dir on each node's own disk would otherwise be found out at the first checkpoint, or
    never (each node resuming from its own checkpoints).

    Raises:
        ConfigError: on every rank, naming a rank that does not see rank 0's file.
    """
    if where.world_size == 1:
        return
    run_dir = Path(run_dir)
    token = broadcast_from_main(secrets.token_hex(8))
    marker = run_dir / f".crucible_rank0_{token}"
    what = "checking run_dir"
    with together(what):
        if where.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_synced(marker, token)
    try:
        with together(what):
            if not (marker.is_file() and marker.read_text() == token):
                raise ConfigError(
                    f"run_dir={run_dir} is not the same folder on every rank (rank {where.rank} does not see rank "
                    "0's file): put run_dir on storage every node sees"
                )
    finally:
        if where.is_main:
            marker.unlink(missing_ok=True)


def save_checkpoint(
    engine, folder_root: Path, state: TrainState, stream_state: dict, where: Dist, meta: dict, keep: int, tokenizer
) -> Path:
    """Write one checkpoint atomically (a collective: every rank calls it).

    Args:
        engine: the training engine (saves model and optimizer).
        folder_root: run_dir/checkpoints.
        state: the loop's counters.
        stream_state: this rank's data-stream state (plain values: see `_check_plain`).
        where: this rank.
        meta: more to record in meta.json (engine name, world size, model shape, ...).
        keep: complete checkpoints to keep (older ones are deleted).
        tokenizer: the Tokenizer the run trains with; the checkpoint carries a copy (the data
            folder it came from may be prepared again later).
    Returns:
        the final folder.
    Raises:
        ConfigError, RankError: on every rank alike, when a rank-local part failed on some rank
            (the message names it); the previous checkpoints are left as they were.
    """
    final = folder_root / f"step_{state.step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    what = f"saving checkpoint {final.name}"
    with together(what):
        if where.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tokenizer.save(tmp / TOKENIZER)
    with together(what):  # before DCP or DeepSpeed makes a folder of that name on a rank's own disk
        if not tmp.is_dir():
            raise ConfigError(
                f"{tmp}: rank 0 made this folder but rank {where.rank} does not see it; {_SHARED_STORAGE}"
            )
    # A collective with barriers of its own (DCP raises a failure on every rank itself): inside
    # `together`, a rank that failed would wait for the others, and they for it, until the timeout.
    engine.save(tmp / "engine")
    with together(what):
        rank_state = {"stream": stream_state, "rng": _rng_state(), "engine": engine.extra_state()}
        _check_plain(rank_state, "rank state")
        rank_file = _rank_file(tmp, where.rank)
        try:
            torch.save(rank_state, rank_file)
        except (OSError, RuntimeError) as e:  # torch's RuntimeError does not name the file
            raise OSError(f"{rank_file}: cannot write this rank's state ({_first_line(e)})") from e
    with together(what):  # its agreement is also the barrier after the rename
        if where.is_main:
            _check_every_rank_wrote(tmp, where.world_size)
            # Every file on disk before meta.json marks the folder complete, and the rename on disk
            # after: a power cut cannot leave a meta.json beside truncated engine files.
            _fsync_tree(tmp)
            record = {**meta, "state": asdict(state), "world_size": where.world_size}
            _write_synced(tmp / META, json.dumps(record, indent=2))
            _replace_folder(tmp, final)  # a step saved again after a resume replaces its folder
            _prune(folder_root, keep)
    return final


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def _check_every_rank_wrote(tmp: Path, world_size: int) -> None:
    """ConfigError naming a rank's file that rank 0 does not see (run_dir not shared)."""
    expected = [tmp / "engine", *(_rank_file(tmp, r) for r in range(world_size))]
    missing = [p for p in expected if not p.exists()]
    if missing:
        raise ConfigError(f"{missing[0]}: written, but rank 0 does not see it; {_SHARED_STORAGE}")


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, name: str) -> None:
    """TypeError naming the first value that torch.load(weights_only=True) would not read back:
    a rank file holds dicts, lists, tuples, strings, numbers, None and tensors only, so that
    reading it runs no code (and a state that could not be resumed fails now, not at resume)."""
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{name} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{name}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{name}[{i}]")
    elif type(value) not in _PLAIN and not isinstance(value, torch.Tensor):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{name} is a {kind}: a checkpoint's rank state holds plain values and tensors only")


def load_checkpoint(engine, folder: Path, where: Dist, engine_name: str) -> tuple[TrainState, dict]:
    """Restore model, optimizer, RNG states and counters; return (state, this rank's stream state).

    A collective: every rank calls it, and a failure on one rank is raised on all of them.

    Raises:
        ConfigError: the checkpoint was written by another engine or number of ranks (the data
            streams are per rank, so a resume needs the same world size), or its files are
            missing or damaged (the message names the folder, and the rank that failed).
    """
    what = f"loading checkpoint {Path(folder).name}"
    with together(what):
        meta = read_meta(folder)
        if meta["world_size"] != where.world_size or meta["engine"] != engine_name:
            raise ConfigError(
                f"{folder}: written by {meta['world_size']} rank(s) of engine {meta['engine']}, resumed with "
                f"{where.world_size} of {engine_name}: resume with the same engine and number of ranks"
            )
    with _named_if_damaged(folder, "its engine/ files do not load"):  # a collective: not in together (save)
        engine.load(folder / "engine")
    rank_file = _rank_file(folder, where.rank)
    with together(what), _named_if_damaged(folder, f"{rank_file.name} does not load"):
        rank_state = _read_plain(rank_file)
        engine.load_extra_state(rank_state["engine"])
        _set_rng_state(rank_state["rng"])
        stream_state = rank_state["stream"]
    return TrainState(**meta["state"]), stream_state


def _read_plain(path: Path) -> dict:
    """A file of plain values and tensors, read with torch.load(weights_only=True): no code runs."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False: the one thing not to do with a file that
        # should hold plain values only. Its cause is the line after "WeightsUnpickler error:".
        cause = re.search(r"WeightsUnpickler error:\s*(.+?)(\.\s|$)", str(e), re.MULTILINE)
        cause = cause.group(1) if cause else str(e)
        if "numpy" in cause:  # what every rank file held before they became plain data
            raise ConfigError(
                f"{path}: written by an earlier Crucible, whose rank files pickled numpy's RNG state; this one "
                "loads plain data only. Finish the run with the Crucible that wrote it, or export it "
                "(launch/export_hf.py) and start a new run with init_from=EXPORT"
            ) from e
        raise ValueError(f"it holds more than plain values and tensors ({cause})") from e


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
    """Every RNG's state as plain values and tensors (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy_state |= {"has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_tokenizer(folder: str | os.PathLike, meta: dict) -> Path:
    """The tokenizer folder of a checkpoint: its own copy (tokenizer/), or for a checkpoint
    written before checkpoints carried one, the run's tokenizer folder named in meta.json (which
    may hold another tokenizer since: compare meta's tokenizer_sha256)."""
    own = Path(folder) / TOKENIZER
    return own if own.is_dir() else Path(meta["tokenizer_dir"])


def write_export(state_dict: dict[str, torch.Tensor], model_cfg, out: str | os.PathLike, tokenizer) -> Path:
    """A Hugging Face folder: config.json + model.safetensors (model/hf.py), the tokenizer's files
    (its chat template included) and generation_config.json, whose eos ids are the tokenizer's
    stop ids, so that transformers' `generate` ends a turn where launch/chat.py does.

    Written by `write_folder`: all or nothing, and nothing of an earlier export survives (a
    stale model.safetensors.index.json would win over the new model.safetensors).

    Args:
        state_dict: the full model weights.
        model_cfg: the model's ModelConfig.
        out: the export folder; an existing one is replaced (launch/export_hf.py asks first).
        tokenizer: a loaded tokenizer, or a folder `load_tokenizer` reads (the files are written
            from what it loads, not copied: the folder may hold stale files beside it).
    Returns:
        out.
    """
    from model.hf import save_hf

    return write_folder(out, tokenizer, lambda folder: save_hf(None, model_cfg, folder, state_dict=state_dict))


def write_adapter_folder(adapters: dict[str, torch.Tensor], lora, out: str | os.PathLike, tokenizer, base: str) -> Path:
    """A peft LoRA adapter folder (adapter_config.json, adapter_model.safetensors) with the
    tokenizer's files beside it, written as `write_export` writes (see `write_folder`).

    Args:
        adapters: the adapter tensors under Crucible or peft names (model/lora.py).
        lora: the LoRAConfig they were trained with.
        out: the folder; an existing adapter folder or export is replaced.
        tokenizer: as `write_export`'s.
        base: the base model's folder, written as base_model_name_or_path.
    """
    from model.lora import write_adapter

    return write_folder(out, tokenizer, lambda folder: write_adapter(adapters, lora, folder, base_model_path=base))


def write_folder(out: str | os.PathLike, tokenizer, fill) -> Path:
    """Write a model folder all or nothing: `fill(folder)` writes the weights into a folder
    beside `out`, the tokenizer's files and generation_config.json (eos ids: the tokenizer's
    stop ids) join them, and the folder is renamed into place when complete, so a crash leaves
    `out` as it was. A folder holding files that no export writes is never replaced."""
    from data_pipeline.tokenizer import load_tokenizer

    out = Path(out).resolve()  # a symlinked out: replace the folder it points to, keep the link
    foreign = not_export_files(out)
    if foreign:
        raise ConfigError(
            f"{out} holds files an export does not write ({', '.join(foreign[:3])}), so it is not replaced: "
            "export into a new folder"
        )
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        fill(staging)
        tok.save(staging)
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_folder(staging, out)
    return out


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 over an HF folder's config.json and weight files (in name order): what a LoRA
    checkpoint records of the base it was trained on, and checks again on resume and export."""
    import hashlib

    folder = Path(folder)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


_EXPORT_FILE = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|adapter_config\.json|adapter_model\.safetensors"
)


def not_export_files(folder: str | os.PathLike) -> list[str]:
    """The entries of `folder` that no export writes (a run's checkpoints, data, a user's notes):
    an export replaces only a folder holding none, so that a wrong --out never deletes them."""
    from data_pipeline.tokenizer import TOKENIZER_FILES

    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if not (p.is_file() and (p.name in TOKENIZER_FILES or _EXPORT_FILE.fullmatch(p.name)))
    )


def _replace_folder(new: Path, old: Path) -> None:
    """Move folder `new` to `old`'s path. The old one is moved aside before and deleted after:
    a crash between the two renames leaves it as .NAME.old beside, never deleted."""
    if old.exists():
        aside = old.with_name(f".{old.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(old, aside)
        os.replace(new, old)
        shutil.rmtree(aside)
    else:
        os.replace(new, old)
    _fsync(old.parent, folder=True)


def load_model_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a checkpoint, read in one process without its engine.

    Args:
        folder: a complete checkpoint folder (step_XXXXXXXX) of a run without LoRA.
    Returns:
        a state dict with the Decoder's parameter names.
    Raises:
        ValueError: a LoRA checkpoint, which holds the adapters only (see `load_adapter_weights`).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("lora"):
        raise ValueError(
            f"{folder} is a LoRA checkpoint: it holds the adapters only, not the base ({meta['base']['path']}); "
            "read them with load_adapter_weights, or export them with launch/export_hf.py (--merge: the whole model)"
        )
    with _named_if_damaged(folder, "its engine/ files do not load"):
        return _model_weights(folder, meta)


def _model_weights(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    if meta["engine"] != "deepspeed":
        from model.config import ModelConfig
        from model.decoder import Decoder

        with torch.device("meta"):
            shapes = Decoder(ModelConfig(**meta["model"])).state_dict()
        return _dcp_model(folder, {k: v.shape for k, v in shapes.items()})
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # ZeRO stages 1-3 (the config refuses 0): the fp32 masters, merged from every rank's partition.
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="engine")


def _dcp_model(folder: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors `shapes` names (fp32) from the model part of a DCP checkpoint's engine/ files."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty(shape, dtype=torch.float32) for k, shape in shapes.items()}
    with single_process_dcp():
        dcp.load({"model": state}, checkpoint_id=str(folder / "engine"))
    return state


def load_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The fp32 LoRA adapters of a LoRA checkpoint, read in one process without its engine (the
    checkpoint holds no base weights: meta.json names the base, see `lora_base`).

    Args:
        folder: a complete checkpoint folder of a run with train.lora.rank > 0.
    Returns:
        every adapter under its Crucible name (`layers.0.attn.wqkv.lora_A.q_proj`; model/lora.py).
    Raises:
        ValueError: a checkpoint without LoRA (see `load_model_weights`).
        ConfigError: engine files that do not load, or lack an adapter (naming the folder).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if not meta.get("lora"):
        raise ValueError(f"{folder} was trained without LoRA: it holds no adapters (load_model_weights reads it)")
    with _named_if_damaged(folder, "its engine/ files do not load"):
        return _adapter_weights(folder, meta)


def _adapter_weights(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.lora import LoRAConfig, apply_lora, is_adapter

    with torch.device("meta"):
        model = apply_lora(Decoder(ModelConfig(**meta["model"])), LoRAConfig(**meta["lora"]))
    shapes = {k: p.shape for k, p in model.named_parameters() if is_adapter(k)}
    if meta["engine"] != "deepspeed":
        return _dcp_model(folder, shapes)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Saved with exclude_frozen_parameters: the files hold the adapters' fp32 masters and no base.
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="engine", exclude_frozen_parameters=True)
    for name, shape in shapes.items():
        if name not in state or state[name].shape != shape:
            got = "missing" if name not in state else f"of shape {tuple(state[name].shape)}"
            raise ValueError(f"adapter {name} is {got}, expected {tuple(shape)}")
    return {k: state[k] for k in shapes}


def lora_merged_weights(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's base with its adapters merged in (model/lora.py `merge_state_dict`),
    what `write_export` writes as a whole model.

    Args:
        folder: a complete LoRA checkpoint folder.
        base: another copy of its base (see `lora_base`); default the path in meta.json.
    Returns:
        the Decoder's weights, each in the base's dtype.
    Raises:
        FileNotFoundError, ValueError: as `lora_base` and `load_adapter_weights`.
    """
    from model.config import ModelConfig
    from model.hf import load_hf
    from model.lora import LoRAConfig, merge_state_dict

    meta = read_meta(folder)
    adapters = load_adapter_weights(folder)
    model, _ = load_hf(lora_base(folder, meta, base))
    state = {**model.state_dict(), **adapters}
    return merge_state_dict(state, ModelConfig(**meta["model"]), LoRAConfig(**meta["lora"]))


def lora_base(folder: str | os.PathLike, meta: dict, base: str | os.PathLike | None = None) -> Path:
    """The base model a LoRA checkpoint's adapters were trained on, checked by its weights' sha256.

    Args:
        folder: the checkpoint (named in errors).
        meta: its meta.json (`base`: the base's path and weights_sha256).
        base: another copy of the base (moved or copied since); default the path in meta.json.
    Returns:
        the base's Hugging Face folder.
    Raises:
        FileNotFoundError: no HF folder there.
        ValueError: it holds other weights than the base the adapters trained on (both digests named).
    """
    path = Path(base if base is not None else meta["base"]["path"])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: the base of LoRA checkpoint {folder} is not there (no config.json); give the folder of a "
            "copy of it (launch/export_hf.py --base DIR)"
        )
    want, got = meta["base"]["sha256"], weights_sha256(path)
    if got != want:
        raise ValueError(
            f"{path} holds other weights than the base LoRA checkpoint {folder} was trained on (sha256 {got}, "
            f"the checkpoint's base: {want}); give a copy of that base (launch/export_hf.py --base DIR)"
        )
    return path


def model_source(path: str | os.PathLike, trust_checkpoint: bool = False) -> Path:
    """The folder `load_for_inference` reads for `path`, checked without reading it.

    Args:
        path: an HF folder (config.json + safetensors weights + tokenizer files), a peft LoRA
            adapter folder (adapter_config.json), a step_XXXXXXXX checkpoint, or a run directory
            (its hf/ export if finished, else a LoRA run's adapter/, else its newest checkpoint).
        trust_checkpoint: accept a checkpoint. A checkpoint is code: reading it unpickles
            files, which can run code. HF and adapter folders (safetensors and JSON) are data:
            always accepted.
    Returns:
        the HF folder (it holds config.json), the adapter folder or the checkpoint folder.
    Raises:
        FileNotFoundError: nothing loadable at `path` (the message names it).
        UntrustedCheckpoint: `path` is a checkpoint, or a run directory without an HF export,
            and trust_checkpoint is False.
    """
    from model.lora import ADAPTER_CONFIG

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    elif (path / "adapter" / ADAPTER_CONFIG).is_file():
        path = path / "adapter"
    if (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
        return path
    folder = path if (path / META).is_file() else find_latest(path)
    if folder is None:
        raise FileNotFoundError(
            f"{path}: not a Hugging Face export (config.json), a LoRA adapter (adapter_config.json), a checkpoint "
            "or a run directory with one"
        )
    if not trust_checkpoint:
        raise UntrustedCheckpoint(
            f"{folder} is a training checkpoint, not a Hugging Face export: a checkpoint is code (loading it "
            "unpickles files and can run code); load only your own runs' checkpoints, with --trust-checkpoint, "
            "or load an HF export (launch/export_hf.py writes one)"
        )
    return folder


def inference_sources(
    path: str | os.PathLike, trust_checkpoint: bool = False, adapter: str | os.PathLike | None = None
) -> tuple[Path, Path | None]:
    """What `load_for_inference` reads for `path` and `adapter`, checked without reading weights.

    Args:
        path: as `model_source`'s; an adapter folder brings its base (base_model_name_or_path).
        trust_checkpoint: as `model_source`'s.
        adapter: a peft LoRA adapter folder to apply to `path`, which must then be an HF folder.
    Returns:
        (the model folder: an HF folder or a checkpoint, the adapter folder or None).
    Raises:
        FileNotFoundError: no model, adapter or local base folder there (the message names it).
        UntrustedCheckpoint: as `model_source`.
        ValueError: an adapter given on an adapter folder or a checkpoint, or an adapter_config.json
            Crucible does not read.
    """
    from model.lora import ADAPTER_CONFIG, read_adapter_config

    folder = model_source(path, trust_checkpoint)
    if (folder / ADAPTER_CONFIG).is_file():
        if adapter is not None:
            raise ValueError(f"{folder} is a LoRA adapter itself: give its base as the model and it as the adapter")
        return adapter_base(folder), folder
    if adapter is None:
        return folder, None
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is a training checkpoint: an adapter goes on a Hugging Face folder (export the checkpoint "
            "with launch/export_hf.py)"
        )
    read_adapter_config(adapter)  # FileNotFoundError naming a folder without adapter_config.json
    return folder, Path(adapter)


def adapter_base(adapter: str | os.PathLike) -> Path:
    """The base model of a peft adapter folder: its base_model_name_or_path, a local HF folder.

    Raises:
        FileNotFoundError: the base is not a local folder with config.json (a hub id, a folder
            moved since); the message names it and says to give the base with the adapter.
    """
    from model.lora import read_adapter_config

    _, base = read_adapter_config(adapter)
    if base is None or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{adapter}: its base model {base!r} (base_model_name_or_path in adapter_config.json) is not a local "
            f"Hugging Face folder; give the base's folder as the model and --adapter {adapter}"
        )
    return Path(base)


def load_for_inference(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_checkpoint: bool = False,
    adapter: str | os.PathLike | None = None,
):
    """A trained model and its tokenizer from a Hugging Face export, a LoRA adapter on its base,
    or a checkpoint or run dir.

    Args:
        path: an HF folder, an adapter folder, a checkpoint or a run directory (see `model_source`).
        device: where the weights go.
        dtype: the base weights' dtype (LoRA adapters stay fp32, as they trained).
        trust_checkpoint: load a checkpoint too (a checkpoint is code; see `model_source`).
        adapter: a peft LoRA adapter folder applied to `path` (an HF folder).
    Returns:
        (Decoder in eval mode, ModelConfig, tokenizer). With an adapter, the tokenizer is the
        adapter folder's when it holds one (a training run writes its own), else the base's.
    Raises:
        FileNotFoundError, UntrustedCheckpoint: as `inference_sources`.
        ValueError: the checkpoint's tokenizer folder holds another tokenizer than it trained with,
            an adapter that does not fit the base, or a LoRA checkpoint's base that changed.
    """
    from data_pipeline.tokenizer import has_tokenizer, load_tokenizer
    from model.hf import load_hf
    from model.lora import apply_lora, load_adapter, read_adapter_config

    folder, adapter = inference_sources(path, trust_checkpoint, adapter)
    if not (folder / "config.json").is_file():
        model, model_cfg, tok = _checkpoint_for_inference(folder, device, dtype)
        return model.eval(), model_cfg, tok
    model, model_cfg = load_hf(folder, device=device, dtype=dtype)
    if adapter is None:
        return model.eval(), model_cfg, load_tokenizer(folder)
    lora, _ = read_adapter_config(adapter)
    load_adapter(apply_lora(model, lora), adapter)
    tok = load_tokenizer(adapter if has_tokenizer(adapter) else folder)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"{adapter}: its tokenizer has {tok.vocab_size} ids, more than the vocab_size={model_cfg.vocab_size} "
            f"of its base {folder}"
        )
    return model.eval(), model_cfg, tok


def _checkpoint_for_inference(folder: Path, device, dtype):
    """(Decoder, ModelConfig, tokenizer) of a checkpoint: its weights, or for a LoRA checkpoint
    its base (checked by sha256) with its adapters applied."""
    from data_pipeline.tokenizer import load_tokenizer
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import load_hf
    from model.lora import LoRAConfig, apply_lora, is_adapter

    meta = read_meta(folder)
    tok_dir = checkpoint_tokenizer(folder, meta)
    tok = load_tokenizer(tok_dir)
    if meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise ValueError(f"{tok_dir}: not the tokenizer checkpoint {folder} was trained with")
    model_cfg = ModelConfig(**meta["model"])
    if not meta.get("lora"):
        with torch.device("meta"):
            model = Decoder(model_cfg)
        model.load_state_dict(load_model_weights(folder), assign=True)
        return model.to(device, dtype), model_cfg, tok
    model, _ = load_hf(lora_base(folder, meta), device=device, dtype=dtype)
    adapters = load_adapter_weights(folder)
    with torch.no_grad():
        for name, p in apply_lora(model, LoRAConfig(**meta["lora"])).named_parameters():
            if is_adapter(name):
                p.copy_(adapters[name])
    return model, model_cfg, tok
