"""training/preflight.py: what the run will read, checked before any worker starts, each fault one
ConfigError naming the key and the file; and the launchers run it before Ray or a process group.

The data is the real prepared data of tests/training_data.py (pretraining and SFT shards, one
tokenizer); init_from folders are tiny Hugging Face exports written here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.decoder import Decoder
from model.hf import config_to_hf, save_hf
from tests.conftest import ROOT
from tests.training_data import TEST_MODEL, VOCAB
from training.config import ConfigError, load_config
from training.preflight import preflight


def run_config(data: dict, kind: str = "pretrain", *overrides: str):
    """A checked config over the prepared data (no file read yet: that is the preflight's job)."""
    base = [f"data.train={data[kind]}", "data.seq_len=128", "model.overrides=" + json.dumps(TEST_MODEL)]
    return load_config([], [*base, *overrides])


def export(folder: Path, **shape) -> Path:
    """A Hugging Face export of a tiny random model (config.json + model.safetensors, no tokenizer)."""
    model_cfg = ModelConfig(**{**TEST_MODEL, "vocab_size": VOCAB, "max_seq_len": 256, **shape})
    save_hf(Decoder(model_cfg), model_cfg, folder)
    return folder


def test_prepared_data_and_a_fitting_init_from_pass(training_data, tmp_path):
    preflight(run_config(training_data))
    preflight(run_config(training_data, "sft", f"data.val={training_data['sft_val']}"))
    init = export(tmp_path / "init")
    preflight(run_config(training_data, "pretrain", f"init_from={init}"))  # no tokenizer there: nothing to compare
    shutil.copytree(training_data["pretrain"] / "tokenizer", init, dirs_exist_ok=True)
    preflight(run_config(training_data, "pretrain", f"init_from={init}"))  # the data's own tokenizer
    preflight(run_config(training_data, "pretrain", f"resume={init}"))  # a folder (the loop reads it)


def test_the_deepspeed_json_is_checked_against_the_run_config(training_data):
    cfg = run_config(training_data)
    cfg.engine, cfg.deepspeed = "deepspeed", {"zero_optimization": {"stage": 2}}
    preflight(cfg)
    cfg.deepspeed["zero_optimisation"] = {"stage": 3}
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed key 'deepspeed\.zero_optimisation'"):
        preflight(cfg)


def test_a_missing_manifest_or_resume_folder_is_named(training_data, tmp_path):
    with pytest.raises(ConfigError, match=rf"data\.train={tmp_path}: no manifest\.json there; .*prepare_data\.py"):
        preflight(run_config({"pretrain": tmp_path}))
    with pytest.raises(ConfigError, match=rf"data\.val={tmp_path}: no manifest\.json there"):
        preflight(run_config(training_data, "sft", f"data.val={tmp_path}"))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"data\.train={tmp_path}: {tmp_path / 'manifest.json'} was written by"):
        preflight(run_config({"pretrain": tmp_path}))
    with pytest.raises(ConfigError, match=rf"resume={tmp_path / 'nope'}: no such folder"):
        preflight(run_config(training_data, "pretrain", f"resume={tmp_path / 'nope'}"))


def test_val_prepared_with_another_tokenizer_is_refused_naming_both(training_data, tmp_path):
    val = shutil.copytree(training_data["sft_val"], tmp_path / "val")
    manifest = json.loads((val / "manifest.json").read_text())
    theirs, manifest["tokenizer_sha256"] = manifest["tokenizer_sha256"], "ab" * 32
    (val / "manifest.json").write_text(json.dumps(manifest))
    named = rf"data\.val={val} was prepared with another tokenizer \(sha256 abababababab\) than "
    named += rf"data\.train={training_data['sft']} \(sha256 {theirs[:12]}\): prepare it with --tokenizer"
    with pytest.raises(ConfigError, match=named):
        preflight(run_config(training_data, "sft", f"data.val={val}"))


def test_a_tokenizer_bigger_than_the_model_is_refused(training_data, tmp_path):
    named = rf"data\.train=.* has a tokenizer whose ids exceed the model's vocabulary: .*tokenizer has {VOCAB} ids, "
    with pytest.raises(ConfigError, match=named + r"model\.preset=tiny with model\.overrides=.*vocab_size=100"):
        preflight(run_config(training_data, "pretrain", "model.overrides.vocab_size=100"))
    init = export(tmp_path / "init", vocab_size=1000)
    with pytest.raises(ConfigError, match=named + rf"init_from={init} has vocab_size=1000"):
        preflight(run_config(training_data, "pretrain", f"init_from={init}"))


def test_seq_len_beyond_the_models_context_is_refused(training_data, tmp_path):
    context = r"data\.seq_len={} is longer than the model's context of {} tokens \({}; {}"
    with pytest.raises(ConfigError, match=context.format(1024, 512, "max_seq_len=512", r"model\.preset=tiny")):
        preflight(run_config(training_data, "pretrain", "data.seq_len=1024"))
    window = ["model.overrides.arch=mistral", "model.overrides.sliding_window=64"]  # context: the window
    with pytest.raises(ConfigError, match=context.format(128, 64, "max_seq_len=512, sliding_window=64", "model")):
        preflight(run_config(training_data, "pretrain", *window))
    init = export(tmp_path / "init", max_seq_len=64)
    with pytest.raises(ConfigError, match=context.format(128, 64, "max_seq_len=64", f"init_from={init}")):
        preflight(run_config(training_data, "pretrain", f"init_from={init}"))


def test_init_from_that_is_not_a_model_folder_is_named(training_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"init_from={empty}: {empty / 'config.json'}: not found"):
        preflight(run_config(training_data, "pretrain", f"init_from={empty}"))
    init = export(tmp_path / "init")
    (init / "config.json").write_text(json.dumps({**config_to_hf(ModelConfig(**TEST_MODEL)), "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match=rf"init_from={init}: .*hidden_act 'gelu'"):
        preflight(run_config(training_data, "pretrain", f"init_from={init}"))


def _damage_weights(folder: Path, how: str) -> str:
    """Break an HF export's weights as a user might meet it; returns what the error must name."""
    weights = folder / "model.safetensors"
    if how == "cut short":
        weights.write_bytes(weights.read_bytes()[:1000])
        return rf"{weights}: not a readable safetensors file"
    tensors = load_file(str(weights))
    if how == "missing tensor":
        del tensors["model.norm.weight"]
        save_file(tensors, str(weights))
        return r"tensor 'model\.norm\.weight' is missing"
    if how == "wrong shape":
        tensors["model.norm.weight"] = torch.ones(3)
        save_file(tensors, str(weights))
        return r"norm\.weight \(3,\), not \(64,\)"
    (folder / "config.json").write_text("[1, 2]")  # "not an object"
    return rf"{folder / 'config.json'}: must be a JSON object"


@pytest.mark.parametrize("how", ["cut short", "missing tensor", "wrong shape", "not an object"])
def test_init_from_weights_that_do_not_load_are_one_config_error(how, training_data, tmp_path):
    init = export(tmp_path / "init")
    named = _damage_weights(init, how)
    with pytest.raises(ConfigError, match=rf"init_from={init}: .*{named}"):
        preflight(run_config(training_data, "sft", f"init_from={init}"))  # config.json and headers only


def test_init_from_with_another_tokenizer_is_refused_naming_both(training_data, shared_data, tmp_path):
    from data_pipeline.sp_tokenizer import train_tokenizer

    init = export(tmp_path / "init")
    lines = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text().splitlines()
    theirs = train_tokenizer(lines[:2000], 400, init).sha256  # writes init/tokenizer.model
    ours = load_tokenizer(training_data["pretrain"] / "tokenizer").sha256
    named = rf"init_from={init} has another tokenizer \(sha256 {theirs[:12]}\) than data\.train=.*pretrain "
    named += rf"\(sha256 {ours[:12]}, in .*tokenizer\): prepare the data with --tokenizer {init}$"
    with pytest.raises(ConfigError, match=named):
        preflight(run_config(training_data, "pretrain", f"init_from={init}"))
    (init / "tokenizer.model").write_bytes(b"not a sentencepiece model")  # there, but unreadable
    with pytest.raises(ConfigError, match=rf"init_from={init}: cannot read its tokenizer: "):
        preflight(run_config(training_data, "pretrain", f"init_from={init}"))


def test_the_launchers_run_the_preflight_before_any_worker_starts(training_data, tmp_path):
    """pretrain.py before Ray starts; sft.py before the process group and the loop."""
    cmd = [sys.executable, "launch/pretrain.py", f"data.train={tmp_path / 'absent'}", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(rf"(^|\n)pretrain: error: data\.train={tmp_path / 'absent'}: no manifest\.json", done.stderr)
    assert "ray" not in done.stderr.lower().replace("array", "")  # Ray never started
    init = export(tmp_path / "init")
    named = _damage_weights(init, "cut short")
    cmd = [sys.executable, "launch/sft.py", f"data.train={training_data['sft']}", "data.val=null"]
    cmd += ["train.eval_every=0", "train.patience=0", f"init_from={init}", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(rf"(^|\n)sft: error: init_from={init}: .*{named}.*\n$", done.stderr)
    assert not (tmp_path / "run").exists()
