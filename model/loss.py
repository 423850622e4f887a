"""THE loss: masked causal-LM cross-entropy as a sum and a target-token count.

Pretraining and SFT call the same function and differ only in their labels (SFT sets prompt
tokens to IGNORE_INDEX). Labels arrive already aligned: labels[t] is the target of position t;
the data pipeline shifts, the model never does. Returning (sum, count) instead of a mean lets the
caller divide by the GLOBAL target count of the whole optimizer step (all micro-batches, all
ranks), which is what keeps gradient accumulation and data parallelism exact when micro-batches
hold different numbers of targets (the bug fixed in transformers PR #34191).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
GPU_CHUNK_TOKENS = 1024
"""Rows of logits the chunked loss holds at once on a GPU: chunk × vocab × 4 bytes (512 MiB at
128k vocab), large enough for the matmuls to run at full speed."""
CPU_CHUNK_BYTES = 8 << 20
"""On CPU a chunk's fp32 logits are kept near this size (but at least CPU_MIN_CHUNK_TOKENS rows),
so that the passes over them after the matmul (log-softmax, exp, scatter) run in cache and the
peak stays low. Measured on 2 cores: 256 rows at vocab 8192 is ~15% faster than 1024."""
CPU_MIN_CHUNK_TOKENS = 256
"""Fewer rows make the matmuls too thin to run at full speed (64 rows at vocab 32000: ~20% slower)."""


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
        loss_sum = loss_sum + z_loss * (lse.square() * valid).sum()
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
    chunk_tokens = chunk_tokens or default_chunk_tokens(hidden.device, weight.shape[0])
    loss_sum = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, z_loss)
    return loss_sum, valid.sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, z_loss):
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grad_h else None
        # Accumulated in fp32 across chunks, cast to the weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            logits = (h @ weight.t()).float()  # (n, V)
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)[:, None]
            # One fused pass over the logits; log p is exact where exp(logits − lse) would
            # underflow. lse itself (for the z-loss) is logit_y − log p_y.
            logp = torch.log_softmax(logits, dim=-1)
            logp_y = logp.gather(1, target).squeeze(1)
            per_token = -logp_y
            if z_loss:
                lse = logits.gather(1, target).squeeze(1) - logp_y
                per_token = per_token + z_loss * lse.square()
            del logits
            loss_sum += torch.where(valid, per_token, 0.0).sum()
            if not (want_grad_h or want_grad_w):
                continue
            # d/dlogits of (lse − logit_y + z·lse²) = softmax·(1 + 2z·lse) − onehot(y), in place
            dlogits = logp.exp_()
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
