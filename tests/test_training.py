"""The run config, the single-process loop, checkpoints and exports (in one process, CPU).

The multi-process behaviour (exact accumulation over ranks, NaN skips on every rank, exact resume
through the launchers, Ray restarts) is in test_training_dist.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.hf import load_hf
from tests.conftest import ROOT
from tests.training_data import TEST_MODEL
from training.checkpoint import find_latest, load_checkpoint, load_model_weights, read_meta
from training.config import ConfigError, RunConfig, deepspeed_config, find_config_file, load_config, parse_cli
from training.engine import LossScaler, TorchEngine, init_distributed
from training.loop import TrainingError, build_model, train

# --- configuration ---------------------------------------------------------------------------------


def data_overrides(data: dict, kind: str = "pretrain") -> list[str]:
    return [f"data.train={data[kind]}", "data.seq_len=128", "model.overrides=" + json.dumps(TEST_MODEL)]


def test_overrides_yaml_and_types(training_data, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  lr: 3e-4\n  max_steps: 7\nmodel:\n  preset: tiny\n  overrides:\n    rope_theta: 5e5\n")
    overrides = ["train.micro_batch=3", "train.betas=[0.9, 0.99]", "model.overrides.norm_eps=1e-6"]
    cfg = load_config([str(run)], [*data_overrides(training_data), *overrides])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML reads 3e-4 as a string
    assert cfg.train.max_steps == 7 and cfg.train.micro_batch == 3 and cfg.train.betas == (0.9, 0.99)
    assert cfg.model.overrides["dim"] == 64 and cfg.engine == "single"
    # model.overrides are typed like every other key: the model gets floats, not "5e5"
    assert cfg.model.overrides["rope_theta"] == 5e5 and isinstance(cfg.model.overrides["rope_theta"], float)
    assert cfg.model.overrides["norm_eps"] == 1e-6 and isinstance(cfg.model.overrides["norm_eps"], float)


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lrr=1", "'train.lrr'"),
        ("trian.lr=1", "'trian'"),
        ("train.max_steps=1.5", "train.max_steps=1.5"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("engine=megatron", "engine='megatron'"),
        ("train.max_steps=0", "train.max_steps=0"),
        ("model.preset=huge", "model.preset='huge'"),
        ("model.overrides.depth=3", "model.overrides"),
        ("train=3", "train is a section"),
        ("train.eval_every=5", "data.val"),
        ("resume=/no/such/dir", "resume="),
        ("train.activation_checkpointing=true", "train.activation_checkpointing=True is not a valid str"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing='some'; choose one of none, full"),
        ("model.overrides.n_layers=two", "command line: model.overrides.n_layers='two' is not a valid int"),
        ("model.overrides.dim=64.5", "model.overrides.dim=64.5 is not a valid int"),
        ("model.overrides.tie_embeddings=maybe", "model.overrides.tie_embeddings='maybe' is not a valid bool"),
        ("model.overrides.norm_eps=small", "model.overrides.norm_eps='small' is not a valid float"),
        ("model.overrides={n_layers: 2, dimm: 3}", "unknown key 'model.overrides.dimm'"),
        ("model.overrides.n_layers=0", "model.n_layers=0 must be at least 1"),
        ("model.overrides.norm_eps=-1e-6", "model.norm_eps=-1e-06 must be positive"),
        ("data.seq_len=1024", "data.seq_len=1024 is longer than the model's max_seq_len=512"),
        ("model.overrides.max_seq_len=64", "data.seq_len=128 is longer than the model's max_seq_len=64"),
        ("model.overrides.vocab_size=100", "vocab_size=100 is smaller than the 1024 pieces of the tokenizer of data"),
        ("train.min_lr_ratio=-1", "train.min_lr_ratio=-1.0 must be between 0 and 1"),
        ("train.decay_frac=7", "train.decay_frac=7.0 must be between 0 and 1"),
        ("train.eps=-1", "train.eps=-1.0 must be positive"),
        ("train.eps=0", "train.eps=0.0 must be positive"),
        ("train.betas=[0.9, 1.5]", "train.betas=[0.9, 1.5]: each must be in"),
        ("train.z_loss=-1", "train.z_loss=-1.0 must not be negative"),
        ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5 must not be negative"),
        ("ray.num_workers=0", "ray.num_workers=0 must be at least 1"),
        (
            "deepspeed.zero_optimisation.stage=3",
            "command line: unknown DeepSpeed key 'deepspeed.zero_optimisation'; did you mean 'zero_optimization'",
        ),
    ],
)
def test_bad_keys_and_values_are_named(override, named, training_data):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace(".", r"\.")):
        load_config([], [*data_overrides(training_data), override])


def test_patience_needs_evaluations(training_data):
    with pytest.raises(ConfigError, match=r"train\.patience=3 counts evaluations, but train\.eval_every=0"):
        load_config([], [*data_overrides(training_data), f"data.val={training_data['sft_val']}", "train.patience=3"])


def test_init_from_must_fit_the_data(training_data, tmp_path):
    """check() reads init_from/config.json: its vocabulary and context are those the workers get."""
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import config_to_hf, save_hf

    base = [*data_overrides(training_data), f"init_from={tmp_path}"]
    for shape, named in [
        (
            dict(vocab_size=1024, max_seq_len=64),
            rf"data\.seq_len=128 is longer .* max_seq_len=64 \(init_from={tmp_path}\)",
        ),
        (dict(vocab_size=1000, max_seq_len=256), rf"init_from={tmp_path}: vocab_size=1000 is smaller than the 1024"),
    ]:
        model_cfg = ModelConfig(**TEST_MODEL, **shape)
        save_hf(Decoder(model_cfg), model_cfg, tmp_path)
        with pytest.raises(ConfigError, match=named):
            load_config([], base)
    (tmp_path / "config.json").write_text(json.dumps({**config_to_hf(ModelConfig(**TEST_MODEL)), "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match=rf"init_from={tmp_path}: .*hidden_act 'gelu'"):
        load_config([], base)


def _damage_weights(folder: Path, how: str) -> str:
    """Break an HF export's weights as a user might meet it; returns what the error must name."""
    from safetensors.torch import save_file

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
def test_init_from_weights_that_do_not_load_are_one_config_error_before_training(how, training_data, tmp_path):
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import save_hf

    model_cfg = ModelConfig(**TEST_MODEL, vocab_size=1024, max_seq_len=256)
    save_hf(Decoder(model_cfg), model_cfg, tmp_path / "init")
    named = _damage_weights(tmp_path / "init", how)
    overrides = [*data_overrides(training_data), f"init_from={tmp_path / 'init'}", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=rf"init_from={tmp_path / 'init'}: .*{named}"):
        load_config([], overrides)  # the preflight reads only config.json and the safetensors headers
    cmd = [sys.executable, "launch/sft.py", *overrides, "data.val=null", "train.eval_every=0", "train.patience=0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and re.search(rf"\nsft.py: error: init_from=.*{named}.*\n$", done.stderr)
    assert not (tmp_path / "run").exists()


def test_init_from_damaged_after_the_check_is_a_config_error_in_the_loop(training_data, tmp_path):
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.hf import save_hf

    model_cfg = ModelConfig(**TEST_MODEL, vocab_size=1024, max_seq_len=256)
    save_hf(Decoder(model_cfg), model_cfg, tmp_path / "init")
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1)
    cfg.init_from = str(tmp_path / "init")
    named = _damage_weights(tmp_path / "init", "cut short")
    with pytest.raises(ConfigError, match=rf"init_from={tmp_path / 'init'}: {named}"):
        train(cfg)


def test_precision_auto_is_fp32_on_a_cpu_and_the_choice_is_printed_and_recorded(training_data, tmp_path, capsys):
    from training.engine import resolve_precision

    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1)
    cfg.train.precision = "auto"
    assert RunConfig().train.precision == "auto"  # the default
    assert resolve_precision(cfg, torch.device("cpu")).train.precision == "fp32"
    assert cfg.train.precision == "auto"  # a copy: the caller's config is unchanged
    train(cfg)
    assert "single engine on 1 × cpu, fp32 (train.precision=auto)" in capsys.readouterr().out
    assert "precision: fp32" in (tmp_path / "run" / "config.yaml").read_text()


def test_missing_data_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train=.*no manifest\.json"):
        load_config([], [f"data.train={tmp_path}"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["nope.yaml"], [])
    with pytest.raises(ConfigError, match="ambiguous, it could be configs/models/tiny.yaml, configs/pretrain/tiny"):
        load_config(["tiny.yaml"], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config([str(bad)], [])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=rf"{unknown}: unknown key 'train\.warmup'"):
        load_config([str(unknown)], [])


def test_deepspeed_json_is_filled_from_the_run_config_or_must_agree(training_data, tmp_path):
    assert find_config_file("zero3.json") == ROOT / "configs" / "zero3.json"
    cfg = load_config(["zero3.json"], [*data_overrides(training_data), "train.micro_batch=2", "train.grad_accum=4"])
    assert cfg.engine == "deepspeed"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] == "auto"  # precision auto: decided on the worker's device (engine.py)
    cfg.train.precision = "bf16"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False

    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    cfg = load_config([str(fixed)], [*data_overrides(training_data), "train.micro_batch=2", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"train_batch_size=32 disagrees with .*world size 2=16"):
        deepspeed_config(cfg, world_size=2)
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"deepspeed\.optimizer"):
        load_config([str(owned)], data_overrides(training_data))
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True disagrees with train\.precision=fp16"):
        fp16 = tmp_path / "bf16.json"
        fp16.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
        load_config([str(fp16)], [*data_overrides(training_data), "train.precision=fp16"])
    # precision auto is decided on the worker: a JSON that decides it instead is refused up front
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True with train\.precision=auto: .*train\.precision=bf16"):
        load_config([str(fp16)], data_overrides(training_data))


def test_misspelled_deepspeed_keys_are_refused_with_the_file_named(training_data, tmp_path):
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"zero_optimisation": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    with pytest.raises(
        ConfigError, match=rf"{typo}: unknown DeepSpeed key 'deepspeed\.zero_optimisation'; did you mean"
    ):
        load_config([str(typo)], data_overrides(training_data))
    typo.write_text(json.dumps({"gradient_clippping": 0.5, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"'deepspeed\.gradient_clippping'; did you mean 'gradient_clipping'"):
        load_config([str(typo)], data_overrides(training_data))
    typo.write_text(json.dumps({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"deepspeed\.bfloat16 is DeepSpeed's old spelling.*write it as 'bf16'"):
        load_config([str(typo)], data_overrides(training_data))
    run = tmp_path / "run.yaml"  # the same check for a DeepSpeed section inside a run config
    run.write_text("engine: deepspeed\ndeepspeed:\n  zero_optimization: {stage: 2}\n  wall_clock_breakdwn: true\n")
    with pytest.raises(ConfigError, match=rf"{run}: unknown DeepSpeed key 'deepspeed\.wall_clock_breakdwn'"):
        load_config([str(run)], data_overrides(training_data))


COMMON_DEEPSPEED_KEYS = """optimizer scheduler fp16 bf16 zero_optimization gradient_clipping train_batch_size
    train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print wall_clock_breakdown
    activation_checkpointing flops_profiler zero_allow_untested_optimizer communication_data_type prescale_gradients
    gradient_predivide_factor tensorboard wandb csv_monitor comms_logger aio data_types""".split()

# Records every top-level key DeepSpeedConfig looks up (get, [], in, in .keys()), in a fresh process
# so that the CPU accelerator DeepSpeed picks at import stays out of this one.
_RECORD_DEEPSPEED_KEYS = """
import json, logging, os
os.environ["DS_ACCELERATOR"] = "cpu"
logging.disable(logging.WARNING)
from collections.abc import KeysView
from deepspeed.runtime.config import DeepSpeedConfig
seen = set()
class Keys(KeysView):
    def __contains__(self, k):
        seen.add(k)
        return k in self._mapping
class Recording(dict):
    def get(self, k, *default):
        seen.add(k)
        return super().get(k, *default)
    def __getitem__(self, k):
        seen.add(k)
        return super().__getitem__(k)
    def __contains__(self, k):
        seen.add(k)
        return super().__contains__(k)
    def keys(self):
        return Keys(self)
for extra in ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
              {"fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}, {}):
    DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1, **extra))
print(json.dumps(sorted(seen)))
"""


def test_the_deepspeed_key_list_is_deepspeeds(training_data):
    """DEEPSPEED_KEYS is a list (importing deepspeed in every config check would fix its
    accelerator); it must hold every top-level key the installed DeepSpeed reads, and no other."""
    from training.config import _DEEPSPEED_RENAMED, DEEPSPEED_KEYS

    done = subprocess.run([sys.executable, "-c", _RECORD_DEEPSPEED_KEYS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    read = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"zero_optimization", "optimizer", "gradient_clipping", "aio"} <= read  # the recording worked
    assert read - DEEPSPEED_KEYS - set(_DEEPSPEED_RENAMED) == set(), "keys DeepSpeed reads that the list refuses"
    assert DEEPSPEED_KEYS - read == set(), "keys in the list that DeepSpeed does not read"
    assert set(COMMON_DEEPSPEED_KEYS) <= DEEPSPEED_KEYS
    # every shipped JSON and every key deepspeed_config fills in pass
    for path in sorted((ROOT / "configs").glob("*.json")):
        assert set(json.loads(path.read_text())) <= DEEPSPEED_KEYS, path
        cfg = load_config([str(path)], data_overrides(training_data))
        assert set(deepspeed_config(cfg, world_size=2)) <= DEEPSPEED_KEYS


@pytest.mark.parametrize("launcher", ["launch/pretrain.py", "launch/sft.py", "launch/export_hf.py"])
def test_launchers_print_help(launcher):
    done = subprocess.run([sys.executable, launcher, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert done.stdout.count("python launch/") + done.stdout.count("deepspeed launch/") >= 1  # the command line


def test_a_bad_config_fails_before_any_worker_starts(training_data):
    cmd = [sys.executable, "launch/pretrain.py", *data_overrides(training_data), "train.nope=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown key 'train.nope'" in done.stderr
    assert "ray" not in done.stderr.lower().replace("array", "")  # Ray never started


def test_parse_cli_accepts_the_deepspeed_launchers_local_rank(training_data):
    cfg = parse_cli(["--local_rank=1", "--config", "zero2.json", *data_overrides(training_data)], "doc")
    assert cfg.engine == "deepspeed" and cfg.deepspeed["zero_optimization"]["stage"] == 2


# --- the single-process loop -------------------------------------------------------------------------


def single_cfg(run_dir: Path, data: dict, kind: str = "pretrain", **train) -> RunConfig:
    cfg = load_config([], [f"run_dir={run_dir}", *data_overrides(data, kind)])
    cfg.train.micro_batch, cfg.train.warmup_steps, cfg.train.precision = 4, 2, "fp32"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_single_run_writes_metrics_checkpoints_and_a_loadable_export(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    summary = train(cfg)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tflops", "peak_mem_bytes", "data_wait_frac"):
        assert all(r[key] is not None for r in records), key
    assert all("mfu" in r for r in records) and records[-1]["tokens"] == 6 * 4 * 128
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert load_config([str(run / "config.yaml")], []).train.max_steps == 6  # the resolved config reloads

    # the export loads in transformers and gives the loop's model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    ours, _ = load_hf(run / "hf")
    tokens = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    assert (run / "hf" / "tokenizer.model").is_file()
    # launch/export_hf.py writes the same weights from the last checkpoint, without the engine
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "launch/export_hf.py", str(run), "--out", str(out)], cwd=ROOT, check=True)
    a, b = load_file(str(run / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["step"] == 6 and summary["export"] == str(run / "hf")

    # SFT starts from the export: the model is the exported one, and SFT trains from it
    sft = single_cfg(tmp_path / "sft", training_data, kind="sft", max_steps=2, checkpoint_every=2)
    sft.init_from, sft.data.seq_len = str(run / "hf"), 256
    model, _ = build_model(sft, _tokenizer(sft))
    assert all(torch.equal(p, ours.state_dict()[name]) for name, p in model.state_dict().items())
    assert all(math.isfinite(x) for x in train(sft)["losses"])
    # ... but not with data tokenized by another tokenizer
    (run / "hf" / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(ConfigError, match=r"init_from=.*another tokenizer than the one of data\.train"):
        build_model(sft, _tokenizer(sft))


def test_export_refuses_a_tokenizer_the_weights_did_not_train_with(training_data, shared_data, tmp_path, capsys):
    import shutil

    from data_pipeline.tokenizer import train_tokenizer
    from launch.export_hf import main as export_hf

    data = tmp_path / "data"  # a copy, so that its tokenizer can be "re-prepared" below
    shutil.copytree(training_data["pretrain"], data)
    cfg = single_cfg(tmp_path / "run", {"pretrain": data}, max_steps=1, checkpoint_every=1)
    cfg.export_hf = False
    train(cfg)
    lines = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text().splitlines()
    other = train_tokenizer(lines[:4000], 700, tmp_path / "other")  # fewer pieces, but not the run's
    train_tokenizer(lines[:4000], 1100, tmp_path / "bigger")  # more pieces than vocab_size=1024
    out = tmp_path / "out"

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            export_hf([cfg.run_dir, "--out", str(out), *args])
        assert exit_info.value.code == 2 and not out.exists()
        return capsys.readouterr().err

    assert "is not the tokenizer" in refused("--tokenizer", str(tmp_path / "other"))
    message = refused("--tokenizer", str(tmp_path / "bigger"), "--force")  # --force does not cover this
    assert "has 1100 pieces, more than the vocab_size=1024" in message
    # the run's own tokenizer folder, re-prepared since training: the checkpoint carries its own copy
    trained = (data / "tokenizer" / "tokenizer.model").read_bytes()
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", data / "tokenizer" / "tokenizer.model")
    assert export_hf([cfg.run_dir, "--out", str(out)]) == 0
    assert (out / "tokenizer.model").read_bytes() == trained
    assert (
        export_hf([cfg.run_dir, "--out", str(out), "--overwrite", "--tokenizer", str(other.path.parent), "--force"])
        == 0
    )
    assert (out / "tokenizer.model").read_bytes() == other.path.read_bytes()


def test_a_resumed_optimizer_has_its_moments_back(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=3, checkpoint_every=3)
    train(cfg)
    folder = find_latest(cfg.run_dir)
    where = init_distributed(needs_group=False)
    fresh = TorchEngine(build_model(cfg, _tokenizer(cfg))[0], cfg, where)
    assert not fresh.optimizer.state  # no moments before loading
    fresh.load(folder / "engine")
    moments = [s["exp_avg_sq"] for s in fresh.optimizer.state.values()]
    assert len(moments) == len(list(fresh.model.parameters())) and all(m.abs().sum() > 0 for m in moments)
    assert all(int(s["step"]) == 3 for s in fresh.optimizer.state.values())
    # the weights are the checkpoint's, not the fresh init
    saved = load_model_weights(folder)
    for name, param in fresh.model.named_parameters():
        torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["meta", "rank_file", "engine_file"])
def test_a_damaged_checkpoint_is_refused_with_its_folder_named(damage, training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=1, checkpoint_every=1)
    cfg.export_hf = False
    train(cfg)
    folder = find_latest(cfg.run_dir)
    if damage == "meta":
        (folder / "meta.json").write_text('{"engine": "sin')
    else:
        path = folder / "rank_00000.pt" if damage == "rank_file" else max((folder / "engine").glob("*.distcp"))
        path.write_bytes(path.read_bytes()[:100])  # cut short
    cfg.train.max_steps = 2
    named = rf"checkpoint {re.escape(str(folder))}: .*move the folder out"
    with pytest.raises(ConfigError, match=named):
        train(cfg)
    if damage != "rank_file":  # export and chat read the weights alone: the same one line, no traceback
        done = subprocess.run(
            [sys.executable, "launch/export_hf.py", str(folder), "--out", str(tmp_path / "hf")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and re.search(named, done.stderr) and "Traceback" not in done.stderr


def test_a_resume_with_another_precision_does_not_carry_the_loss_scale(training_data, tmp_path, capsys):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=2, checkpoint_every=2)
    cfg.train.precision, cfg.export_hf = "fp16", False
    first = train(cfg)["last_record"]["grad_norm"]
    cfg.train.precision, cfg.train.max_steps = "fp32", 3  # fp16 → fp32: the scale is not applied any more
    capsys.readouterr()
    resumed = train(cfg)["last_record"]["grad_norm"]
    assert 0.1 < resumed / first < 10, "the gradients are the model's, not multiplied by an fp16 loss scale"
    notice = "resume: changed since the checkpoint, in effect from step 3: train.max_steps 2 -> 3, train.precision"
    assert f"{notice} fp16 -> fp32" in capsys.readouterr().out
    # and fp32 → fp16 starts from the initial scale rather than the disabled scaler's 1
    where = init_distributed(needs_group=False)
    cfg.train.precision = "fp16"
    engine = TorchEngine(build_model(cfg, _tokenizer(cfg))[0], cfg, where)
    load_checkpoint(engine, find_latest(cfg.run_dir), where, "single")
    assert engine.scaler.scale == 2.0**16


def _tokenizer(cfg: RunConfig):
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer.load(Path(cfg.data.train) / "tokenizer")


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=20, checkpoint_every=2, max_bad_steps=3)
    state = {"calls": 0}

    def poison_after_step_4(model):
        def hook(module, inputs, output):
            state["calls"] += torch.is_grad_enabled()
            return output * float("nan") if state["calls"] > 4 else output

        model.norm.register_forward_hook(hook)

    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row \(last at step 7\).*step_00000006"):
        train(cfg, model_hook=poison_after_step_4)
    latest = find_latest(cfg.run_dir)
    assert read_meta(latest)["state"]["step"] == 6 and read_meta(latest)["state"]["skipped_steps"] == 2
    # skipped steps leave the weights alone: step 6's checkpoint holds step 4's weights
    before, after = load_model_weights(latest.with_name("step_00000004")), load_model_weights(latest)
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False] * 4 + [True] * 3
    assert all(r["loss"] is None for r in records[4:])  # NaN is written as null


def test_the_count_of_non_finite_steps_carries_across_a_resume(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=20, checkpoint_every=100, max_bad_steps=4)

    def poison_from(first_bad_call):
        def hook_model(model):
            calls = {"n": 0}

            def hook(module, inputs, output):
                calls["n"] += torch.is_grad_enabled()
                return output * float("nan") if calls["n"] >= first_bad_call else output

            model.norm.register_forward_hook(hook)

        return hook_model

    cfg.train.exit_at_step = 4  # steps 3 and 4 are bad, then the run stops with a checkpoint
    train(cfg, model_hook=poison_from(3))
    assert read_meta(find_latest(cfg.run_dir))["state"]["bad_in_a_row"] == 2
    cfg.train.exit_at_step = 0
    with pytest.raises(TrainingError, match=r"4 non-finite steps in a row \(last at step 6\)"):
        train(cfg, model_hook=poison_from(1))  # as an uninterrupted run: the 4th bad step in a row is step 6


def test_fp16_overflows_at_the_lowest_loss_scale_count_as_bad_steps(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=40, checkpoint_every=100, max_bad_steps=3)
    cfg.train.precision, cfg.export_hf = "fp16", False

    def infinite_gradients_from_step_3(model):
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] >= 3 else grad

        model.layers[0].ffn.w2.weight.register_hook(hook)

    # The loss stays finite: the first 16 overflows halve the scale from 2**16 to 1 and are
    # expected; the next 3, at scale 1, are the gradients' own.
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row \(last at step 21\)"):
        train(cfg, model_hook=infinite_gradients_from_step_3)


def test_sft_evaluates_and_stops_early_on_patience(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, kind="sft", max_steps=50, lr=0.0, eval_every=1, patience=2)
    cfg.data.val, cfg.data.seq_len, cfg.train.eval_batches = str(training_data["sft_val"]), 256, 2
    summary = train(cfg)  # lr 0: the validation loss never improves after the first evaluation
    assert summary["step"] == 3
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9) for r in records)
    assert (Path(cfg.run_dir) / "hf" / "config.json").is_file()


def test_bf16_and_fp16_single_runs_train(training_data, tmp_path):
    for precision in ("bf16", "fp16"):
        cfg = single_cfg(tmp_path / precision, training_data, max_steps=8, checkpoint_every=8, lr=3e-3)
        cfg.train.precision, cfg.export_hf = precision, False
        losses = train(cfg)["losses"]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], precision


def test_loss_scaler_halves_on_overflow_and_grows_after_a_window():
    scaler = LossScaler(True, scale=1024.0, window=2)
    scaler.update(False)
    assert scaler.scale == 512.0 and scaler.lowered
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 1024.0 and not scaler.lowered
    scaler.scale = 1.0
    scaler.update(False)
    assert scaler.scale == 1.0 and not scaler.lowered  # an overflow at scale 1 is not the scale's
    assert LossScaler(False).scale == 1.0


def test_activation_checkpointing_gives_the_same_losses(training_data, tmp_path):
    runs = []
    for mode in ("none", "full", "selective"):
        cfg = single_cfg(tmp_path / mode, training_data, max_steps=3, checkpoint_every=3)
        cfg.train.activation_checkpointing, cfg.export_hf = mode, False
        runs.append(train(cfg)["losses"])
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)
    assert runs[0] == pytest.approx(runs[2], abs=1e-6)


def test_the_launchers_defaults_come_first_and_files_layer_on_top(training_data):
    args = ["--config", "configs/fsdp.yaml", *data_overrides(training_data, "sft"), "init_from=null"]
    cfg = parse_cli([*args, f"data.val={training_data['sft_val']}"], "doc", "sft/tiny.yaml")
    assert cfg.engine == "fsdp"  # from the fragment
    assert cfg.train.lr == 1e-3 and cfg.data.shuffle_buffer == 200  # from the default sft config


def test_a_run_dir_with_newer_checkpoints_is_not_mixed_with(training_data, tmp_path):
    cfg = single_cfg(tmp_path / "run", training_data, max_steps=4, checkpoint_every=2)
    cfg.export_hf = False
    train(cfg)
    cfg.resume = "never"
    with pytest.raises(ConfigError, match=r"already holds step_00000004, newer than the start \(step 0\)"):
        train(cfg)
    cfg.resume = str(Path(cfg.run_dir) / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match=r"newer than the start \(step 2\)"):
        train(cfg)
    other = single_cfg(tmp_path / "run", training_data, max_steps=6, checkpoint_every=2)
    other.model.overrides = {**TEST_MODEL, "n_layers": 3}
    with pytest.raises(ConfigError, match="model shape or tokenizer differs"):
        train(other)


def test_engine_single_refuses_several_processes_and_deepspeed_refuses_compile(training_data, monkeypatch):
    with pytest.raises(ConfigError, match="train.compile=true"):
        load_config(["zero3.json"], [*data_overrides(training_data), "train.compile=true"])
    with pytest.raises(ConfigError, match=r"stage=0 with train\.precision=fp16"):
        cfg = load_config(["zero2.json"], [*data_overrides(training_data), "train.precision=fp16"])
        cfg.deepspeed["zero_optimization"]["stage"] = 0
        deepspeed_config(cfg, world_size=1)
    with pytest.raises(ConfigError, match="not a valid float"):
        load_config([], [*data_overrides(training_data), "train.lr=nan"])
    from training.engine import Dist

    cfg = load_config([], data_overrides(training_data))
    model, _ = build_model(cfg, _tokenizer(cfg))
    with pytest.raises(ConfigError, match="engine=single runs one process, but 2 were started"):
        TorchEngine(model, cfg, Dist(0, 2, 0, torch.device("cpu")))


@pytest.mark.parametrize("fused", [True, False], ids=["fused, decided on the device", "unfused, on the host"])
def test_a_non_finite_step_is_skipped_whole_and_the_step_returns_device_tensors(fused, monkeypatch):
    """good, NaN, good gives what good, good gives: weights, AdamW moments and step counts."""
    from model.config import ModelConfig
    from model.decoder import Decoder
    from training.engine import Dist

    if not fused:
        monkeypatch.setattr("training.optim.FUSED_ADAMW_DEVICES", set())
    cfg = RunConfig()
    cfg.train.grad_clip = 1.0
    where = Dist(0, 1, 0, torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def engine_after(grads: list[float]) -> TorchEngine:
        torch.manual_seed(0)
        model = Decoder(ModelConfig(vocab_size=256, **TEST_MODEL))
        model.init_weights()
        engine = TorchEngine(model, cfg, where)
        assert bool(engine.optimizer.defaults["fused"]) == fused
        for factor in grads:
            loss_sum, count = engine.model(tokens, labels=tokens)
            engine.backward(loss_sum / count * factor, last=True)
            applied, norm = engine.step(1e-2)
            assert isinstance(applied, torch.Tensor) and applied.dtype == torch.bool and norm.ndim == 0
            assert bool(applied) == math.isfinite(factor) == math.isfinite(float(norm))
        return engine

    skipped, plain = engine_after([1.0, math.nan, 1.0]), engine_after([1.0, 1.0])
    for (name, p), q in zip(skipped.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in skipped.optimizer.state[p].items():
            assert torch.equal(value, plain.optimizer.state[q][key]), (name, key)


def test_find_latest_passes_over_copies_and_unfinished_folders(tmp_path, monkeypatch):
    from training import checkpoint

    root = tmp_path / "checkpoints"
    for name, meta in [("step_00000004", 1), ("step_00000006", 1), ("step_00000010.bak", 1), ("step_00000008", 0)]:
        (root / name).mkdir(parents=True)
        if meta:
            (root / name / "meta.json").write_text("{}")
    (root / "step_00000009.tmp").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert find_latest(tmp_path) == root / "step_00000006"
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught) == [
        "step_00000008",
        "step_00000009.tmp",
        "step_00000010.bak",
    ]
    (root / "step_100000000").mkdir()  # nine digits: step 10^8 sorts after step 6
    (root / "step_100000000" / "meta.json").write_text("{}")
    with pytest.warns(UserWarning):
        assert find_latest(tmp_path) == root / "step_100000000"

    def crash(path, *args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash)
    with pytest.raises(OSError):
        checkpoint._prune(root, keep=2)  # dies deleting step 4
    assert not (root / "step_00000004" / "meta.json").exists()  # so it can never be taken for complete
    monkeypatch.undo()
    checkpoint._prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000004",  # no meta.json (left by the crash above): not pruned, passed over
        "step_00000006",
        "step_00000008",
        "step_00000010.bak",
        "step_100000000",
    ]
