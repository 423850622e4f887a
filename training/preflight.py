"""The checks that read the disk, which the launchers run before any worker starts.

    parse_cli (the schema: values only) ─► preflight(cfg) ─► Ray workers / the launcher's ranks

A run that would fail on its files fails here, in a second, as one ConfigError naming the key and
the file, not in every worker once the process group is up. What is read is small: the shard
manifests, the tokenizer beside data.train, init_from's config.json, safetensors headers (no
weights) and tokenizer. The loop still checks what it loads, since a file may change in between.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.records import DataError
from data_pipeline.shards import MANIFEST_NAME, load_manifest
from data_pipeline.tokenizer import Tokenizer, has_tokenizer, load_tokenizer
from model.config import ModelConfig
from model.hf import check_hf
from training.config import ConfigError, RunConfig, model_config
from training.deepspeed_config import deepspeed_config


def preflight(cfg: RunConfig) -> None:
    """Check what the run will read: the resume folder, the shards' manifests, the tokenizer and
    the model it must fit, init_from's weights and tokenizer; and the DeepSpeed JSON against the
    run config (the part that does not depend on the world size).

    Args:
        cfg: a config that passed the value checks (load_config, parse_cli).
    Raises:
        ConfigError: the first problem, naming the key and the file.
    """
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume}: no such folder; expected auto, never or a checkpoint folder")
    train_sha = _manifest("data.train", cfg.data.train)["tokenizer_sha256"]
    if cfg.data.val is not None:
        val_sha = _manifest("data.val", cfg.data.val)["tokenizer_sha256"]
        if val_sha != train_sha:
            raise ConfigError(
                f"data.val={cfg.data.val} was prepared with another tokenizer (sha256 {val_sha[:12]}) than "
                f"data.train={cfg.data.train} (sha256 {train_sha[:12]}): prepare it with "
                f"--tokenizer {Path(cfg.data.train) / 'tokenizer'}"
            )
    tokenizer = _data_tokenizer(cfg.data.train)
    model, shape = _model(cfg, tokenizer.vocab_size)
    check_model_fits(cfg, tokenizer, model, shape)
    check_init_from_tokenizer(cfg, tokenizer)
    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=None)


def preflight_prompts(cfg: RunConfig) -> None:
    """`preflight` for an RL run, whose data is a prompt set (JSON Lines) and whose tokenizer is
    init_from's: the resume folder, init_from's model and tokenizer, every prompt row, and the
    DeepSpeed JSON.

    Raises:
        ConfigError: the first problem, naming the key and the file (or file:line).
    """
    from data_pipeline.prompts import read_prompts

    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume}: no such folder; expected auto, never or a checkpoint folder")
    if cfg.init_from is None:
        raise ConfigError("RL starts from a trained model: set init_from=MODEL_DIR (an SFT export)")
    try:
        tokenizer = load_tokenizer(Path(cfg.init_from))
        read_prompts(cfg.data.train)
    except (DataError, OSError) as e:
        raise ConfigError(f"init_from={cfg.init_from}, data.train={cfg.data.train}: {e}") from None
    model, shape = _model(cfg, tokenizer.vocab_size)
    check_model_fits(cfg, tokenizer, model, shape)
    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=None)


def _manifest(key: str, folder: str) -> dict:
    if not (Path(folder) / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"{key}={folder}: no {MANIFEST_NAME} there; write shards with launch/prepare_data.py and point "
            f"{key} at them"
        )
    try:
        return load_manifest(folder)
    except DataError as e:
        raise ConfigError(f"{key}={folder}: {e}") from None


def _data_tokenizer(train: str) -> Tokenizer:
    try:
        return load_tokenizer(Path(train) / "tokenizer")
    except DataError as e:
        raise ConfigError(f"data.train={train}: cannot read its tokenizer: {e}") from None


def _model(cfg: RunConfig, vocab_size: int) -> tuple[ModelConfig, str]:
    """The shape the workers will build, and the keys it comes from: init_from's config.json with
    its safetensors headers checked against it (a folder that passes loads), else the preset."""
    if cfg.init_from is not None:
        try:
            return check_hf(cfg.init_from), f"init_from={cfg.init_from}"
        except (OSError, ValueError) as e:
            raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
    shape = f"model.preset={cfg.model.preset}"
    if cfg.model.overrides:
        shape += f" with model.overrides={json.dumps(cfg.model.overrides)}"
    return model_config(cfg, vocab_size), shape


def check_model_fits(cfg: RunConfig, tokenizer: Tokenizer, model: ModelConfig, shape: str) -> None:
    """The model's vocabulary holds every id of the tokenizer, and its context holds a row
    (ConfigError naming `shape`, the keys the model comes from). The loop calls it again on what
    it loaded."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"data.train={cfg.data.train} has a tokenizer whose ids exceed the model's vocabulary: "
            f"{Path(cfg.data.train) / 'tokenizer'} has {tokenizer.vocab_size} ids, {shape} has "
            f"vocab_size={model.vocab_size}"
        )
    if cfg.data.seq_len > model.context_len:
        window = f", sliding_window={model.sliding_window}" if model.sliding_window else ""
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's context of {model.context_len} tokens "
            f"(max_seq_len={model.max_seq_len}{window}; {shape})"
        )


def check_init_from_tokenizer(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """init_from's tokenizer, where it has one, is the data's: the same text must map to the ids
    its embeddings were trained on (ConfigError naming both). The loop calls it again."""
    if cfg.init_from is None:
        return
    folder = Path(cfg.init_from)
    if not has_tokenizer(folder):
        return
    try:
        own = load_tokenizer(folder)
    except DataError as e:
        raise ConfigError(f"init_from={cfg.init_from}: cannot read its tokenizer: {e}") from None
    if own.sha256 != tokenizer.sha256:
        raise ConfigError(
            f"init_from={cfg.init_from} has another tokenizer (sha256 {own.sha256[:12]}) than "
            f"data.train={cfg.data.train} (sha256 {tokenizer.sha256[:12]}, in {Path(cfg.data.train) / 'tokenizer'}): "
            f"prepare the data with --tokenizer {cfg.init_from}"
        )
