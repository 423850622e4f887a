"""Model shapes: one dataclass and a small table of named sizes."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace

_FIELD_KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}

ARCHES = ("llama", "mistral", "qwen2", "qwen3")
"""Model families, named by their Hugging Face model_type (what `model.hf` reads and writes)."""
ROPE_TYPES = ("default", "llama3")
"""Plain RoPE, or Llama 3.1's frequency scaling."""
_ZERO_MEANS = {"head_dim": "dim // n_heads", "sliding_window": "no window"}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Number of token ids; the embedding and output projection have this many rows."""
    dim: int = 768
    """Width of the residual stream (hidden size)."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Number of query heads."""
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
    head_dim: int = 0
    """Width of each attention head; 0 means dim // n_heads (filled in on construction). Qwen3
    and some Mistral models decouple it: q and o projections are n_heads · head_dim wide."""
    qk_norm: bool = False
    """RMSNorm over each query and key head (weights of size head_dim) after the projection and
    before RoPE (Qwen3)."""
    arch: str = "llama"
    """Model family, one of ARCHES: the HF model_type written on export. "llama" with qkv_bias is
    written as "qwen2", the HF class that has exactly a q/k/v bias."""
    sliding_window: int = 0
    """Mistral's attention window in positions (0: none). The Decoder computes full attention,
    which equals sliding-window attention only up to this many positions, and refuses more."""
    rope_type: str = "default"
    """One of ROPE_TYPES: plain RoPE, or "llama3" (Llama 3.1's scaling of the frequencies by the
    rope_* fields below)."""
    rope_factor: float = 8.0
    """llama3 only: low frequencies are divided by this (HF rope_parameters.factor)."""
    rope_low_freq_factor: float = 1.0
    """llama3 only: wavelengths above rope_original_max_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 only: wavelengths below rope_original_max_len / this are kept."""
    rope_original_max_len: int = 8192
    """llama3 only: the pretraining context (HF original_max_position_embeddings)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # a string or None would otherwise fail below with no field named
            value = getattr(self, f.name)
            if not isinstance(value, _FIELD_KINDS[f.type]) or (f.type != "bool" and isinstance(value, bool)):
                raise TypeError(f"model.{f.name}={value!r} must be of type {f.type}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 1")
        for name in ("head_dim", "sliding_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be at least 0 (0: {_ZERO_MEANS[name]})")
        for name in ("norm_eps", "rope_theta", "init_std", "rope_factor", "rope_low_freq_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        self._check_rope()
        self._check_arch()

    def _check_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_type={self.rope_type!r}: expected one of {', '.join(ROPE_TYPES)}")
        # the llama3 formula divides by (high − low), and its smoothing needs high > low
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be above "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        if self.rope_original_max_len < 1:
            raise ValueError(f"model.rope_original_max_len={self.rope_original_max_len} must be at least 1")

    def _check_arch(self) -> None:
        """Each arch has exactly the features its HF class has, so that an export is exact."""
        if self.arch not in ARCHES:
            raise ValueError(f"model.arch={self.arch!r}: expected one of {', '.join(ARCHES)}")
        if self.qk_norm and self.arch != "qwen3":
            raise ValueError(f"model.qk_norm=True with model.arch={self.arch!r}: only qwen3 has q/k norm")
        if self.arch == "qwen3" and not self.qk_norm:
            raise ValueError("model.qk_norm=False with model.arch='qwen3': Qwen3 always normalises q and k")
        # Qwen2 always has the q/k/v bias; Mistral has none, and Qwen3's attention_bias would
        # also bias o_proj. A llama with the bias is exported as qwen2 (see `arch`).
        if self.qkv_bias and self.arch not in ("llama", "qwen2"):
            raise ValueError(f"model.qkv_bias=True with model.arch={self.arch!r}: only qwen2 (or llama) has it")
        if self.arch == "qwen2" and not self.qkv_bias:
            raise ValueError("model.qkv_bias=False with model.arch='qwen2': Qwen2 always has the q/k/v bias")
        if self.sliding_window and self.arch != "mistral":
            raise ValueError(
                f"model.sliding_window={self.sliding_window} with model.arch={self.arch!r}: only mistral has one"
            )

    @property
    def context_len(self) -> int:
        """Longest sequence (prompt plus generated tokens, or a training row) the model runs:
        max_seq_len, capped by sliding_window where there is one."""
        return min(self.max_seq_len, self.sliding_window) if self.sliding_window else self.max_seq_len


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
    base = _PRESETS[name]
    if "head_dim" not in overrides and base.head_dim == base.dim // base.n_heads:
        # A derived head_dim is derived again from an overridden dim or n_heads, not kept stale.
        overrides = {**overrides, "head_dim": 0}
    return replace(base, **overrides)


def preset_names() -> list[str]:
    return list(_PRESETS)
