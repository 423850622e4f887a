"""Import from and export to the Hugging Face checkpoint format of Llama (3.x included), Mistral,
Qwen2 and Qwen3 (transformers' model_type llama, mistral, qwen2, qwen3).

Weights travel through safetensors only: nothing here unpickles a file. `HFSlices` reads one
rank's part of each tensor and `save_hf_sharded` writes a folder one tensor at a time, so that
neither holds the whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
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


_TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}  # fmt: skip
_PER_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.wo.weight": ("self_attn.o_proj.weight",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "ffn_norm.weight": ("post_attention_layernorm.weight",),
    "ffn.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.w2.weight": ("mlp.down_proj.weight",),
}
"""The HF tensors of each Crucible tensor of block i (under model.layers.{i}.), stacked along dim 0."""


def hf_sources(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """The one table of names between Crucible and HF: what the converters, `HFSlices` and
    `save_hf_sharded` all go by.

    Args:
        cfg: the model.
    Returns:
        each Crucible state-dict name, in the Decoder's order (no output.weight when tied) →
        the HF tensors that stacked along dim 0 make it, with each one's rows (elements of a
        1-D tensor): q, k, v for wqkv (weight and bias), gate then up for w13, one for the rest.
    """
    fused = {f"{path}.weight": tuple(rows for _, rows in parts) for path, parts in block_projections(cfg).items()}
    fused["attn.wqkv.bias"] = fused["attn.wqkv.weight"]
    table = {}
    for name, shape in _shapes(cfg).items():
        if name in _TOP_LEVEL:
            table[name] = [(_TOP_LEVEL[name], shape[0])]
            continue
        _, i, suffix = name.split(".", 2)  # layers.{i}.{suffix}
        theirs = [f"model.layers.{i}.{n}" for n in _PER_LAYER[suffix]]
        table[name] = list(zip(theirs, fused.get(suffix, (shape[0],)), strict=True))
    return table


def block_projections(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each Linear of a Block (by path in the Block, e.g. "attn.wqkv") → the HF projections
    stacked in its weight, in order, with their rows. From the config alone: no model is built
    (so it can run where building one would be intercepted, as inside ZeRO-3's zero.Init)."""
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": cfg.dim,
            "gate_proj": cfg.ffn_dim, "up_proj": cfg.ffn_dim, "down_proj": cfg.dim}  # fmt: skip
    out = {}
    for suffix, theirs in _PER_LAYER.items():
        projections = [name.split(".")[1] for name in theirs]
        if suffix.endswith(".weight") and all(p in rows for p in projections):
            out[suffix.removesuffix(".weight")] = tuple((p, rows[p]) for p in projections)
    return out


def _shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The Decoder's state-dict shapes, in its order (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Decoder(cfg).state_dict().items()}


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Crucible parameter names → HF names, splitting the fused qkv and gate/up projections."""
    out = {}
    for name, parts in hf_sources(cfg).items():
        pieces = sd[name].split([rows for _, rows in parts])
        out.update({hf_name: t.contiguous() for (hf_name, _), t in zip(parts, pieces, strict=True)})
    return out


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "") -> dict[str, torch.Tensor]:
    """HF names → Crucible names, fusing q/k/v and gate/up. Missing tensors name the key."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"{source}: tensor {name!r} is missing from the checkpoint")
        return hf.pop(name)

    sd = {}
    for name, parts in hf_sources(cfg).items():
        tensors = [take(hf_name) for hf_name, _ in parts]
        sd[name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
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


def save_hf_sharded(
    cfg: ModelConfig,
    path: str | Path,
    tensor_fn: Callable[[str, torch.Size], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2**31,
) -> Path:
    """Write a sharded HF folder one tensor at a time, never holding more than one shard: for a
    model that does not fit in memory twice (a random-weight 8B for a benchmark, issue 19).

    The shards are planned from the shapes first, so each file gets its final name
    `model-0000K-of-0000N.safetensors` as it is written; a shard closes before the Crucible
    tensor that would take it past max_shard_bytes (the parts of a fused tensor stay together;
    a tensor larger than that is a shard of its own). The index is written even for one shard.

    Args:
        cfg: the model.
        path: output folder (created); it must not hold a model.safetensors, which transformers
            would read instead of the index.
        tensor_fn: (Crucible name, shape) → that tensor, on any device and of any float dtype;
            called once per name, in the Decoder's order.
        dtype: the stored dtype.
        max_shard_bytes: the size at which a shard closes.
    Returns:
        the folder, with config.json, model.safetensors.index.json and the shards.
    Raises:
        FileExistsError: path holds a model.safetensors.
        ValueError: tensor_fn gave a tensor of another shape (named).
    """
    path = Path(path)
    if (path / "model.safetensors").exists():
        raise FileExistsError(f"{path / 'model.safetensors'}: exists, and transformers would read it, not the shards")
    path.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(cfg)
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    sources = hf_sources(cfg)
    weight_map = {}
    for k, names in enumerate(plan):
        file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name in names:
            t = tensor_fn(name, shapes[name])
            if t.shape != shapes[name]:
                raise ValueError(f"tensor_fn({name!r}) gave shape {tuple(t.shape)}, not {tuple(shapes[name])}")
            pieces = t.detach().to("cpu", dtype).split([rows for _, rows in sources[name]])
            shard.update({hf_name: p.contiguous() for (hf_name, _), p in zip(sources[name], pieces, strict=True)})
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del shard  # before tensor_fn makes the next shard's tensors
    total = sum(shape.numel() for shape in shapes.values()) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
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
    with HFSlices(path) as slices:
        return slices.cfg


def flat_from_rows(rows, shape: torch.Size, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of a tensor of `shape` flattened, from `rows(first, last)` (its rows
    [first, last)): only the rows that cover the range are asked for."""
    width = max(1, shape[1:].numel())
    first = start // width
    covering = rows(first, -(-stop // width)).flatten()
    return covering[start - first * width : stop - first * width]


class HFSlices:
    """A rank's part of an HF folder's tensors, under Crucible names, without reading the rest.

    For sharded start-up (issue 19): an engine builds the Decoder on the meta device, shards it,
    then fills only its own part, so no rank reads the whole model. `rows` serves FSDP2's
    Shard(0) (rank r: rows [r·c, (r+1)·c) with c = ceil(rows / world)), `flat` ZeRO-3's
    partitions (rank r: elements [r·p, (r+1)·p) of the flattened tensor). Both read only the
    source rows they return (a wqkv range may span q, k, v), with positional reads into new
    tensors rather than through a memory map: a mapped file's pages would count in the rank's
    resident memory for as long as it stays open.

    Opening checks the whole folder as `load_hf` would, from the headers (see `check_hf`), and
    keeps each weight file open until `close()` or the end of a `with` block.

    Raises (opening):
        FileNotFoundError, ValueError: as `load_hf`, naming the file and the tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cfg = read_hf_config(self.path)
        self._sources = hf_sources(self.cfg)
        self._files = contextlib.ExitStack()
        self._entries = {}  # HF name → (file, open file, dtype, shape, byte offset of its data)
        try:
            headers = {}
            for file in _weight_files(self.path):
                with _named(file):
                    f = self._files.enter_context(open(file, "rb"))
                    for name, (dtype, shape, offset) in _safetensors_header(f, file).items():
                        self._entries[name] = (file, f, dtype, shape, offset)
                        headers[name] = torch.empty(shape, dtype=dtype, device="meta")
            _fitted(headers, self.cfg, self.path)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HFSlices:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._files.close()

    def names(self) -> list[str]:
        """The Decoder's state-dict names, in its order."""
        return list(self._sources)

    def shape(self, name: str) -> torch.Size:
        """The shape of Crucible tensor `name` (read from the headers)."""
        first = self._entries[self._parts(name)[0][0]][3]
        return torch.Size([sum(rows for _, rows in self._parts(name)), *first[1:]])

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name` (from the headers)."""
        return self._entries[self._parts(name)[0][0]][2]

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of Crucible tensor `name` (elements of a 1-D one), as a slice
        `t[start:stop]` of the full tensor: a range past the end is empty, not an error.

        Args:
            name: a Crucible state-dict name (one of `names()`).
            start, stop: row indices, at least 0.
            dtype: cast to this (default: the stored dtype).
        Returns:
            a (rows, *shape[1:]) CPU tensor.
        Raises:
            ValueError: an unknown name or a negative index.
        """
        if start < 0 or stop < 0:
            raise ValueError(f"{self.path}: rows({name!r}, {start}, {stop}): indices must be at least 0")
        pieces, offset = [], 0
        for hf_name, n in self._parts(name):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                pieces.append(self._read(hf_name, lo - offset, hi - offset))
            offset += n
        if not pieces:  # an empty range still has the tensor's trailing shape and dtype
            pieces.append(self._read(self._parts(name)[0][0], 0, 0))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out if dtype is None else out.to(dtype)

    def flat(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, stop) of Crucible tensor `name` flattened, as `t.flatten()[start:stop]`;
        reads the rows that cover the range. Arguments and errors as `rows`.

        Returns:
            a 1-D CPU tensor.
        """
        if start < 0 or stop < 0:
            raise ValueError(f"{self.path}: flat({name!r}, {start}, {stop}): indices must be at least 0")
        return flat_from_rows(lambda first, last: self.rows(name, first, last, dtype), self.shape(name), start, stop)

    def _parts(self, name: str) -> list[tuple[str, int]]:
        if name not in self._sources:
            raise ValueError(f"{self.path}: {name!r} is not a tensor of this model (see names())")
        return self._sources[name]

    def _read(self, hf_name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one stored tensor, read from its file into a new tensor."""
        file, f, dtype, shape, offset = self._entries[hf_name]
        row_bytes = shape[1:].numel() * dtype.itemsize
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with _named(file):
            got = os.preadv(f.fileno(), [out.numpy()], offset + start * row_bytes) if len(out) else 0
        if got != len(out):
            raise ValueError(f"{file}: not a readable safetensors file (cut short inside {hf_name!r})")
        return out.view(dtype).reshape(stop - start, *shape[1:])


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def _safetensors_header(f, file: Path) -> dict[str, tuple[torch.dtype, torch.Size, int]]:
    """Each tensor of an open safetensors file: (dtype, shape, byte offset of its data), checked
    against the file's size (the format: an 8-byte little-endian header length, the JSON header,
    then the data; offsets in the header count from the data's start)."""
    size = os.fstat(f.fileno()).st_size
    try:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= size - 8:
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        header = json.loads(f.read(length))
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], torch.Size(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != shape.numel() * dtype.itemsize or 8 + length + end > size:
                raise ValueError(f"{name!r} does not fit the file (cut short?)")
            tensors[name] = (dtype, shape, 8 + length + begin)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors


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
    hf_shapes = {name: tuple(t.shape) for name, t in tensors.items()}  # state_dict_from_hf takes them
    try:
        sd = state_dict_from_hf(tensors, cfg, source=str(path))
    except KeyError as e:  # a missing or unexpected tensor (the message names it)
        raise ValueError(e.args[0]) from None
    except RuntimeError as e:  # q/k/v or gate/up of shapes that do not concatenate
        raise ValueError(f"{path}: the weights do not fit config.json ({str(e).splitlines()[0]})") from None
    expected = _shapes(cfg)
    wrong = [f"{k} {tuple(v.shape)}, not {tuple(expected[k])}" for k, v in sd.items() if v.shape != expected[k]]
    # q/k/v or gate/up that fit only together would be split (and sliced) at the wrong rows
    wrong = wrong or [
        f"{hf_name} {hf_shapes[hf_name]}, not {rows} rows"
        for parts in hf_sources(cfg).values()
        if len(parts) > 1
        for hf_name, rows in parts
        if hf_shapes[hf_name][0] != rows
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
