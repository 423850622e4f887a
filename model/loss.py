"""THE loss: masked causal-LM cross-entropy as a sum and a target-token count.

Pretraining and SFT call the same function and differ only in their labels (SFT sets prompt
tokens to IGNORE_INDEX). Labels arrive already aligned: labels[t] is the target of position t;
the data pipeline shifts, the model never does. Returning (sum, count) instead of a mean lets the
caller divide by the GLOBAL target count of the whole optimizer step (all micro-batches, all
ranks), which is what keeps gradient accumulation and data parallelism exact when micro-batches
hold different numbers of targets (the bug fixed in transformers PR #34191).

Preference and RL objectives (training/objectives.py) need each target's log-probability
instead: `chunked_token_logprobs` gives it per position, `sequence_logprobs` sums it per
sequence; neither materialises the (B, T, V) logits either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
GPU_CHUNK_TOKENS = 1024
"""Rows of logits the chunked loss holds at once on a GPU: chunk × vocab × 4 bytes (512 MiB at
128k vocab), large enough for the matmuls to run at full speed."""
CPU_CHUNK_BYTES = 8 << 20
"""On CPU a chunk's fp32 logits are kept near this size (but at least CPU_MIN_CHUNK_TOKENS rows),
so that the passes over them after the matmul (softmax, scatter) run in cache and the peak stays
low. Measured on 2 cores at vocab 8192 (loss forward + backward, 2048 tokens): 256 and 512 rows
run alike, 1024 ~7% and 128 ~10% slower."""
CPU_MIN_CHUNK_TOKENS = 256
"""Fewer rows make the matmuls too thin to run at full speed (64 rows at vocab 32000: ~20% slower)."""
_LOG_P_EXACT = -100 * math.log(2)
"""log(2⁻¹⁰⁰): below it, log(softmax) of an fp32 probability is no longer exact (subnormals)."""
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def default_chunk_tokens(device: torch.device, vocab_size: int) -> int:
    """Rows of logits per chunk for `chunked_causal_lm_loss` on this device."""
    if device.type == "cuda":
        return GPU_CHUNK_TOKENS
    return max(CPU_MIN_CHUNK_TOKENS, CPU_CHUNK_BYTES // (4 * vocab_size))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0):
    """Summed cross-entropy over the target positions.

    Args:
        logits: (..., V) scores, any float dtype (computed in fp32).
        labels: (...) aligned target ids; IGNORE_INDEX marks positions without a target.
        z_loss: weight of the z-loss z·logsumexp² per target (PaLM, Chowdhery et al. 2022),
            which keeps the softmax normaliser near 1; 0 disables it.
    Returns:
        (loss_sum, n_target_tokens): fp32 scalar and int64 scalar tensors.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        # where, not a product: an ignored row's lse may be inf (inf · 0 is NaN)
        loss_sum = loss_sum + z_loss * torch.where(valid, lse.square(), 0.0).sum()
    return loss_sum, valid.sum()


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    z_loss: float = 0.0,
):
    """`causal_lm_loss(hidden @ weight.T, labels)` without the full (B, T, V) logits.

    Logits are made `chunk_tokens` rows at a time; the gradients with respect to the hidden
    states and the weight are computed in the same pass (softmax − one-hot), so backward holds
    no logits either — only tensors the size of the inputs.

    Args:
        hidden: (..., dim) final hidden states.
        weight: (V, dim) output projection.
        labels: (...) aligned target ids with IGNORE_INDEX.
        chunk_tokens: rows of logits materialised at once; default `default_chunk_tokens`.
        z_loss: as in `causal_lm_loss`.
    Returns:
        (loss_sum, n_target_tokens), equal to `causal_lm_loss` on the full logits.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    if hidden.device.type == "cpu":
        # Rows without a target (SFT prompts, padding) add nothing to the loss: leave them out of
        # the matmuls. Picking them needs their number on the host: free on CPU, but a GPU would
        # have to finish the forward first, so there they are computed and masked instead.
        rows = valid.nonzero().squeeze(1)
        if len(rows) < len(labels):
            hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    if chunk_tokens is not None and chunk_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive (or 0/None for the default)")
    chunk_tokens = chunk_tokens or default_chunk_tokens(hidden.device, weight.shape[0])
    if not torch.is_grad_enabled():
        # Inside forward, needs_input_grad follows requires_grad, not the grad mode: without this,
        # evaluation under no_grad would compute both gradients (and a (V, dim) fp32 buffer).
        hidden, weight = hidden.detach(), weight.detach()
    loss_sum = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, z_loss)
    return loss_sum, valid.sum()


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight.T. On CPU in fp32 through oneDNN's matmul: for this shape (a chunk of rows, a
    short inner dim, the whole vocabulary) it runs ~30% faster than MKL's sgemm on AVX2 (256 ×
    256 × 8192: 10.1 against 13.7 ms, 2 cores); elsewhere the plain matmul."""
    fp32 = h.dtype == weight.dtype == torch.float32
    if _ONEDNN_LINEAR and h.device.type == "cpu" and fp32 and not torch.is_autocast_enabled("cpu"):
        return torch.ops.mkldnn._linear_pointwise(h, weight, None, "none", [], "")
    return h @ weight.t()


def _log_p_target(logits: torch.Tensor, target: torch.Tensor, want_probs: bool, h: torch.Tensor, weight: torch.Tensor):
    """(log p of each row's target, softmax(logits) or None), the probabilities written over the
    fp32 logits.

    log_softmax is one fused pass, and exact where exp(logits − lse) underflows; the GPU path
    (and the no-gradient one) takes it and then exponentiates in place. On CPU the softmax is
    taken in place instead, each row in cache (256 × 8192: ~1.4 against ~4.8 ms for log_softmax
    + exp), and log p_y = log(p_y). That loses precision only where p_y is below 2⁻¹⁰⁰ (the
    target 69 nats under the row's best); those rows' logits are made again from `h` and
    `weight` and taken through log_softmax, so the result stays exact. Finding them reads a
    flag on the host: free on CPU, a sync on a GPU.
    """
    if not want_probs or logits.device.type != "cpu":
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(1, target).squeeze(1), logp.exp_() if want_probs else None
    torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # row by row: safe in place
    logp_y = logits.gather(1, target).squeeze(1).log()
    inexact = logp_y < _LOG_P_EXACT
    if inexact.any():
        rows = inexact.nonzero().squeeze(1)
        again = torch.log_softmax(_logits(h[rows], weight).float(), dim=-1)
        logp_y[rows] = again.gather(1, target[rows]).squeeze(1)
    return logp_y, logits


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, z_loss):
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_grad_h or want_grad_w
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad_h else None
        # Accumulated in fp32 across chunks, cast to the weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            logits = _logits(h, weight).float()  # (n, V)
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)[:, None]
            # the z-loss needs lse = logit_y − log p_y; logit_y is read before the softmax overwrites it
            logit_y = logits.gather(1, target).squeeze(1) if z_loss else None
            logp_y, probs = _log_p_target(logits, target, want_grad, h, weight)
            del logits  # where probs is a new tensor (GPU, no gradient), the logits go now
            per_token = -logp_y
            if z_loss:
                lse = logit_y - logp_y
                per_token = per_token + z_loss * lse.square()
            loss_sum += torch.where(valid, per_token, 0.0).sum()
            if not want_grad:
                continue
            # d/dlogits of (lse − logit_y + z·lse²) = softmax·(1 + 2z·lse) − onehot(y), in place
            dlogits = probs
            if z_loss:
                dlogits.mul_((1 + 2 * z_loss * lse)[:, None])
            dlogits.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=dlogits.dtype))
            dlogits = dlogits.to(weight.dtype)
            # Rows without a target get no gradient: masked on the (n, dim) side, not the (n, V).
            keep = valid[:, None].to(h.dtype)
            if want_grad_h:
                grad_hidden[start : start + chunk_tokens] = (dlogits @ weight) * keep
            if want_grad_w:
                masked_h = h * keep
                if dlogits.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
                    grad_weight.addmm_(dlogits.t(), masked_h)  # in place: no (V, dim) temporary
                else:
                    grad_weight += (dlogits.t() @ masked_h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log p(labels[t]) at every position from `hidden @ weight.T`, without the full logits.

    What preference training (DPO) and RL (GRPO) need: each target's log-probability,
    differentiable. Logits are made `chunk_tokens` rows at a time, in fp32, and only the target's
    log_softmax is kept. Unlike `chunked_causal_lm_loss`, the gradients cannot be formed in the
    forward pass: the output is one value per token, whose upstream gradient is known only in
    backward. So backward makes each chunk's logits again (one extra matmul per chunk) and forms
    d/dlogits = g·(onehot − softmax) there; neither pass holds more than a chunk of logits.

    Args:
        hidden: (..., dim) final hidden states.
        weight: (V, dim) output projection.
        labels: (...) aligned target ids with IGNORE_INDEX.
        chunk_tokens: rows of logits materialised at once; default `default_chunk_tokens`.
    Returns:
        fp32 tensor of labels.shape: log p of each target, exactly 0.0 where labels is
        IGNORE_INDEX (and no gradient flows there).
    """
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if chunk_tokens is not None and chunk_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive (or 0/None for the default)")
    chunk_tokens = chunk_tokens or default_chunk_tokens(hidden.device, weight.shape[0])
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()  # as in chunked_causal_lm_loss
    if hidden.device.type != "cpu":
        return _ChunkedTokenLogprobs.apply(hidden, weight, labels, chunk_tokens).view(shape)
    # On CPU rows without a target stay out of the matmuls, as in chunked_causal_lm_loss.
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if len(rows) == len(labels):
        return _ChunkedTokenLogprobs.apply(hidden, weight, labels, chunk_tokens).view(shape)
    picked = _ChunkedTokenLogprobs.apply(hidden.index_select(0, rows), weight, labels[rows], chunk_tokens)
    return picked.new_zeros(len(labels)).index_copy(0, rows, picked).view(shape)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, 0)[:, None]
        logp = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = _logits(hidden[rows], weight).float()  # (n, V)
            logp[rows] = torch.log_softmax(logits, dim=-1).gather(1, target[rows]).squeeze(1)
        ctx.save_for_backward(hidden, weight, target, valid)
        ctx.chunk_tokens = chunk_tokens
        # Backward runs outside the caller's autocast: it is restored there, so that the logits
        # made again are the ones this forward made.
        device = hidden.device.type
        ctx.autocast = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        return torch.where(valid, logp, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, target, valid = ctx.saved_tensors
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_grad_h else None
        # Accumulated in fp32 across chunks, cast to the weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
        g = torch.where(valid, grad_logp.float(), 0.0)[:, None]  # (N, 1): ignored rows get no gradient
        device, autocast_enabled, autocast_dtype = ctx.autocast
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_enabled):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                rows = slice(start, start + ctx.chunk_tokens)
                h = hidden[rows]
                dlogits = torch.softmax(_logits(h, weight).float(), dim=-1)  # (n, V)
                # d log p_y / d logits = onehot(y) − softmax, times the upstream g; in place
                dlogits.mul_(-g[rows]).scatter_add_(1, target[rows], g[rows])
                dlogits = dlogits.to(weight.dtype)
                if want_grad_h:
                    grad_hidden[rows] = dlogits @ weight
                if want_grad_w:
                    if dlogits.dtype == torch.float32 and not autocast_enabled:
                        grad_weight.addmm_(dlogits.t(), h)  # in place: no (V, dim) temporary
                    else:
                        grad_weight += (dlogits.t() @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def sequence_logprobs(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    n_seqs: int,
):
    """Per-sequence sums of token log-probs, and target counts, for packed or padded rows.

    Args:
        token_logps: (...) log p per position, as `chunked_token_logprobs` returns.
        labels: (...) aligned target ids with IGNORE_INDEX; only targets count.
        seq_ids: (...) int64 sequence index of each position, in [0, n_seqs); positions without
            a target contribute nothing whatever their id (padding may carry any).
        n_seqs: number of sequences.
    Returns:
        (sums, counts): (n_seqs,) fp32, differentiable through `token_logps`, and (n_seqs,)
        int64. A sequence with no target has sum 0 and count 0.
    """
    valid = (labels != IGNORE_INDEX).reshape(-1)
    ids = torch.where(valid, seq_ids.reshape(-1), 0)
    values = torch.where(valid, token_logps.reshape(-1).float(), 0.0)
    sums = values.new_zeros(n_seqs).index_add(0, ids, values)
    counts = torch.zeros(n_seqs, dtype=torch.int64, device=labels.device).index_add(0, ids, valid.long())
    return sums, counts
