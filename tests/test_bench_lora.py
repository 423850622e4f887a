"""benchmarks/bench_lora.py: both sides start from the same base and adapters, train only the
adapters with the same optimizer and take the same steps (losses equal to 1e-5, on a preset with
every target and on a Qwen2 folder with a subset on SFT batches); bf16 keeps both bases in bf16
and the adapters in fp32; a small run prints the first-step difference and the ratios last."""

import re

import pytest
import torch
from peft import get_peft_model_state_dict

from benchmarks import bench_lora, bench_train
from model.config import ModelConfig
from model.lora import adapter_state_dict

SMALL = "--preset tiny --vocab 512 --seq-len 32 --batch 2 --steps 1 --warmup 1 --rank 4 --alpha 8".split()
TINY_QWEN2 = ModelConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, qkv_bias=True,
    arch="qwen2",
)  # fmt: skip


def _sides(argv):
    args = bench_lora.parse_args(argv)
    cfg, state = bench_train.source(args)
    sides = {name: bench_lora.build(name, cfg, state, args) for name in bench_train.SIDES}
    return args, cfg, sides["crucible"], sides["hf"]


def _trainable(model) -> dict[tuple[str, torch.dtype], int]:
    """Parameter count by ("trained" or "frozen", dtype)."""
    out = {}
    for p in model.parameters():
        key = ("trained" if p.requires_grad else "frozen", p.dtype)
        out[key] = out.get(key, 0) + p.numel()
    return out


def _assert_same_steps(argv, n_steps=2, tolerance=1e-5):
    args, cfg, crucible, hf = _sides(argv)
    groups = [[(g["weight_decay"], sum(p.numel() for p in g["params"])) for g in o.param_groups] for o in (
        crucible.engine.optimizer, hf.optimizer)]  # fmt: skip
    assert groups[0] == groups[1]  # the same adapter tensors, the same decay
    assert crucible.engine.optimizer.defaults == hf.optimizer.defaults  # lr, betas, eps, fused
    ours, theirs = adapter_state_dict(crucible.engine.model), get_peft_model_state_dict(hf.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(t.abs().max() > 0 for t in ours.values())  # B too: the first step moves every adapter
    for tokens, labels in bench_train.batches(args, cfg, n_steps):
        mine, peft_loss = float(crucible.step(tokens, labels)), float(hf.step(tokens, labels))
        assert abs(mine - peft_loss) <= tolerance * abs(peft_loss), (mine, peft_loss)
    return crucible, hf


def test_both_sides_take_the_same_steps_on_every_target():
    crucible, hf = _assert_same_steps(SMALL)
    n_adapters = sum(p.numel() for p in hf.model.parameters() if p.requires_grad)
    assert _trainable(crucible.engine.model)[("trained", torch.float32)] == n_adapters


def test_a_qwen2_folder_with_a_subset_of_targets_on_sft_batches(tmp_path):
    folder = bench_train.make_hf_folder(TINY_QWEN2, tmp_path / "qwen2")
    argv = ["--init-from", str(folder), "--targets", "q_proj,v_proj,down_proj", "--prompt-frac", "0.5", *SMALL[4:]]
    crucible, hf = _assert_same_steps(argv)
    assert type(hf.model.get_base_model()).__name__ == "Qwen2ForCausalLM"
    assert {k.split(".")[-3] for k in adapter_state_dict(crucible.engine.model)} == {"q_proj", "v_proj", "down_proj"}


def test_bf16_holds_both_bases_in_bf16_and_the_adapters_in_fp32():
    crucible, hf = _assert_same_steps([*SMALL, "--precision", "bf16"], n_steps=1, tolerance=2e-3)
    for model in (crucible.engine.model, hf.model):
        assert {dtype for kind, dtype in _trainable(model) if kind == "trained"} == {torch.float32}
        assert {dtype for kind, dtype in _trainable(model) if kind == "frozen"} == {torch.bfloat16}


def test_smoke_run_prints_the_loss_difference_and_the_ratios_last(capsys):
    assert bench_lora.main(SMALL) == 0  # its memory subprocesses run bench_lora.py with these arguments
    out = capsys.readouterr().out.splitlines()
    assert "LoRA r=4 alpha=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in out[0]
    difference = re.fullmatch(r"first-step loss: crucible \S+, hf \S+ \(difference (\S+)\)", out[1])
    assert difference and float(difference[1]) <= 1e-5
    assert re.fullmatch(r"speedup_vs_hf=\d+\.\d\d peak_mem_ratio_vs_hf=\d+\.\d\d", out[-1])


def test_unknown_target_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_lora.parse_args([*SMALL, "--targets", "q_proj,lm_head"])
    err = capsys.readouterr().err
    assert "--targets" in err and "lm_head" in err
