"""Import from and export to the Hugging Face Llama (and Qwen2) checkpoint format.

Weights travel through safetensors only: nothing here unpickles a file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.decoder import Decoder

_SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""config.json fields without a default: a checkpoint lacking one is refused, naming it."""


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of an HF checkpoint with these shapes.

    Llama's `attention_bias` also puts a bias on o_proj, so a model with q/k/v bias only is
    written as Qwen2, whose attention has exactly that.
    """
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {
        "architectures": [_SUPPORTED[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from an HF config dict; unsupported features are an error, not ignored."""
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (only {sorted(_SUPPORTED)})")
    _refuse_unsupported(hf, model_type, source)
    missing = [key for key in _REQUIRED if hf.get(key) is None]
    if missing:
        raise ValueError(f"{source}: required field(s) {', '.join(missing)} missing")

    def get(key, default):  # a field written as null means the HF default, as in transformers
        return default if hf.get(key) is None else hf[key]

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=get("num_key_value_heads", hf["num_attention_heads"]),
            ffn_dim=hf["intermediate_size"],
            norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=get("rope_theta", 10000.0) if rope.get("rope_theta") is None else rope["rope_theta"],
            max_seq_len=get("max_position_embeddings", 32768 if model_type == "qwen2" else 2048),  # their defaults
            tie_embeddings=get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",
            init_std=get("initializer_range", 0.02),
        )
    except (TypeError, ValueError) as e:  # name the file: the message names our field
        raise ValueError(f"{source}: {e}") from None
    if hf.get("head_dim") is not None and hf["head_dim"] != cfg.head_dim:
        raise ValueError(
            f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {cfg.head_dim} "
            "(a decoupled head_dim is not supported)"
        )
    return cfg


def _refuse_unsupported(hf: dict, model_type: str, source: str) -> None:
    """Raise on a config field that would change the math of the Decoder if it were ignored."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only silu, as in SwiGLU)")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{source}: Llama attention_bias/mlp_bias (bias on o_proj or the MLP) is not supported")
    # transformers 5 writes rope_parameters, 4.x rope_scaling: neither may ask for scaled RoPE
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: {key} rope_type {rope_type!r} is not supported (only plain RoPE)")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if hf.get("use_sliding_window") or sliding:
        raise ValueError(
            f"{source}: sliding-window attention (use_sliding_window, or layer_types {sorted(set(sliding))}) "
            "is not supported"
        )


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Crucible parameter names → HF names, splitting the fused qkv and gate/up projections."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
        q, k, v = sd[ours + "attn.wqkv.weight"].split((q_out, kv_out, kv_out))
        out.update({theirs + f"self_attn.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v), strict=True)})
        if cfg.qkv_bias:
            qb, kb, vb = sd[ours + "attn.wqkv.bias"].split((q_out, kv_out, kv_out))
            out.update({theirs + f"self_attn.{n}_proj.bias": b for n, b in zip("qkv", (qb, kb, vb), strict=True)})
        out[theirs + "self_attn.o_proj.weight"] = sd[ours + "attn.wo.weight"]
        gate, up = sd[ours + "ffn.w13.weight"].chunk(2)
        out[theirs + "mlp.gate_proj.weight"] = gate
        out[theirs + "mlp.up_proj.weight"] = up
        out[theirs + "mlp.down_proj.weight"] = sd[ours + "ffn.w2.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "") -> dict[str, torch.Tensor]:
    """HF names → Crucible names, fusing q/k/v and gate/up. Missing tensors name the key."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"{source}: tensor {name!r} is missing from the checkpoint")
        return hf.pop(name)

    sd = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
    else:
        sd["output.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        sd[ours + "attn_norm.weight"] = take(theirs + "input_layernorm.weight")
        sd[ours + "ffn_norm.weight"] = take(theirs + "post_attention_layernorm.weight")
        sd[ours + "attn.wqkv.weight"] = torch.cat([take(theirs + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            sd[ours + "attn.wqkv.bias"] = torch.cat([take(theirs + f"self_attn.{n}_proj.bias") for n in "qkv"])
        sd[ours + "attn.wo.weight"] = take(theirs + "self_attn.o_proj.weight")
        sd[ours + "ffn.w13.weight"] = torch.cat(
            [take(theirs + "mlp.gate_proj.weight"), take(theirs + "mlp.up_proj.weight")]
        )
        sd[ours + "ffn.w2.weight"] = take(theirs + "mlp.down_proj.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise KeyError(f"{source}: unexpected tensors {leftover[:5]} ({len(leftover)} in all)")
    return sd


def save_hf(model: Decoder, cfg: ModelConfig, path: str | Path, state_dict: dict | None = None) -> Path:
    """Write `config.json` and `model.safetensors` that `AutoModelForCausalLM` loads.

    Args:
        model: the decoder to export (unsharded).
        cfg: its config.
        path: output folder (created).
        state_dict: a full state dict to write instead of `model.state_dict()` (e.g. one
            gathered from a sharded model on rank 0).
    Returns:
        the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    dtype = sd["tok_embeddings.weight"].dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    save_file(state_dict_to_hf(sd, cfg), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Read an HF Llama/Qwen2 checkpoint folder (single or sharded safetensors).

    Args:
        path: folder with config.json and model.safetensors (or model.safetensors.index.json).
        device: where the weights go.
        dtype: cast the weights to this dtype (default: keep the stored dtype).
    Returns:
        (Decoder, ModelConfig).
    Raises:
        FileNotFoundError: no config.json or weights there.
        ValueError: config.json or a weight file does not read, or the weights do not fit the
            config (a missing or unexpected tensor, a wrong shape); the message names the file.
    """
    path = Path(path)
    cfg = read_hf_config(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with _named(file):
            tensors.update(load_file(str(file), device=str(device)))
    sd = _fitted(tensors, cfg, path)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model, cfg


def check_hf(path: str | Path) -> ModelConfig:
    """What `load_hf` checks, from config.json and the safetensors headers alone (no weights read).

    For a preflight: a folder that passes loads, one that does not fails before any worker starts.

    Returns:
        the folder's ModelConfig.
    Raises:
        FileNotFoundError, ValueError: as `load_hf`.
    """
    path = Path(path)
    cfg = read_hf_config(path)
    tensors = {}
    for file in _weight_files(path):
        with _named(file), safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = torch.empty(f.get_slice(name).get_shape(), device="meta")
    _fitted(tensors, cfg, path)
    return cfg


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF folder's config.json. Raises FileNotFoundError, or ValueError
    naming the file (not JSON, not a JSON object, an unsupported or missing field)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; is {path} a Hugging Face model folder?")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{config_file}: not readable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: must be a JSON object of config fields, not {type(hf).__name__}")
    return config_from_hf(hf, source=str(config_file))


def _fitted(tensors: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF tensors → the Decoder's state dict, checked name by name and shape by shape."""
    try:
        sd = state_dict_from_hf(tensors, cfg, source=str(path))
    except KeyError as e:  # a missing or unexpected tensor (the message names it)
        raise ValueError(e.args[0]) from None
    except RuntimeError as e:  # q/k/v or gate/up of shapes that do not concatenate
        raise ValueError(f"{path}: the weights do not fit config.json ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        expected = Decoder(cfg).state_dict()
    wrong = [
        f"{k} {tuple(v.shape)}, not {tuple(expected[k].shape)}" for k, v in sd.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"{path}: the weights do not fit config.json: {'; '.join(wrong[:3])}")
    return sd


@contextlib.contextmanager
def _named(file: Path):
    """A weight file that does not read (cut short, not safetensors) is a ValueError naming it."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not an index of safetensors files ({type(e).__name__}: {e})") from None
        if not all(isinstance(s, str) and Path(s).name == s for s in shards):
            raise ValueError(f"{index}: weight_map names files outside {path}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise FileNotFoundError(f"{path}: only pickled weights (.bin/.pt) found; convert them to safetensors first")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
