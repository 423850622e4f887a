"""Preference (DPO family) and RL (GRPO) objectives as small pure functions.

They take log-probabilities, never logits: per-sequence sums and target counts
(`model.loss.sequence_logprobs` over `model.loss.chunked_token_logprobs`) for the DPO family,
per-token log-probs for GRPO. Nothing here knows about engines, micro-batches or ranks: each
returns per-pair or per-token losses, and the caller reduces them (for GRPO, a sum over
completion tokens divided by the global completion-token count of the optimizer step, as the
causal-LM loss is).

- `preference_loss`: DPO (Rafailov et al. 2023, "Direct Preference Optimization") with the
  conservative label smoothing of cDPO (Mitchell 2023); its length-normalised variant
  (`sigmoid_norm`, as Tülu 3's `dpo_norm` and TRL's `sigmoid_norm`); IPO (Azar et al. 2023,
  "A General Theoretical Paradigm to Understand Learning from Human Preferences"), on per-token
  averages as TRL computes it; SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization
  with a Reference-Free Reward").
- `group_advantages`: GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath).
- `grpo_token_loss`: GRPO's clipped surrogate with the k3 KL estimator to the reference, and
  the asymmetric clip range of DAPO (Yu et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("sigmoid", "sigmoid_norm", "ipo", "simpo")


@dataclass
class PreferenceLoss:
    """Per-pair results of `preference_loss`, each (P,) fp32."""

    losses: torch.Tensor
    """The loss of each pair (differentiable); the caller averages over pairs."""
    chosen_rewards: torch.Tensor
    """Implicit reward of the chosen response, detached (for logging)."""
    rejected_rewards: torch.Tensor
    """Implicit reward of the rejected response, detached (for logging)."""


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_counts: torch.Tensor,
    rejected_counts: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> PreferenceLoss:
    """DPO, its length-normalised variant, IPO or SimPO, per preference pair.

    With π and r the policy and reference log-prob sums of a response, |y| its target count,
    h the margin and ε the label smoothing:
        sigmoid:      h = (πc − rc) − (πr − rr)           loss = −(1−ε)·logσ(βh) − ε·logσ(−βh)
        sigmoid_norm: as sigmoid, each π and r divided by its |y|
        ipo:          h as sigmoid_norm                    loss = (h − 1/(2β))²
        simpo:        h = πc/|c| − πr/|r| (no reference)   loss = −(1−ε)·logσ(βh − γ) − ε·logσ(−(βh − γ))
    The reward of a response is β times its (normalised) log-ratio to the reference, β·π/|y|
    for SimPO.

    Args:
        policy_chosen, policy_rejected: (P,) summed policy log-probs of each pair's responses.
        ref_chosen, ref_rejected: (P,) the same under the reference model; None for simpo
            (required, and refused for simpo, so a misconfigured run fails rather than
            silently using or dropping the reference).
        chosen_counts, rejected_counts: (P,) target tokens of each response, at least 1 (used
            by sigmoid_norm, ipo and simpo).
        loss_type: one of PREFERENCE_LOSSES.
        beta: inverse temperature β (> 0); for ipo, 1/(2β) is the target margin.
        label_smoothing: ε in [0, 0.5], the assumed probability that a pair's preference is
            flipped (cDPO); not defined for ipo, whose squared loss has no flipped-label term,
            so anything but 0 is refused there.
        simpo_gamma: SimPO's target reward margin γ.
    Returns:
        PreferenceLoss of (P,) fp32 losses and detached chosen/rejected rewards.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {PREFERENCE_LOSSES}")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5] (a flip probability)")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing is not defined for loss_type='ipo'; set it to 0")
    has_ref = ref_chosen is not None and ref_rejected is not None
    if loss_type == "simpo" and (ref_chosen is not None or ref_rejected is not None):
        raise ValueError("loss_type='simpo' takes no reference log-probs; pass None")
    if loss_type != "simpo" and not has_ref:
        raise ValueError(f"loss_type={loss_type!r} needs ref_chosen and ref_rejected")

    chosen, rejected = policy_chosen.float(), policy_rejected.float()
    if loss_type == "simpo":
        chosen_ratio, rejected_ratio = chosen / chosen_counts, rejected / rejected_counts
    elif loss_type == "sigmoid":
        chosen_ratio, rejected_ratio = chosen - ref_chosen.float(), rejected - ref_rejected.float()
    else:  # sigmoid_norm, ipo: per-token averages, which stop longer responses from winning on length
        chosen_ratio = (chosen - ref_chosen.float()) / chosen_counts
        rejected_ratio = (rejected - ref_rejected.float()) / rejected_counts
    h = chosen_ratio - rejected_ratio

    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).square()
    else:
        # logσ, not log(σ): stays finite (and its gradient too) at any margin
        logits = beta * h - (simpo_gamma if loss_type == "simpo" else 0.0)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward standardised within its group of completions.

    A = (r − mean of its group) / (std of its group + eps), with the unbiased std (torch.std's
    default, as TRL). A group whose rewards are all equal gets advantages 0: it carries no
    preference between its completions.

    Args:
        rewards: (n_groups · group_size,) rewards, the completions of one prompt adjacent.
        group_size: completions per prompt G, at least 2 (an unbiased std needs two).
        eps: keeps the division finite for equal rewards.
    Returns:
        (n_groups · group_size,) fp32 advantages.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 completions per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


@dataclass
class GRPOTokenLoss:
    """Per-token results of `grpo_token_loss`, each of the log-probs' shape."""

    losses: torch.Tensor
    """fp32 loss of each token (differentiable); the caller masks, sums and divides."""
    kl: torch.Tensor | None
    """fp32 k3 estimate of KL(policy ‖ reference), detached; None without ref_logps."""
    clipped: torch.Tensor
    """bool: the clipped term was taken, so the token gets no policy gradient."""


def grpo_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    log_ratio_clamp: float = 20.0,
) -> GRPOTokenLoss:
    """GRPO's per-token loss: the PPO clipped surrogate plus β times the k3 KL to the reference.

        ρ = exp(logp − old_logp)
        loss = −min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A) + β·k3
        k3 = exp(ref − logp) − (ref − logp) − 1  (Schulman 2020, "Approximating KL divergence")

    eps_high > eps_low is DAPO's clip-higher, which lets unlikely tokens grow further.

    Args:
        logps: (...) log-probs of the sampled tokens under the policy being trained.
        old_logps: (...) the same under the policy that sampled them; treated as a constant.
            `logps` itself when each batch is used for one step (ρ = 1).
        ref_logps: (...) the same under the reference model, a constant; None when beta is 0
            (given with beta 0, it still yields the KL for logging).
        advantages: the advantage of each token, a constant, broadcastable to logps' shape
            ((B, 1) for one per completion).
        eps_low, eps_high: the clip range [1 − eps_low, 1 + eps_high] of ρ.
        beta: weight of the KL term; 0 leaves the reference out.
        log_ratio_clamp: ref − logp is clamped to ±this before the exp, so k3 and its gradient
            stay finite where the two models disagree wildly (±20 as verl's low_var_kl); beyond
            it the KL term gives no gradient.
    Returns:
        GRPOTokenLoss of per-token losses, KL (detached) and the clipped mask.
    """
    if beta and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps")
    logps, advantages = logps.float(), advantages.float().detach()
    # old and reference log-probs are constants: detached here, so passing `logps` itself as
    # old_logps (one step per batch) gives ρ = 1 with the gradient of ρ, not of ρ/ρ
    ratio = torch.exp(logps - old_logps.float().detach())
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    losses = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if ref_logps is not None:
        log_ratio = (ref_logps.float().detach() - logps).clamp(-log_ratio_clamp, log_ratio_clamp)
        k3 = torch.exp(log_ratio) - log_ratio - 1
        if beta:
            losses = losses + beta * k3
        kl = k3.detach()
    # where min took the clipped term (ρ beyond the range on the side A pushes it): no gradient
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    return GRPOTokenLoss(losses, kl, clipped)
