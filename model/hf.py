"""Import from and export to the Hugging Face checkpoint format of Llama (3.x included), Mistral,
Qwen2 and Qwen3 (transformers' model_type llama, mistral, qwen2, qwen3).

Weights travel through safetensors only: nothing here unpickles a file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import ARCHES, ROPE_TYPES, ModelConfig
from model.decoder import Decoder

_CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}  # fmt: skip
"""The transformers class of each arch (model_type): the `architectures` entries accepted."""
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""config.json fields without a default: a checkpoint lacking one is refused, naming it."""
_ABSENT = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, head_dim=None),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, head_dim=None, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128),
}
"""What transformers' config class of each arch gives a field the file leaves out (a field
written as null means something else: see `config_from_hf`)."""


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of an HF checkpoint with these shapes, read alike by transformers 4.x and 5.

    Args:
        cfg: the model; its arch is the model_type written, except that a llama with qkv_bias is
            written as qwen2 (Llama's attention_bias would also put a bias on o_proj).
        dtype: the stored weights' dtype (torch_dtype / dtype).
    Returns:
        the config dict.
    """
    arch = "qwen2" if cfg.arch == "llama" and cfg.qkv_bias else cfg.arch
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    hf = {
        "architectures": [_CAUSAL_LM[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if cfg.rope_type != "default":
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        hf.update(sliding_window=cfg.sliding_window or None)
    else:  # Qwen: a full-attention model says so; qwen3's attention_bias would bias all four projections
        hf.update(use_sliding_window=False, sliding_window=None)
        if arch == "qwen3":
            hf.update(attention_bias=False)
    return hf


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from an HF config dict; unsupported features are an error, not ignored.

    A field left out takes the default of the arch's transformers config class (Qwen3's head_dim
    is 128, Mistral's sliding_window 4096); one written as null means: num_key_value_heads =
    num_attention_heads, head_dim = hidden_size / num_attention_heads, no sliding window, and
    for the others the default.

    Args:
        hf: the parsed config.json.
        source: named first in every error (the file's path).
    Returns:
        the ModelConfig; its arch is the file's model_type.
    Raises:
        ValueError: one line naming `source` and the field.
    """
    arch = _arch(hf, source)
    _refuse_unsupported(hf, arch, source)
    missing = [key for key in _REQUIRED if hf.get(key) is None]
    if missing:
        raise ValueError(f"{source}: required field(s) {', '.join(missing)} missing")

    def get(key, default):  # a field written as null means the HF default, as in transformers
        return default if hf.get(key) is None else hf[key]

    def absent_or(key, if_null):  # absent: the config class's default; null: `if_null`
        value = hf[key] if key in hf else _ABSENT[arch].get(key)
        return if_null if value is None else value

    max_len = get("max_position_embeddings", _ABSENT[arch]["max_position_embeddings"])
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=absent_or("num_key_value_heads", hf["num_attention_heads"]),
            ffn_dim=hf["intermediate_size"],
            norm_eps=get("rms_norm_eps", 1e-6),
            max_seq_len=max_len,
            tie_embeddings=get("tie_word_embeddings", False),
            qkv_bias=arch == "qwen2",
            init_std=get("initializer_range", 0.02),
            head_dim=absent_or("head_dim", 0),
            qk_norm=arch == "qwen3",
            arch=arch,
            # Only Mistral honours sliding_window; Qwen's applies with use_sliding_window (refused).
            sliding_window=absent_or("sliding_window", 0) if arch == "mistral" else 0,
            **_rope_fields(hf, source, max_len),
        )
    except (TypeError, ValueError) as e:  # name the file: the message names our field
        raise ValueError(f"{source}: {e}") from None


def _arch(hf: dict, source: str) -> str:
    """The file's model_type, when it is one Crucible runs, as a transformers CausalLM class."""
    auto_map = hf.get("auto_map")
    if auto_map:
        names = ", ".join(auto_map) if isinstance(auto_map, dict) else repr(auto_map)
        raise ValueError(
            f"{source}: auto_map ({names}) needs trust_remote_code; Crucible runs only {', '.join(ARCHES)}"
        )
    model_type = hf.get("model_type")
    if model_type not in ARCHES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (only {', '.join(ARCHES)})")
    architectures = hf.get("architectures") or []
    # AutoModelForCausalLM goes by model_type; an entry refused here is another head (a
    # classifier, a reward model) whose weights would not be a language model's.
    for name in architectures if isinstance(architectures, list) else [architectures]:
        if name not in _CAUSAL_LM.values():
            raise ValueError(
                f"{source}: architectures entry {name!r} is not a model Crucible runs "
                f"(only {', '.join(_CAUSAL_LM.values())})"
            )
    return model_type


def _refuse_unsupported(hf: dict, arch: str, source: str) -> None:
    """Raise on a config field that would change the math of the Decoder if it were ignored."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN maps both to SiLU
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only silu, as in SwiGLU)")
    if arch == "llama":
        for key, what in (("attention_bias", "a bias on q/k/v and o_proj"), ("mlp_bias", "a bias in the MLP")):
            if hf.get(key):
                raise ValueError(f"{source}: Llama {key} ({what}) is not supported")
    if arch == "qwen3" and hf.get("attention_bias"):
        raise ValueError(f"{source}: Qwen3 attention_bias (a bias on q/k/v and o_proj) is not supported")
    window = hf.get("sliding_window")
    if arch == "mistral" and window is not None and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"{source}: sliding_window {window!r} must be a positive number of positions or null")
    if arch in ("qwen2", "qwen3"):  # Llama ignores these fields, Mistral has one window for all layers
        sliding = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
        if hf.get("use_sliding_window") or sliding:
            field = "use_sliding_window true" if hf.get("use_sliding_window") else f"layer_types {sliding}"
            raise ValueError(f"{source}: sliding-window attention ({field}) is not supported")


def _rope_fields(hf: dict, source: str, max_len: int) -> dict:
    """ModelConfig's rope_* fields from config.json: plain RoPE or Llama 3.1's scaling.

    transformers 5 writes `rope_parameters` (rope_theta inside), 4.x `rope_scaling` beside a
    top-level rope_theta; both read rope_scaling first when it is there. Any other rope_type in
    either is refused, as is a rope_theta the two places disagree on (4.x and 5 would differ).
    """
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ValueError(f"{source}: partial_rotary_factor {hf['partial_rotary_factor']} is not supported (only 1)")
    for key in ("rope_parameters", "rope_scaling"):
        rope = {} if hf.get(key) is None else hf[key]
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: {key} must be an object, not {type(rope).__name__}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: {key} rope_type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise ValueError(f"{source}: {key} partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    theta, top_theta = rope.get("rope_theta"), hf.get("rope_theta")
    if theta is not None and top_theta is not None and theta != top_theta:
        raise ValueError(f"{source}: rope_theta {top_theta} disagrees with {key} rope_theta {theta}")
    fields = dict(
        rope_theta=theta if theta is not None else 10000.0 if top_theta is None else top_theta,
        rope_type=rope.get("rope_type", rope.get("type", "default")),
    )
    if fields["rope_type"] == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if rope.get(k) is None]
        if missing:
            raise ValueError(f"{source}: {key} rope_type 'llama3' lacks {', '.join(missing)}")
        fields.update(
            rope_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            # without it, transformers takes max_position_embeddings
            rope_original_max_len=rope.get("original_max_position_embeddings") or max_len,
        )
    return fields


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
        if cfg.qk_norm:
            out[theirs + "self_attn.q_norm.weight"] = sd[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = sd[ours + "attn.k_norm.weight"]
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
        if cfg.qk_norm:
            sd[ours + "attn.q_norm.weight"] = take(theirs + "self_attn.q_norm.weight")
            sd[ours + "attn.k_norm.weight"] = take(theirs + "self_attn.k_norm.weight")
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
    """Read an HF Llama, Mistral, Qwen2 or Qwen3 checkpoint folder (single or sharded safetensors).

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
