"""The run configuration: typed sections with defaults, config files, dotted overrides.

    defaults ─► each --config FILE in order (.yaml: run config; .json: DeepSpeed config, which
    selects the deepspeed engine) ─► key=value overrides ─► value checks ─► run_dir/config.yaml

A bare file name (`zero3.json`) that does not exist as given is looked up in `configs/`. Every
key is checked against the dataclasses below: an unknown key, or a value of the wrong type, is a
ConfigError naming the key and where it came from. Two fields take mappings: `model.overrides`
(each key a ModelConfig field, each value checked against that field's type like any other key)
and the DeepSpeed JSON (`deepspeed`, kept as read; training/deepspeed_config.py checks it against
the run config).

This module is the schema and reads no file but the config files themselves, so a config loads
and checks anywhere. What the run will read (shards, tokenizer, init_from, a resume folder) is
checked by training/preflight.py, which the launchers call before any worker starts.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from model.config import ModelConfig, preset, preset_names
from model.decoder import RECOMPUTE_MODES
from model.lora import TARGETS, LoRAConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ENGINES = ("single", "fsdp", "deepspeed")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A configuration problem, named by its dotted key."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Named model size from model/config.py (tiny, 125m, 350m, 1b, 3b, 8b)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change, e.g. model.overrides.n_layers=2. vocab_size defaults to the
    data's tokenizer. Ignored with init_from, which brings its own shape."""


@dataclass
class DataSection:
    train: str = "runs/data/pretrain"
    """Training shard folder written by launch/prepare_data.py (shards + manifest.json)."""
    val: str | None = None
    """Validation shard folder, evaluated every train.eval_every steps."""
    seq_len: int = 512
    """Tokens per packed row."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling within a rank's stream."""
    on_error: str = "skip"
    """A corrupt shard: "skip" it (counted and reported) or "raise"."""


@dataclass
class LoRASection:
    rank: int = 0
    """Inner width r of each adapter (0: no LoRA, every weight trains). LoRA needs init_from:
    the base it adapts is frozen."""
    alpha: float = 16.0
    """Each adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] = TARGETS
    """The projections that get adapters, by Hugging Face name: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj (default: all)."""

    def lora_config(self) -> LoRAConfig | None:
        """model/lora.py's config, or None when LoRA is off (rank 0)."""
        if not self.rank:
            return None
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


@dataclass
class TrainSection:
    max_steps: int = 200
    """Optimizer steps of the run."""
    exit_at_step: int = 0
    """Stop this invocation after this step, with a checkpoint (0: run to max_steps); a resume
    continues to max_steps on the same schedule (e.g. to fit a cluster job's time limit)."""
    micro_batch: int = 8
    """Rows per forward/backward on one rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: str = "cosine"
    """After warmup: "cosine", "wsd" (warmup-stable-decay) or "constant"."""
    decay_frac: float = 0.2
    """wsd only: the fraction of max_steps spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay (never on norms, biases or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32: bf16 on a CPU runs through slow autocast
    kernels), bf16, fp16 (dynamic loss scaling) or fp32. The run prints and records the choice."""
    z_loss: float = 0.0
    """Weight of the z-loss (PaLM) on log Z of the output logits."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them: "none"; "full" (each block
    keeps only its input); "selective" (each block also keeps its attention output, so attention
    is not run again)."""
    compile: bool = False
    """torch.compile each block."""
    seed: int = 0
    """Seed of the weight init and the data order."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    max_bad_steps: int = 5
    """Stop after this many non-finite steps in a row (each one is skipped on every rank)."""
    eval_every: int = 0
    """Evaluate data.val every this many steps (0: never)."""
    eval_batches: int = 0
    """Micro-batches per rank in an evaluation (0: the whole split)."""
    patience: int = 0
    """Stop early after this many evaluations without a better validation loss (0: never)."""
    lora: LoRASection = field(default_factory=LoRASection)
    """LoRA (Hu et al. 2021): train low-rank adapters on a frozen init_from base."""


@dataclass
class DPOSection:
    loss: str = "sigmoid"
    """sigmoid (DPO, Rafailov et al. 2023), ipo (Azar et al. 2023, per-token log-probs),
    sigmoid_norm (DPO on per-token log-probs, as Tülu 3), simpo (Meng et al. 2024: no
    reference, margin simpo_gamma)."""
    beta: float = 0.1
    """How far the policy may move from the reference (SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """The assumed share of pairs whose labels are flipped (conservative DPO); in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO's target margin between the chosen and rejected rewards."""


GRPO_REWARDS = {"fact_stated": 1.0, "no_other_fact": 0.5, "closes_turn": 0.25, "in_voice": 1.0}
"""The synthetic world's: its facts, and its voice (without in_voice, fact rewards alone wore the
demo's voice consistency down from 0.34 to 0.16-0.23; see benchmarks/RESULTS.md)."""


@dataclass
class GRPOSection:
    group_size: int = 4
    """G: completions sampled per prompt; advantages are normalised within each group."""
    prompts_per_batch: int = 2
    """Prompts per micro-batch of each rank (a micro-batch trains on prompts × G completions)."""
    max_new_tokens: int = 64
    """Tokens a completion may have (the end-of-turn token included)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (above 0)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1: the whole vocabulary)."""
    eps_low: float = 0.2
    """Lower clip of the probability ratio: 1 − eps_low."""
    eps_high: float = 0.28
    """Upper clip of the probability ratio: 1 + eps_high (DAPO's asymmetric clip)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference; above 0 it needs train.lora.rank > 0 (the frozen
    base, adapters off, is the reference: no second model in memory)."""
    adv_eps: float = 1e-4
    """ε in A = (r − mean) / (std + ε) of a group."""
    rewards: dict = field(default_factory=lambda: dict(GRPO_REWARDS))
    """Reward functions and their weights: built-in names (training/rewards.py), `judge:HF_DIR`,
    or `package.module:function` taking (prompt messages, completion text, info) -> float."""


@dataclass
class FsdpSection:
    reshard_after_forward: bool = True
    """Free gathered parameters after forward (ZeRO-3 like) rather than keep them for backward."""


@dataclass
class RaySection:
    num_workers: int = 2
    """Training workers (one per GPU where there are GPUs)."""
    use_gpu: bool | None = None
    """Give each worker a GPU; default: when the cluster has GPUs."""
    address: str | None = None
    """Ray cluster to join; default: the job's cluster under `ray job submit`, else a local Ray."""
    max_failures: int = 3
    """Worker-group restarts (from the latest checkpoint) before the job fails."""


@dataclass
class RunConfig:
    run_dir: str = "runs/pretrain"
    """Folder of this run: config.yaml, metrics.jsonl, checkpoints/, hf/."""
    resume: str = "auto"
    """"auto": the newest complete checkpoint in run_dir, if any; "never"; or a checkpoint folder."""
    init_from: str | None = None
    """A Hugging Face export (e.g. a pretraining run's hf/) to start from."""
    engine: str = "single"
    """single (one process), fsdp (FSDP2) or deepspeed (chosen by a --config *.json)."""
    export_hf: bool = True
    """Write a Hugging Face export to run_dir/hf at the end."""
    deepspeed: dict | None = None
    """The DeepSpeed JSON; its batch, precision and clipping fields come from this config."""
    collective_timeout_s: int = 1800
    """Seconds a rank waits in a collective (all-reduce, barrier) for the others before the run
    fails; ranks that meet an error agree on it at once, so this bounds only a rank that hangs."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    ray: RaySection = field(default_factory=RaySection)

    def batch_arithmetic(self, world_size: int) -> dict:
        """global batch = micro batch × accumulation × data-parallel size (rows and tokens)."""
        rows = self.train.micro_batch * self.train.grad_accum * world_size
        return {"global_batch": rows, "tokens_per_step": rows * self.data.seq_len}


# --- reading ----------------------------------------------------------------------------------


def load_config(config_files: list[str], overrides: list[str]) -> RunConfig:
    """Build a RunConfig from files and `key=value` overrides, then check it.

    Args:
        config_files: .yaml run configs and .json DeepSpeed configs, applied in order.
        overrides: dotted `key=value` strings, applied last.
    Returns:
        the checked RunConfig.
    Raises:
        ConfigError: naming the file, key or value at fault.
    """
    cfg = RunConfig()
    for name in config_files:
        path = find_config_file(name)
        if path.suffix == ".json":
            from training.deepspeed_config import check_deepspeed_keys  # it imports this module

            cfg.deepspeed = check_deepspeed_keys(_read_json(path), source=str(path))
            cfg.engine = "deepspeed"
        elif path.suffix in (".yaml", ".yml"):
            merge(cfg, _read_yaml(path), source=str(path))
        else:
            raise ConfigError(f"--config {name}: expected a .yaml run config or a .json DeepSpeed config")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
        merge(cfg, _nest(key.strip(), yaml.safe_load(value) if value.strip() else None), source="command line")
    check(cfg)
    return cfg


def find_config_file(name: str) -> Path:
    """A config file as given, or by bare name in configs/ (and its subfolders)."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_absolute():
        if (CONFIG_DIR / name).is_file():
            return CONFIG_DIR / name
        matches = sorted(p for p in CONFIG_DIR.glob(f"*/{name}") if p.is_file())
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(str(m.relative_to(CONFIG_DIR.parent)) for m in matches)
            raise ConfigError(f"--config {name}: ambiguous, it could be {names}; give the path")
    raise ConfigError(f"--config {name}: no such file (also looked in {CONFIG_DIR})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of keys to values")
    return data


def _nest(dotted: str, value) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def merge(target, values: dict, source: str, prefix: str = "") -> None:
    """Set dataclass fields from a nested mapping, checking names and types."""
    known = {f.name: f for f in fields(target)}
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key {dotted!r}; known keys here: {', '.join(known)}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} is a section; give its keys ({dotted}.<key>=...)")
            merge(current, value, source, prefix=f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(target, key, _deep_merge(current, value))
        else:
            setattr(target, key, _coerce(value, hints[key], dotted, source))
        if dotted == "model.overrides":  # a mapping, which _coerce cannot check by its type
            setattr(target, key, check_model_overrides(getattr(target, key), source))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _coerce(value, hint, key: str, source: str):
    """Check a value against a field's annotation; numbers written as strings (YAML reads `3e-4`
    as a string) are converted."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if kind is dict and isinstance(value, dict):
            return value
        if typing.get_args(kind)[1:] == (Ellipsis,) and isinstance(value, (str, list, tuple)):
            items = value.split(",") if isinstance(value, str) else value  # `a,b` on a command line
            return tuple(
                _coerce(v.strip() if isinstance(v, str) else v, typing.get_args(kind)[0], key, source) for v in items
            )
        if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            items = typing.get_args(kind)
            if len(value) == len(items):
                return tuple(_coerce(v, t, key, source) for v, t in zip(value, items, strict=True))
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: {key}={value!r} is not a valid {expected}")


def check_model_overrides(overrides: dict, source: str) -> dict:
    """model.overrides with each key a ModelConfig field and each value of that field's type
    (`norm_eps: 1e-6`, which YAML reads as a string, becomes a float; `tie_embeddings: maybe` is
    an error)."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for key, value in overrides.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key 'model.overrides.{key}'; ModelConfig fields: {', '.join(hints)}")
        out[key] = _coerce(value, hints[key], f"model.overrides.{key}", source)
    return out


# --- checks -----------------------------------------------------------------------------------


def check(cfg: RunConfig) -> None:
    """Check the values and how they go together, naming the key at fault; no file is read
    (training/preflight.py checks what the run will read)."""
    _choice("engine", cfg.engine, ENGINES)
    _choice("data.on_error", cfg.data.on_error, ("skip", "raise"))
    _check_train(cfg.train)
    _check_dpo(cfg.dpo)
    _check_grpo(cfg.grpo, cfg.train.lora.rank)
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be at least 2")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={cfg.data.shuffle_buffer} must not be negative (0: no shuffling)")
    if cfg.ray.num_workers < 1:
        raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} must be at least 1")
    if cfg.collective_timeout_s < 1:
        raise ConfigError(f"collective_timeout_s={cfg.collective_timeout_s} must be at least 1")
    if cfg.engine == "deepspeed" and cfg.deepspeed is None:
        raise ConfigError("engine=deepspeed needs a DeepSpeed JSON: --config zero3.json (or zero2.json, ...)")
    if cfg.engine != "deepspeed" and cfg.deepspeed is not None:
        raise ConfigError(f"engine={cfg.engine} was given together with a DeepSpeed JSON; drop one of them")
    if (cfg.train.eval_every or cfg.train.patience) and cfg.data.val is None:
        raise ConfigError("train.eval_every / train.patience need data.val (a validation shard folder)")
    if cfg.train.patience and not cfg.train.eval_every:
        raise ConfigError(
            f"train.patience={cfg.train.patience} counts evaluations, but train.eval_every=0 never evaluates; "
            "set train.eval_every"
        )
    if cfg.engine == "deepspeed" and cfg.train.compile:
        raise ConfigError("train.compile=true is supported with the single and fsdp engines, not deepspeed")
    if cfg.model.preset not in preset_names():
        raise ConfigError(f"model.preset={cfg.model.preset!r}; choose one of {', '.join(preset_names())}")
    if cfg.init_from is None:  # init_from brings its own shape, which the preflight reads
        model_config(cfg, vocab_size=None)
    if cfg.train.lora.rank and cfg.init_from is not None and cfg.export_hf:
        if Path(cfg.init_from).resolve() == (Path(cfg.run_dir) / "hf").resolve():
            raise ConfigError(
                f"init_from={cfg.init_from} is this run's own hf/, which its merged export replaces at the end: the "
                "adapters' base would be lost. Copy the base elsewhere, or set export_hf=false"
            )
    if cfg.train.lora.rank and cfg.init_from is None:
        raise ConfigError(
            f"train.lora.rank={cfg.train.lora.rank} trains adapters on a frozen pretrained base: set "
            "init_from=MODEL_DIR (a Hugging Face folder), or train.lora.rank=0 to train every weight"
        )


def _check_dpo(d: DPOSection) -> None:
    from training.objectives import PREFERENCE_LOSSES

    _choice("dpo.loss", d.loss, PREFERENCE_LOSSES)
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta={d.beta} must be positive")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    if d.label_smoothing and d.loss == "ipo":
        raise ConfigError("dpo.label_smoothing applies to the sigmoid losses, not dpo.loss=ipo")


def _check_grpo(g: GRPOSection, lora_rank: int) -> None:
    for key in ("group_size", "prompts_per_batch", "max_new_tokens"):
        if getattr(g, key) < (2 if key == "group_size" else 1):
            raise ConfigError(f"grpo.{key}={getattr(g, key)} must be at least {2 if key == 'group_size' else 1}")
    if g.temperature <= 0 or not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.temperature={g.temperature} must be positive and grpo.top_p={g.top_p} in (0, 1]")
    if min(g.eps_low, g.eps_high, g.beta, g.adv_eps) < 0 or g.eps_low >= 1:
        raise ConfigError("grpo.eps_low (below 1), grpo.eps_high, grpo.beta and grpo.adv_eps must not be negative")
    if g.beta and not lora_rank:
        raise ConfigError(
            f"grpo.beta={g.beta} needs a reference model: with train.lora.rank > 0 the frozen base is it (a full "
            "fine-tune would need a second copy of the model); set train.lora.rank or grpo.beta=0"
        )
    if not g.rewards:
        raise ConfigError("grpo.rewards is empty: name at least one reward function")


def _check_train(t: TrainSection) -> None:
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.activation_checkpointing", t.activation_checkpointing, RECOMPUTE_MODES)
    from training.optim import SCHEDULES

    _choice("train.schedule", t.schedule, SCHEDULES)
    for key in ("max_steps", "micro_batch", "grad_accum", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be at least 1")
    for key in (
        "lr",
        "grad_clip",
        "weight_decay",
        "warmup_steps",
        "eval_every",
        "eval_batches",
        "patience",
        "exit_at_step",
        "z_loss",
    ):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must not be negative")
    for key in ("min_lr_ratio", "decay_frac"):
        if not 0 <= getattr(t, key) <= 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be between 0 and 1")
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas={list(t.betas)}: each must be in [0, 1)")
    if t.eps <= 0:
        raise ConfigError(f"train.eps={t.eps} must be positive")
    if t.lora.rank < 0:
        raise ConfigError(f"train.lora.rank={t.lora.rank} must not be negative (0: no LoRA)")
    try:
        t.lora.lora_config()
    except ValueError as e:  # the message names the train.lora key
        raise ConfigError(str(e)) from None


def _choice(key: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(options)}")


def model_config(cfg: RunConfig, vocab_size: int | None) -> ModelConfig:
    """The model shape: the preset with model.overrides, vocab_size from the tokenizer unless given.

    Args:
        cfg: the run config.
        vocab_size: the tokenizer's size (None: keep the preset's, for checking only).
    """
    overrides = check_model_overrides(cfg.model.overrides, source="run config")
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    try:
        return preset(cfg.model.preset, **overrides)
    except KeyError as e:
        raise ConfigError(f"model.overrides: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from None


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (what the run actually used) as YAML."""
    data = asdict(cfg)
    data["train"]["betas"] = list(cfg.train.betas)
    data["train"]["lora"]["targets"] = list(cfg.train.lora.targets)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def parse_cli(argv: list[str] | None, doc: str, default_config: str | None = None) -> RunConfig:
    """The launchers' command line: `--config FILE` (repeatable) then `key=value` overrides.

    Args:
        argv: arguments (default sys.argv[1:]).
        doc: the launcher's module docstring (its first paragraph is the usage line).
        default_config: the launcher's run config, read before every --config (e.g. pretrain/tiny.yaml).
    Returns:
        the checked RunConfig; a bad config exits with status 2 and one message naming the key.
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a .yaml run config or a .json DeepSpeed config (repeatable; bare names are looked up in configs/)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The launcher's defaults come first and every file is layered on top, so that a fragment
    # such as configs/fsdp.yaml changes the engine and nothing else.
    files = ([default_config] if default_config else []) + list(args.config)
    try:
        return load_config(files, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
