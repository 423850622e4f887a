"""AdamW parameter groups and the learning-rate schedules, against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from model.config import preset
from model.decoder import Decoder
from training.optim import SCHEDULES, build_optimizer, lr_at, no_decay_names, param_groups, set_lr

N_LAYERS = preset("tiny").n_layers


def tiny(**overrides) -> Decoder:
    model = Decoder(preset("tiny", **overrides))
    model.init_weights()
    return model


def names_in(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def layer_names(*suffixes: str) -> set[str]:
    return {f"layers.{i}.{s}" for i in range(N_LAYERS) for s in suffixes}


NORMS = layer_names("attn_norm.weight", "ffn_norm.weight") | {"norm.weight"}
MATRICES = layer_names("attn.wqkv.weight", "attn.wo.weight", "ffn.w13.weight", "ffn.w2.weight")


@pytest.mark.parametrize(
    "overrides, decayed, not_decayed",
    [
        ({"tie_embeddings": True}, MATRICES, NORMS | {"tok_embeddings.weight"}),
        ({"tie_embeddings": False}, MATRICES | {"output.weight"}, NORMS | {"tok_embeddings.weight"}),
        (
            {"tie_embeddings": False, "qkv_bias": True},
            MATRICES | {"output.weight"},
            NORMS | {"tok_embeddings.weight"} | layer_names("attn.wqkv.bias"),
        ),
    ],
)
def test_param_groups_exact_names(overrides, decayed, not_decayed):
    model = tiny(**overrides)
    groups = param_groups(model, weight_decay=0.1)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert names_in(model, groups[0]) == decayed
    assert names_in(model, groups[1]) == not_decayed
    assert no_decay_names(model) == not_decayed
    # Every parameter in exactly one group.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))


def test_param_groups_skip_frozen_and_see_through_wrapper_prefixes():
    model = tiny()
    model.tok_embeddings.weight.requires_grad_(False)
    wrapper = nn.Module()
    wrapper._orig_mod = model  # torch.compile's prefix
    groups = param_groups(wrapper, weight_decay=0.1)
    assert names_in(wrapper, groups[1]) == {"_orig_mod." + n for n in NORMS}
    assert "_orig_mod.tok_embeddings.weight" not in no_decay_names(wrapper)


def test_param_groups_omit_empty_group():
    groups = param_groups(nn.Linear(4, 4, bias=False), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


def test_adamw_decays_matrices_but_not_norms_or_embeddings():
    model = tiny(tie_embeddings=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    assert opt.defaults["fused"]  # every parameter on CPU: torch's fused CPU kernel
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # Zero gradients leave only the decoupled decay: p ← p·(1 − lr·wd).
    params = dict(model.named_parameters())
    for name in ["norm.weight", "layers.0.attn_norm.weight", "tok_embeddings.weight"]:
        torch.testing.assert_close(params[name], before[name], rtol=0, atol=0)
    for name in ["layers.0.attn.wqkv.weight", "output.weight"]:
        torch.testing.assert_close(params[name], before[name] * 0.95)


def test_fused_step_equals_the_foreach_step():
    """The fused CPU kernel build_optimizer picks takes the same step as torch's default path."""
    fused_model, plain_model = tiny(), tiny()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(param_groups(plain_model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for step in range(3):
        for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step + a.numel()))
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_set_lr_sets_every_group():
    opt = build_optimizer(tiny(), lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


COSINE_AT_35 = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))  # a quarter of the way through


@pytest.mark.parametrize(
    "schedule, max_steps, expected",
    [
        # warmup start, mid-warmup, end of warmup, middle, end, beyond the end
        ("cosine", 110, {1: 0.1, 5: 0.5, 10: 1.0, 35: COSINE_AT_35, 60: 0.55, 110: 0.1, 500: 0.1}),
        ("wsd", 100, {1: 0.1, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 95: 0.325, 100: 0.1, 500: 0.1}),
        ("constant", 100, {1: 0.1, 5: 0.5, 10: 1.0, 50: 1.0, 100: 1.0, 500: 1.0}),
    ],
)
def test_lr_at_hand_values(schedule, max_steps, expected):
    got = {s: lr_at(s, lr=1.0, max_steps=max_steps, warmup_steps=10, schedule=schedule) for s in expected}
    assert got == pytest.approx(expected)


def test_lr_without_warmup_starts_at_peak():
    for schedule in SCHEDULES:
        assert lr_at(1, lr=3e-4, max_steps=1000, warmup_steps=0, schedule=schedule) == pytest.approx(3e-4, rel=1e-5)


def test_cosine_decreases_after_warmup():
    lrs = [lr_at(s, lr=1.0, max_steps=200, warmup_steps=20, schedule="cosine") for s in range(20, 260)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.1)


def test_wsd_is_stable_then_linear():
    kw = dict(lr=1.0, max_steps=1000, warmup_steps=50, schedule="wsd", decay_frac=0.1, min_lr_ratio=0.0)
    assert all(lr_at(s, **kw) == 1.0 for s in range(50, 901))
    decay = [lr_at(s, **kw) for s in range(900, 1001)]
    steps = [b - a for a, b in zip(decay, decay[1:], strict=False)]
    assert steps == pytest.approx([-0.01] * 100)  # equal steps: a straight line down to 0


def test_unknown_schedule_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'linear'.*cosine, wsd, constant"):
        lr_at(100, lr=1.0, max_steps=100, warmup_steps=10, schedule="linear")
