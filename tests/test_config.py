"""training/config.py (the schema: files, overrides, types, value checks) and
training/deepspeed_config.py (the DeepSpeed JSON against the run config).

No test here has data on disk: data.train names a folder that does not exist, which the schema
never reads (training/preflight.py does; see test_preflight.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.config import ConfigError, RunConfig, check, find_config_file, load_config, parse_cli
from training.deepspeed_config import _DEEPSPEED_RENAMED, DEEPSPEED_KEYS, deepspeed_config


@pytest.fixture
def no_data(tmp_path) -> list[str]:
    """Overrides naming a data folder that was never prepared."""
    return [f"data.train={tmp_path / 'not-prepared'}", "data.seq_len=128"]


def test_a_config_loads_and_checks_with_no_data_on_disk(no_data, tmp_path):
    cfg = load_config([], [*no_data, f"data.val={tmp_path / 'no-val'}", f"init_from={tmp_path / 'no-model'}"])
    assert not Path(cfg.data.train).exists() and cfg.data.val.endswith("no-val")
    check(RunConfig(resume=str(tmp_path / "no-checkpoint")))  # the defaults, plus a folder nobody made


def test_overrides_yaml_and_types(no_data, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  lr: 3e-4\n  max_steps: 7\nmodel:\n  preset: tiny\n  overrides:\n    rope_theta: 5e5\n")
    overrides = ["train.micro_batch=3", "train.betas=[0.9, 0.99]", "model.overrides.norm_eps=1e-6"]
    cfg = load_config([str(run)], [*no_data, "model.overrides.dim=64", *overrides])
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
        ("train.activation_checkpointing=true", "train.activation_checkpointing=True is not a valid str"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing='some'; choose one of none, full"),
        ("model.overrides.n_layers=two", "command line: model.overrides.n_layers='two' is not a valid int"),
        ("model.overrides.dim=64.5", "model.overrides.dim=64.5 is not a valid int"),
        ("model.overrides.tie_embeddings=maybe", "model.overrides.tie_embeddings='maybe' is not a valid bool"),
        ("model.overrides.norm_eps=small", "model.overrides.norm_eps='small' is not a valid float"),
        ("model.overrides={n_layers: 2, dimm: 3}", "unknown key 'model.overrides.dimm'"),
        ("model.overrides.n_layers=0", "model.n_layers=0 must be at least 1"),
        ("model.overrides.norm_eps=-1e-6", "model.norm_eps=-1e-06 must be positive"),
        ("train.min_lr_ratio=-1", "train.min_lr_ratio=-1.0 must be between 0 and 1"),
        ("train.decay_frac=7", "train.decay_frac=7.0 must be between 0 and 1"),
        ("train.eps=-1", "train.eps=-1.0 must be positive"),
        ("train.eps=0", "train.eps=0.0 must be positive"),
        ("train.betas=[0.9, 1.5]", "train.betas=[0.9, 1.5]: each must be in"),
        ("train.z_loss=-1", "train.z_loss=-1.0 must not be negative"),
        ("train.lr=nan", "not a valid float"),
        ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5 must not be negative"),
        ("ray.num_workers=0", "ray.num_workers=0 must be at least 1"),
        ("deepspeed.zero_optimization.stage=3", "engine=single was given together with a DeepSpeed JSON"),
    ],
)
def test_bad_keys_and_values_are_named(override, named, no_data):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace(".", r"\.")):
        load_config([], [*no_data, override])


def test_patience_needs_evaluations(no_data, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.patience=3 counts evaluations, but train\.eval_every=0"):
        load_config([], [*no_data, f"data.val={tmp_path / 'val'}", "train.patience=3"])


def test_config_files_are_found_and_their_faults_named(tmp_path):
    assert find_config_file("zero3.json") == ROOT / "configs" / "zero3.json"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["nope.yaml"], [])
    ambiguous = "ambiguous, it could be configs/dpo/tiny.yaml, configs/grpo/tiny.yaml, configs/models/tiny.yaml, "
    with pytest.raises(ConfigError, match=ambiguous):
        load_config(["tiny.yaml"], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config([str(bad)], [])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=rf"{unknown}: unknown key 'train\.warmup'"):
        load_config([str(unknown)], [])
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{listed}: a DeepSpeed config must be a JSON object"):
        load_config([str(listed)], [])


def test_the_launchers_defaults_come_first_and_files_layer_on_top(no_data, tmp_path):
    args = ["--config", "configs/fsdp.yaml", *no_data, "init_from=null", f"data.val={tmp_path / 'val'}"]
    cfg = parse_cli(args, "doc", "sft/tiny.yaml")
    assert cfg.engine == "fsdp"  # from the fragment
    assert cfg.train.lr == 1e-3 and cfg.data.shuffle_buffer == 200  # from the default sft config


def test_parse_cli_accepts_the_deepspeed_launchers_local_rank(no_data):
    cfg = parse_cli(["--local_rank=1", "--config", "zero2.json", *no_data], "doc")
    assert cfg.engine == "deepspeed" and cfg.deepspeed["zero_optimization"]["stage"] == 2


def test_a_bad_value_fails_in_the_launcher_before_ray_starts(no_data):
    cmd = [sys.executable, "launch/pretrain.py", *no_data, "train.nope=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown key 'train.nope'" in done.stderr
    assert "ray" not in done.stderr.lower().replace("array", "")  # Ray never started


# --- the DeepSpeed JSON ----------------------------------------------------------------------------


def test_deepspeed_json_is_filled_from_the_run_config_or_must_agree(no_data, tmp_path):
    cfg = load_config(["zero3.json"], [*no_data, "train.micro_batch=2", "train.grad_accum=4"])
    assert cfg.engine == "deepspeed"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] == "auto"  # precision auto: decided on the worker's device (engine.py)
    cfg.train.precision = "bf16"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False

    def checked(ds: dict, *overrides: str) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        return deepspeed_config(load_config([str(path)], [*no_data, *overrides]), world_size=2)

    batch = ["train.micro_batch=2", "train.grad_accum=4"]
    with pytest.raises(ConfigError, match=r"train_batch_size=32 disagrees with .*world size 2=16"):
        checked({"train_batch_size": 32, "zero_optimization": {"stage": 2}}, *batch)
    with pytest.raises(ConfigError, match=r"deepspeed\.optimizer"):
        checked({"optimizer": {"type": "Adam"}})
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True disagrees with train\.precision=fp16"):
        checked(bf16, "train.precision=fp16")
    # precision auto is decided on the worker: a JSON that decides it instead is refused up front
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True with train\.precision=auto: .*train\.precision=bf16"):
        checked(bf16)
    with pytest.raises(ConfigError, match=r"stage=0 with train\.precision=fp16"):
        checked({"zero_optimization": {"stage": 0}}, "train.precision=fp16")


def test_deepspeed_refuses_compile(no_data):
    with pytest.raises(ConfigError, match="train.compile=true"):
        load_config(["zero3.json"], [*no_data, "train.compile=true"])


def test_misspelled_deepspeed_keys_are_refused(no_data, tmp_path):
    def checked(ds: dict) -> dict:
        path = tmp_path / "typo.json"
        path.write_text(json.dumps({**ds, "zero_optimization": {"stage": 2}}))
        return deepspeed_config(load_config([str(path)], no_data), world_size=None)

    with pytest.raises(ConfigError, match=r"typo\.json: unknown DeepSpeed key 'deepspeed\.zero_optimisation'; did you"):
        checked({"zero_optimisation": {"stage": 3}})
    with pytest.raises(ConfigError, match=r"'deepspeed\.gradient_clippping'; did you mean 'gradient_clipping'"):
        checked({"gradient_clippping": 0.5})
    with pytest.raises(ConfigError, match=r"deepspeed\.bfloat16 is DeepSpeed's old spelling.*write it as 'bf16'"):
        checked({"bfloat16": {"enabled": True}})
    run = tmp_path / "run.yaml"  # the same check for a DeepSpeed section inside a run config
    run.write_text("engine: deepspeed\ndeepspeed:\n  zero_optimization: {stage: 2}\n  wall_clock_breakdwn: true\n")
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed key 'deepspeed\.wall_clock_breakdwn'"):
        deepspeed_config(load_config([str(run)], no_data), world_size=None)


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


def test_the_deepspeed_key_list_is_deepspeeds(no_data):
    """DEEPSPEED_KEYS is a list (importing deepspeed in every preflight would fix its
    accelerator); it must hold every top-level key the installed DeepSpeed reads, and no other."""
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
        cfg = load_config([str(path)], no_data)
        assert set(deepspeed_config(cfg, world_size=2)) <= DEEPSPEED_KEYS


def test_lora_keys_are_read_and_checked(no_data, tmp_path):
    base = f"init_from={tmp_path / 'base'}"
    cfg = load_config([], [*no_data, base, "train.lora.rank=8", "train.lora.targets=q_proj,v_proj"])
    assert cfg.train.lora.lora_config().targets == ("q_proj", "v_proj") and cfg.train.lora.alpha == 16.0
    yaml_list = load_config([], [*no_data, base, "train.lora.rank=8", "train.lora.targets=[q_proj, v_proj]"])
    assert yaml_list.train.lora == cfg.train.lora
    assert load_config([], no_data).train.lora.lora_config() is None  # rank 0: every weight trains
    bad = {
        "train.lora.rank=-1": "train.lora.rank=-1 must not be negative",
        "train.lora.alpha=0": r"train.lora.alpha=0.0: must be > 0",
        "train.lora.dropout=1": r"train.lora.dropout=1.0: must be in \[0, 1\)",
        "train.lora.targets=[q_proj,wq]": r"train.lora.targets=\['q_proj', 'wq'\].*unknown: wq",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config([], [*no_data, base, "train.lora.rank=4", override])
    with pytest.raises(ConfigError, match=r"train.lora.rank=4 trains adapters on a frozen pretrained base"):
        load_config([], [*no_data, "train.lora.rank=4"])
    own = [f"run_dir={tmp_path / 'run'}", f"init_from={tmp_path / 'run' / 'hf'}", "train.lora.rank=4"]
    with pytest.raises(ConfigError, match="which its merged export replaces"):
        load_config([], [*no_data, *own])
    load_config([], [*no_data, *own, "export_hf=false"])
