"""Model shapes: one dataclass and a small table of named sizes."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace

_FIELD_KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Number of token ids; the embedding and output projection have this many rows."""
    dim: int = 768
    """Width of the residual stream (hidden size)."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Number of query heads; head_dim = dim // n_heads."""
    n_kv_heads: int = 12
    """Number of key/value heads (grouped-query attention when smaller than n_heads)."""
    ffn_dim: int = 2048
    """Inner width of the SwiGLU feed-forward block."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies (500000 for Llama 3)."""
    max_seq_len: int = 2048
    """Longest sequence the model is trained for (written to HF max_position_embeddings)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    qkv_bias: bool = False
    """Add a bias to the query/key/value projections (Qwen2 style)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of embeddings and linear weights."""

    def __post_init__(self) -> None:
        for f in fields(self):  # a string or None would otherwise fail below with no field named
            value = getattr(self, f.name)
            if not isinstance(value, _FIELD_KINDS[f.type]) or (f.type != "bool" and isinstance(value, bool)):
                raise TypeError(f"model.{f.name}={value!r} must be of type {f.type}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 1")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Named sizes. The larger ones follow published shapes: 1b and 3b are Llama-3.2-1B/3B, 8b is
# Llama-3-8B; 125m and 350m are GPT-3-paper widths with a Llama block.
# fmt: off
_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=512),
    "125m": ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048),
    "350m": ModelConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=2816),
    "1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, max_seq_len=8192),
    "3b": ModelConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, max_seq_len=8192),
    "8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False),
}
# fmt: on


def preset(name: str, **overrides) -> ModelConfig:
    """A named model size, optionally with some fields replaced.

    Args:
        name: one of `preset_names()`.
        **overrides: ModelConfig fields to change (e.g. `vocab_size` to match a tokenizer).
    Returns:
        a new ModelConfig.
    """
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise KeyError(f"unknown ModelConfig field {key!r}")
    return replace(_PRESETS[name], **overrides)


def preset_names() -> list[str]:
    return list(_PRESETS)
