"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

With the ModelConfig's switches it is also Llama 3.1 (scaled RoPE), Mistral (a sliding window it
refuses to exceed), Qwen2 (q/k/v bias) and Qwen3 (per-head q/k norm, decoupled head_dim).

Reads top to bottom: norm → rotary helpers → attention mask → KV cache → attention →
feed-forward → activation checkpointing → block → decoder. Pure PyTorch; parallelism is applied
from outside (training/engine.py).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.config import ModelConfig
from model.loss import chunked_causal_lm_loss, chunked_token_logprobs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) · weight, normalised in fp32 and scaled in the input dtype as Llama does (so
    bf16 matches HF). Keeps only x and 1/rms for backward and recomputes x / rms there: autograd
    would also keep the normalised tensor, one more activation of the residual's size."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        dweight = (dy * normed.type_as(x)).flatten(0, -2).sum(0, dtype=torch.float32).to(weight.dtype)
        dnormed = (dy * weight).float()
        # d/dx of x·rstd: rstd · (g − normed · mean(g · normed))
        dx = rstd * (dnormed - normed * (dnormed * normed).mean(-1, keepdim=True))
        return dx.type_as(x), dweight, None


# --- rotary embeddings (Su et al. 2021), "rotate half" layout as in HF Llama -----------------


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies, (head_dim // 2,) in fp32.

    Args:
        cfg: head_dim, rope_theta, and the rope_* scaling fields when rope_type is "llama3".
        device: where the result goes.
    Returns:
        the frequencies, computed as transformers computes them (same ops, same order).
    """
    exponents = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    return _llama3_scaled(inv_freq, cfg) if cfg.rope_type == "llama3" else inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    # Llama 3.1's scaling (Meta's apply_scaling; transformers' _compute_llama3_parameters):
    # wavelengths shorter than original_len / high_freq_factor are kept, those longer than
    # original_len / low_freq_factor are slowed by `factor`, and those between are interpolated.
    old_len, low, high, factor = (
        cfg.rope_original_max_len,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_factor,
    )
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables for the given positions, each (B, T, 1, head_dim)."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, head_dim) by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --- packed documents ---------------------------------------------------------------------


def document_runs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document ids renumbered so that each run of equal ids is its own document: [0,0,1,1,0,0]
    is three documents, as positions_from_doc_ids counts them, and never lets the last two
    tokens attend to the first two. (B, T) → (B, T)."""
    runs = torch.zeros_like(doc_ids)
    runs[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).cumsum(dim=1)
    return runs


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 wherever the document id changes. (B, T) → (B, T)."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, T, T): True where query t may attend key s (s <= t, same document)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def _flex_block_mask(doc_ids: torch.Tensor):
    """The same document-causal mask as a FlexAttention BlockMask (sparse: whole blocks skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    B, T = doc_ids.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


_compiled_flex = None


def _flex_attention(q, k, v, block_mask):
    # FlexAttention is only fast when compiled; compile it once per process.
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


# --- KV cache for generation --------------------------------------------------------------


class LayerCache:
    """One layer's keys and values so far, in preallocated (B, n_kv_heads, max_len, head_dim)
    buffers, so each decoding step writes one slice instead of concatenating."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k, v (B, n_kv_heads, T, head_dim) at `length`; return the whole buffers.

        Attention runs over all max_len slots, the unwritten ones masked out (they hold zeros,
        not garbage, as a masked NaN would still poison the output): every decoding step then
        has the same shapes, so attention kernels and their plans (cuDNN builds one per shape)
        are reused instead of rebuilt for each new length.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} requested (make a larger cache)")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k, self.v


class KVCache:
    """Every layer's cache; made by `Decoder.new_cache` and passed to `Decoder.forward(cache=...)`."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        """Positions filled so far (the same in every layer between forward calls)."""
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]


def _check_window(cfg: ModelConfig, span: int) -> None:
    """Refuse attention over more positions than the sliding window: the Decoder computes full
    attention, which equals sliding-window attention only within the window. `span` is the
    row length T (with doc_ids too: a document may be that long) plus the cached positions."""
    if cfg.sliding_window and span > cfg.sliding_window:
        raise ValueError(
            f"model.sliding_window={cfg.sliding_window}: asked to attend over {span} positions; keep sequences "
            f"(cached plus new tokens) within the window (model.context_len={cfg.context_len})"
        )


def cached_causal_mask(past: int, T: int, max_len: int, device) -> torch.Tensor:
    """Boolean mask (1, 1, T, max_len) over the cache: new query t (at position past + t) sees
    the cached keys and the new keys up to itself, and no unwritten slot."""
    query_pos = torch.arange(past, past + T, device=device)[:, None]
    return (torch.arange(max_len, device=device) <= query_pos)[None, None]


# --- blocks -------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        self.wqkv = nn.Linear(cfg.dim, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_out, cfg.dim, bias=False)
        # Qwen3's q/k norm: one RMSNorm over head_dim, shared by all heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None):
        B, T, _ = x.shape
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split((q_out, kv_out, kv_out), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # after the projection, before RoPE, as Qwen3Attention
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # A copy, not a view: a view would keep the whole q/k/v projection alive for backward.
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).clone()
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, head_dim)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_kv_heads, max_len, head_dim)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            out = _flex_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, q_out))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Gate and up projections fused into one matmul: w13 = [w1; w3] (SwiGLU, Shazeer 2020).
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        # w2's weight is used inside _SwiGLUDown, not through w2's forward, so ZeRO-3 gathers a
        # whole Block at once (training/engine.py makes Block a ZeRO-3 leaf module).
        gate_up = self.w13(x)
        out = _SwiGLUDown.apply(gate_up, self.w2.weight)
        lora_delta = getattr(self.w2, "lora_delta", None)  # set when w2 is a model.lora.LoRALinear
        if lora_delta is None:
            return out
        # down_proj's adapter needs its input, which _SwiGLUDown recomputes rather than keeps.
        gate, up = gate_up.chunk(2, dim=-1)
        return out + lora_delta(F.silu(gate) * up)


class _SwiGLUDown(torch.autograd.Function):
    """w2 · (silu(gate) · up) from the fused (..., 2·ffn_dim) gate/up projection.

    Keeps only that projection and w2 for backward and recomputes silu(gate) · up there (a few
    elementwise passes): autograd would also keep silu(gate) and the product, two more
    activations of the feed-forward's inner width. Runs in the projection's dtype, as autocast
    would run w2.
    """

    @staticmethod
    def forward(ctx, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return F.linear(F.silu(gate) * up, weight.to(gate_up.dtype))

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dweight = None
        if ctx.needs_input_grad[1]:
            h = F.silu(gate) * up  # exactly the forward's product
            dweight = (dy.flatten(0, -2).t() @ h.flatten(0, -2)).to(weight.dtype)
        dh = (dy @ weight.to(dy.dtype)).float()
        gate, up = gate.float(), up.float()
        sig = torch.sigmoid(gate)
        dgate = dh * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = σ(g)(1 + g(1 − σ(g)))
        dup = dh * gate * sig
        return torch.cat((dgate, dup), dim=-1).to(gate_up.dtype), dweight


# --- activation checkpointing ---------------------------------------------------------------

RECOMPUTE_MODES = ("none", "full", "selective")
"""What a Block recomputes in backward instead of keeping: nothing; everything (only its input
is kept); everything but the attention kernel's outputs."""


_aten = torch.ops.aten
_ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.higher_order.flex_attention,
}


def _keep_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # Selective activation checkpointing, as torchtitan's op policy: attention is the one part
    # of a block whose recomputation grows with T², while its outputs ((B, H, T, head_dim) and a
    # logsumexp per row) are the size of one activation. Norms, rotary, the projections and the
    # SwiGLU are recomputed: matmuls at full speed and a few elementwise passes.
    return CheckpointPolicy.MUST_SAVE if func in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_attention)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        # One of RECOMPUTE_MODES, set from outside (training/engine.py). The checkpoint is taken
        # inside forward, so that a compiled block traces it (checkpointing → compile).
        self.recompute = "none"

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None):
        if self.recompute == "none" or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, mask, cache)
        if self.recompute == "full":
            return checkpoint(self._forward, x, cos, sin, mask, cache, use_reentrant=False)
        return checkpoint(self._forward, x, cos, sin, mask, cache, use_reentrant=False, context_fn=_selective_context)

    def _forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


_INIT_BLOCK = 1 << 16
"""Elements drawn from one seeded generator in `initial_rows` (whole rows of at least one)."""


def initial_rows(cfg: ModelConfig, name: str, shape: tuple[int, ...], start: int, stop: int, seed: int) -> torch.Tensor:
    """Rows [start, stop) of parameter `name`'s initial value, in fp32, computed without the rest.

    Norm weights are ones and biases zeros. Every other weight is normal with std
    `cfg.init_std`, scaled by 1/sqrt(2·n_layers) for the residual-branch outputs (wo, w2) as in
    GPT-2, so that the residual stream's variance does not grow with depth. Its rows are drawn
    in blocks of about `_INIT_BLOCK` elements, each from a generator seeded by (seed, name,
    block), so any rank draws its own rows alone and every world size starts from the same
    weights.

    Args:
        cfg: the model's config (init_std, n_layers).
        name: the parameter's name in the Decoder's state dict.
        shape: its full shape.
        start, stop: the rows wanted (elements of a 1-D parameter).
        seed: the init's seed.
    """
    if ".lora_" in name:
        raise ValueError(f"{name}: an adapter's initial value is model.lora.initial_rows'")
    part = (max(0, min(stop, shape[0]) - start), *shape[1:])
    if len(shape) == 1:  # the norms' weights and the q/k/v biases
        return torch.ones(part) if name.endswith("norm.weight") else torch.zeros(part)
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith((".wo.weight", ".w2.weight")) else cfg.init_std
    return seeded_rows(name, shape, start, stop, seed, lambda t, g: t.normal_(0.0, std, generator=g))


def seeded_rows(name: str, shape, start: int, stop: int, seed: int, draw) -> torch.Tensor:
    """Rows [start, stop) of a tensor whose rows are drawn block by block by `draw(tensor,
    generator)`, each block's generator seeded by (seed, name, block index)."""
    row = math.prod(shape[1:])
    per_block = max(1, _INIT_BLOCK // row)
    stop = min(stop, shape[0])
    out = torch.empty(max(0, stop - start), *shape[1:])
    for block in range(start // per_block, -(-stop // per_block) if stop > start else 0):
        first = block * per_block
        rows = min(per_block, shape[0] - first)
        digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
        values = draw(torch.empty(rows, *shape[1:]), torch.Generator().manual_seed(int.from_bytes(digest[:8]) >> 1))
        lo, hi = max(start, first), min(stop, first + rows)
        out[lo - start : hi - start] = values[lo - first : hi - first]
    return out


class Decoder(nn.Module):
    """The language model. Build it anywhere (the meta device included), then `init_weights()`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, dim) output projection (the embedding table when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fill every parameter (after `to_empty` from the meta device, or to re-initialise)
        with `initial_rows`: the values a sharded start-up gives each rank's part.

        Args:
            seed: the init's seed (default: drawn from torch's global RNG, so that
                `torch.manual_seed` decides it).
        """
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        for name, p in self.named_parameters():
            p.copy_(initial_rows(self.cfg, name, p.shape, 0, p.shape[0], seed))

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for incremental decoding.

        Args:
            batch: sequences decoded together.
            max_len: most positions it holds (prompt plus generated tokens).
            device, dtype: of the buffers; default those of the model's weights.
        Returns:
            a KVCache to pass to `forward(..., cache=cache)`.
        """
        weight = self.tok_embeddings.weight
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        kw = dict(device=device or weight.device, dtype=dtype or weight.dtype)
        return KVCache([LayerCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(cfg.n_layers)])

    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, dim): what the output projection reads.

        Args:
            tokens: (B, T) token ids.
            position_ids: (B, T) rotary positions; by default 0..T-1, or restarting at each
                document when `doc_ids` is given.
            doc_ids: (B, T) document index of each token in a packed row; a token then attends
                only to earlier tokens of its own document.
            cache: for generation: `tokens` are only the new tokens, which attend to every
                cached key and causally to each other; their keys and values are appended.
                Positions then default to continue from the cache's length. Not with doc_ids.
        """
        past = 0 if cache is None else cache.length
        _check_window(self.cfg, past + tokens.shape[1])
        if doc_ids is not None:
            doc_ids = document_runs(doc_ids)
        if position_ids is None:
            position_ids = (
                positions_from_doc_ids(doc_ids)
                if doc_ids is not None
                else torch.arange(past, past + tokens.shape[1], device=tokens.device).expand_as(tokens)
            )
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        # Frequencies are recomputed in fp32 on every call rather than kept in a buffer, which
        # `model.to(bfloat16)` would round and the meta device would leave empty.
        inv_freq = rope_frequencies(self.cfg, device=h.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq, h.dtype)
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids and a KV cache cannot be combined")
            mask = _flex_block_mask(doc_ids) if h.is_cuda else document_causal_mask(doc_ids)
        if cache is not None:
            mask = cached_causal_mask(past, tokens.shape[1], cache.max_len, h.device)
        layer_caches = [None] * len(self.layers) if cache is None else cache.layers
        for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
            h = layer(h, cos, sin, mask, layer_cache)
        return self.norm(h)

    def loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        z_loss: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of pretraining and SFT alike: the chunked cross-entropy summed over
        the target tokens (model/loss.py), never materialising the (B, T, vocab) logits.

        Args:
            tokens, position_ids, doc_ids: as `hidden_states`.
            labels: (B, T) aligned targets (labels[t] is the target of position t; IGNORE_INDEX
                where there is none).
            z_loss: weight of the z-loss term on log Z.
        Returns:
            (loss_sum, n_target_tokens): 0-d tensors; divide by a global count for the mean.
        """
        h = self.hidden_states(tokens, position_ids, doc_ids)
        return chunked_causal_lm_loss(h, self.output_weight, labels, z_loss=z_loss)

    def token_logprobs(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(labels[t]) at each position, (B, T) fp32, 0 where there is no target: what
        preference and RL objectives sum per sequence (model/loss.py), differentiable, never
        materialising the (B, T, vocab) logits.

        Args:
            tokens, labels, position_ids, doc_ids: as `loss`.
        """
        h = self.hidden_states(tokens, position_ids, doc_ids)
        return chunked_token_logprobs(h, self.output_weight, labels)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        z_loss: float = 0.0,
        per_token: bool = False,
    ):
        """Logits (B, T, vocab_size) for the arguments of `hidden_states`.

        With `labels`, `loss(...)` instead, or `token_logprobs(...)` with `per_token`: the route
        through the module call, for wrappers that gather a sharded module's own parameters
        only in its forward hooks (DeepSpeed ZeRO-3 gathers the output projection there). Call
        `loss` or `token_logprobs` directly otherwise; the engines pick the right call.
        """
        if labels is not None:
            if cache is not None:
                raise ValueError("a loss is computed over whole rows, not with a KV cache")
            if per_token:
                return self.token_logprobs(tokens, labels, position_ids, doc_ids)
            return self.loss(tokens, labels, position_ids, doc_ids, z_loss)
        return F.linear(self.hidden_states(tokens, position_ids, doc_ids, cache), self.output_weight)

    def set_recompute(self, mode: str) -> None:
        """Activation checkpointing of every block: one of RECOMPUTE_MODES."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"activation checkpointing {mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
        for layer in self.layers:
            layer.recompute = mode

    def num_params(self, exclude_embedding: bool = False, trainable_only: bool = False, numel=torch.numel) -> int:
        """Parameters of the whole model (also when built on the meta device).

        Args:
            exclude_embedding: leave out the input embedding (a lookup, not a matmul) when untied.
            trainable_only: count only those that require grad.
            numel: a parameter's size (a wrapper that partitions parameters keeps it elsewhere).
        """
        n = sum(numel(p) for p in self.parameters() if p.requires_grad or not trainable_only)
        embedding = self.tok_embeddings.weight
        if exclude_embedding and self.output is not None and (embedding.requires_grad or not trainable_only):
            n -= numel(embedding)  # (tied, it is the output projection too)
        return n

    def num_flops_per_token(self, seq_len: int, numel=torch.numel) -> int:
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus 12·L·d·T for
        attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). N excludes the
        input embedding lookup but counts the output projection, tied or not; d is the attention
        width n_heads · head_dim."""
        cfg = self.cfg
        # A frozen weight (a LoRA base) costs 4 FLOPs per token, not 6: it gets no weight gradient.
        n = self.num_params(exclude_embedding=True, numel=numel)
        trained = self.num_params(exclude_embedding=True, trainable_only=True, numel=numel)
        matmuls = 6 * trained + 4 * (n - trained)
        return matmuls + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
