"""The DPO family and GRPO against their published formulas, written out here in plain Python."""

import math

import pytest
import torch

from training.objectives import group_advantages, grpo_token_loss, preference_loss

BETA = 0.1
POLICY_CHOSEN = [-3.0, -2.5, -4.0, -1.5]
POLICY_REJECTED = [-5.0, -3.5, -6.0, -2.5]
REF_CHOSEN = [-2.8, -2.3, -3.8, -1.4]
REF_REJECTED = [-3.2, -2.7, -4.2, -1.8]
CHOSEN_COUNTS = [3, 5, 2, 4]
REJECTED_COUNTS = [4, 2, 6, 3]
ROWS = list(zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_COUNTS, REJECTED_COUNTS, strict=True))
"""(πc, πr, rc, rr, |c|, |r|) of each pair."""


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def pairs(requires_grad=False, **overrides):
    """The issue's four pairs as tensors, keyword arguments of `preference_loss`."""
    values = {
        "policy_chosen": POLICY_CHOSEN,
        "policy_rejected": POLICY_REJECTED,
        "ref_chosen": REF_CHOSEN,
        "ref_rejected": REF_REJECTED,
        "chosen_counts": CHOSEN_COUNTS,
        "rejected_counts": REJECTED_COUNTS,
    } | overrides
    out = {k: None if v is None else torch.tensor(v) for k, v in values.items()}
    if requires_grad:
        out["policy_chosen"].requires_grad_()
        out["policy_rejected"].requires_grad_()
    return out


def test_dpo_sigmoid_on_the_issues_numbers():
    got = preference_loss(**pairs(), loss_type="sigmoid", beta=BETA)
    want = [0.616344, 0.663597, 0.616344, 0.663597]
    assert got.losses.tolist() == pytest.approx(want, abs=1e-6)
    assert got.losses.mean().item() == pytest.approx(0.639970, abs=1e-6)
    assert got.chosen_rewards.tolist() == pytest.approx([BETA * (pc - rc) for pc, _, rc, _, _, _ in ROWS])
    assert got.rejected_rewards.tolist() == pytest.approx([BETA * (pr - rr) for _, pr, _, rr, _, _ in ROWS])
    assert not got.chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_policy_equal_to_reference_gives_ln2(loss_type):
    same = pairs(ref_chosen=POLICY_CHOSEN, ref_rejected=POLICY_REJECTED)
    got = preference_loss(**same, loss_type=loss_type, beta=BETA)
    assert got.losses.tolist() == pytest.approx([math.log(2)] * 4, abs=1e-7)


def reference_loss(loss_type, pc, pr, rc, rr, nc, nr, beta, ls=0.0, gamma=0.0):
    """One pair's loss from the papers' formulas, on floats."""
    if loss_type == "sigmoid":  # Rafailov et al. 2023, with cDPO's smoothing
        x = beta * ((pc - rc) - (pr - rr))
        return -(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x)
    if loss_type == "sigmoid_norm":  # Tülu 3's dpo_norm: every log-prob a per-token average
        x = beta * ((pc / nc - rc / nc) - (pr / nr - rr / nr))
        return -(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x)
    if loss_type == "ipo":  # Azar et al. 2023, on per-token averages as TRL
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return (h - 1 / (2 * beta)) ** 2
    assert loss_type == "simpo"  # Meng et al. 2024
    x = beta / nc * pc - beta / nr * pr - gamma
    return -(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x)


CASES = [
    ("sigmoid", {"label_smoothing": 0.1}),
    ("sigmoid_norm", {}),
    ("sigmoid_norm", {"label_smoothing": 0.25}),
    ("ipo", {}),
    ("simpo", {"simpo_gamma": 0.5}),
    ("simpo", {"simpo_gamma": 0.3, "label_smoothing": 0.1}),
]


@pytest.mark.parametrize("loss_type, kw", CASES)
def test_losses_and_rewards_equal_the_published_formulas(loss_type, kw):
    beta = 2.0 if loss_type == "simpo" else BETA  # SimPO's β is of order 2
    refs = {"ref_chosen": None, "ref_rejected": None} if loss_type == "simpo" else {}
    got = preference_loss(**pairs(**refs), loss_type=loss_type, beta=beta, **kw)
    ls, gamma = kw.get("label_smoothing", 0.0), kw.get("simpo_gamma", 0.0)
    want = [reference_loss(loss_type, *row, beta, ls, gamma) for row in ROWS]
    assert got.losses.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    # β times the log-ratio each loss uses: per token except for sigmoid, no reference for simpo
    want_chosen = {
        "sigmoid": [beta * (pc - rc) for pc, _, rc, _, _, _ in ROWS],
        "sigmoid_norm": [beta * (pc - rc) / nc for pc, _, rc, _, nc, _ in ROWS],
        "ipo": [beta * (pc - rc) / nc for pc, _, rc, _, nc, _ in ROWS],
        "simpo": [beta * pc / nc for pc, _, _, _, nc, _ in ROWS],
    }[loss_type]
    assert got.chosen_rewards.tolist() == pytest.approx(want_chosen, rel=1e-6)


def hand_gradient(loss_type, pc, pr, rc, rr, nc, nr, beta, ls=0.0, gamma=0.0):
    """d loss / d (policy chosen, policy rejected), derived by hand from the formulas above."""
    if loss_type == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        d = 2 * (h - 1 / (2 * beta))
        return d / nc, -d / nr
    # −(1−ε)·logσ(x) − ε·logσ(−x) has derivative −(1−ε)·σ(−x) + ε·σ(x) in x
    if loss_type == "simpo":
        x, dx_dc, dx_dr = beta * (pc / nc - pr / nr) - gamma, beta / nc, -beta / nr
    elif loss_type == "sigmoid_norm":
        x, dx_dc, dx_dr = beta * ((pc - rc) / nc - (pr - rr) / nr), beta / nc, -beta / nr
    else:
        x, dx_dc, dx_dr = beta * ((pc - rc) - (pr - rr)), beta, -beta
    d = -(1 - ls) * sigmoid(-x) + ls * sigmoid(x)
    return d * dx_dc, d * dx_dr


@pytest.mark.parametrize("loss_type, kw", [("sigmoid", {"label_smoothing": 0.1})] + CASES[1:])
def test_gradients_equal_the_hand_derivatives(loss_type, kw):
    beta = 2.0 if loss_type == "simpo" else BETA
    refs = {"ref_chosen": None, "ref_rejected": None} if loss_type == "simpo" else {}
    inputs = pairs(requires_grad=True, **refs)
    preference_loss(**inputs, loss_type=loss_type, beta=beta, **kw).losses.sum().backward()
    ls, gamma = kw.get("label_smoothing", 0.0), kw.get("simpo_gamma", 0.0)
    want = [hand_gradient(loss_type, *row, beta, ls, gamma) for row in ROWS]
    assert inputs["policy_chosen"].grad.tolist() == pytest.approx([c for c, _ in want], rel=1e-5, abs=1e-8)
    assert inputs["policy_rejected"].grad.tolist() == pytest.approx([r for _, r in want], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "ipo", "simpo"])
def test_extreme_log_probs_give_finite_losses_and_gradients(loss_type):
    refs = {"ref_chosen": None, "ref_rejected": None} if loss_type == "simpo" else {}
    extreme = pairs(
        requires_grad=True,
        policy_chosen=[-1e4, 0.0, -1e4, 0.0],
        policy_rejected=[0.0, -1e4, -1e4, 0.0],
        chosen_counts=[1, 1, 1, 1],
        rejected_counts=[1, 1, 1, 1],
        **refs,
    )
    kw = {} if loss_type == "ipo" else {"label_smoothing": 0.1}
    got = preference_loss(**extreme, loss_type=loss_type, beta=BETA, **kw)
    got.losses.sum().backward()
    assert torch.isfinite(got.losses).all()
    assert torch.isfinite(extreme["policy_chosen"].grad).all()
    assert torch.isfinite(extreme["policy_rejected"].grad).all()
    if loss_type == "sigmoid":  # βh = −1000.04: 0.9 · 1000.04, from logσ, not log(σ) = −inf
        want = reference_loss("sigmoid", -1e4, 0.0, REF_CHOSEN[0], REF_REJECTED[0], 1, 1, BETA, ls=0.1)
        assert got.losses[0].item() == pytest.approx(want, rel=1e-6)


def test_preference_loss_refuses_inconsistent_settings():
    with pytest.raises(ValueError, match="ipo"):
        preference_loss(**pairs(), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="simpo"):
        preference_loss(**pairs(), loss_type="simpo")
    with pytest.raises(ValueError, match="needs ref_chosen"):
        preference_loss(**pairs(ref_chosen=None, ref_rejected=None), loss_type="sigmoid")
    with pytest.raises(ValueError, match="loss_type='kto'"):
        preference_loss(**pairs(), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.7"):
        preference_loss(**pairs(), label_smoothing=0.7)


def test_group_advantages():
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=1e-4)
    assert got.tolist() == pytest.approx([0.8659, -0.8659, -0.8659, 0.8659], abs=1e-4)
    # two groups of 3, the second all equal: standardised within each group only
    rewards = [0.2, 1.0, 0.6, 0.5, 0.5, 0.5]
    got = group_advantages(torch.tensor(rewards), group_size=3, eps=1e-4)
    group = rewards[:3]
    mean = sum(group) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)  # unbiased: n − 1
    assert got[:3].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in group], rel=1e-5)
    assert got[3:].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(4), group_size=1)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), group_size=4)


def reference_grpo(logp, old, ref, adv, eps_low, eps_high, beta):
    """One token's GRPO loss (DeepSeekMath eq. 3 with DAPO's clip range), on floats."""
    rho = math.exp(logp - old)
    surrogate = min(rho * adv, min(max(rho, 1 - eps_low), 1 + eps_high) * adv)
    kl = math.exp(ref - logp) - (ref - logp) - 1
    return -surrogate + beta * kl


def test_grpo_token_loss_equals_the_formula():
    logps = [[-1.0, -0.5, -2.0, -0.1], [-3.0, -0.7, -1.2, -0.05]]
    old = [[-1.1, -0.9, -1.7, -0.1], [-2.5, -0.7, -1.0, -0.3]]
    ref = [[-1.3, -0.4, -2.5, -0.2], [-2.0, -1.0, -1.2, -0.1]]
    advantages = [[0.8], [-1.2]]  # one per completion, broadcast over its tokens
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    got = grpo_token_loss(
        torch.tensor(logps), torch.tensor(old), torch.tensor(ref), torch.tensor(advantages), eps_low, eps_high, beta
    )
    want = [
        [reference_grpo(lp, o, r, a[0], eps_low, eps_high, beta) for lp, o, r in zip(*row, strict=True)]
        for *row, a in zip(logps, old, ref, advantages, strict=True)
    ]
    torch.testing.assert_close(got.losses, torch.tensor(want), rtol=1e-6, atol=1e-6)
    want_kl = [
        [math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(*row, strict=True)] for row in zip(logps, ref, strict=True)
    ]
    torch.testing.assert_close(got.kl, torch.tensor(want_kl), rtol=1e-6, atol=1e-6)
    # ρ = e^0.4 > 1.28 with A > 0, and e^−0.5 < 0.8 with A < 0: clipped; the others not
    assert got.clipped.tolist() == [[False, True, False, False], [True, False, False, False]]


def test_grpo_on_policy_loss_and_gradient_are_minus_the_advantage():
    logps = torch.tensor([[-0.3, -2.0, -1.1], [-0.9, -0.2, -4.0]], requires_grad=True)
    advantages = torch.tensor([[0.7], [-1.5]])
    got = grpo_token_loss(logps, logps, None, advantages, eps_low=0.2, eps_high=0.2, beta=0.0)
    got.losses.sum().backward()
    want = -advantages.expand(2, 3)
    torch.testing.assert_close(got.losses, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(logps.grad, want, rtol=0, atol=1e-7)
    assert got.kl is None and not got.clipped.any()


def test_grpo_gives_no_gradient_where_clipped():
    # log ρ of ±0.5: beyond the clip range 0.8..1.2 on both sides, with both signs of A
    old = torch.zeros(4)
    logps = torch.tensor([0.5, -0.5, -0.5, 0.5], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    got = grpo_token_loss(logps, old, None, advantages, eps_low=0.2, eps_high=0.2, beta=0.0)
    got.losses.sum().backward()
    # A > 0, ρ > 1.2 and A < 0, ρ < 0.8: clipped. A > 0, ρ < 0.8 and A < 0, ρ > 1.2: the
    # unclipped term is the smaller, and its gradient −A·ρ flows
    assert got.clipped.tolist() == [True, True, False, False]
    rho = logps.detach().exp()
    torch.testing.assert_close(logps.grad, torch.tensor([0.0, 0.0, -rho[2].item(), rho[3].item()]))


def test_grpo_kl_is_zero_where_reference_equals_policy_and_finite_far_from_it():
    logps = torch.tensor([-0.5, -1.5, -1.0, -1.0], requires_grad=True)
    ref = torch.tensor([-0.5, -1.5, 99.0, -101.0])  # the last two 100 nats away either side
    got = grpo_token_loss(logps, logps, ref, torch.zeros(4), eps_low=0.2, eps_high=0.2, beta=0.1)
    got.losses.sum().backward()
    assert got.kl[:2].tolist() == [0.0, 0.0] and logps.grad[:2].tolist() == [0.0, 0.0]
    # clamped at ±20: k3 = e^20 − 21 and e^−20 + 19, with no gradient beyond the clamp
    assert got.kl[2:].tolist() == pytest.approx([math.exp(20) - 21, math.exp(-20) + 19], rel=1e-6)
    assert torch.isfinite(got.losses).all() and logps.grad[2:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_token_loss(logps, logps, None, torch.zeros(4), eps_low=0.2, eps_high=0.2, beta=0.1)
