"""benchmarks/bench_train.py: both sides get the same optimizer and run transformers as its
Trainer does, and a small run prints the ratios on its last line; with --init-from both sides
start from a Hugging Face folder (a Qwen2 one: Qwen2ForCausalLM) on SFT-masked batches."""

import re

import pytest
import torch

from benchmarks import bench_train
from model.config import ModelConfig
from model.decoder import Decoder
from model.loss import IGNORE_INDEX

SMALL = "--preset tiny --vocab 512 --seq-len 32 --batch 2 --steps 1 --warmup 1".split()


def _sides():
    args = bench_train.parse_args(SMALL)
    cfg = bench_train.model_config(args)
    state = bench_train.initial_state(cfg)
    return args, cfg, bench_train.CrucibleSide(cfg, state, args), bench_train.HFSide(cfg, state, args)


def _decayed(optimizer) -> dict[float, int]:
    """Parameter count under each weight decay."""
    return {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}


def test_both_sides_decay_the_same_parameters():
    _, _, crucible, hf = _sides()
    assert _decayed(hf.optimizer) == _decayed(crucible.engine.optimizer)  # the tied embedding too
    assert hf.optimizer.defaults.get("fused") == crucible.engine.optimizer.defaults.get("fused")


def test_hf_side_keeps_no_kv_cache_in_training_as_trainer():
    # Trainer sets config.use_cache = args.use_cache (False); otherwise every layer copies its
    # keys and values into a DynamicCache in each training forward.
    args, cfg, _, hf = _sides()
    tokens, labels = bench_train.batches(args, cfg, 1)[0]
    assert hf.model(input_ids=tokens, labels=labels, shift_labels=labels).cache is None


def test_smoke_run_prints_the_ratios_last(capsys):
    assert bench_train.main(SMALL) == 0  # its memory subprocesses get these arguments, not pytest's
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_hf=\d+\.\d\d peak_mem_ratio_vs_hf=\d+\.\d\d", last)


def test_no_warmup_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args([*SMALL, "--warmup", "0"])
    assert "--warmup" in capsys.readouterr().err


TINY_QWEN2 = ModelConfig(
    vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, qkv_bias=True,
    arch="qwen2",
)  # fmt: skip


def test_init_from_a_qwen2_folder_compares_with_qwen2forcausallm_on_sft_batches(tmp_path, capsys):
    folder = bench_train.make_hf_folder(TINY_QWEN2, tmp_path / "qwen2")
    argv = ["--init-from", str(folder), "--prompt-frac", "0.5", *SMALL[4:]]  # SMALL without --preset, --vocab
    args = bench_train.parse_args(argv)
    cfg, state = bench_train.source(args)
    assert cfg.arch == "qwen2" and state["layers.0.attn.wqkv.bias"].abs().sum() > 0  # the biases are compared too
    hf = bench_train.HFSide(cfg, state, args)
    assert type(hf.model).__name__ == "Qwen2ForCausalLM"
    tokens, labels = bench_train.batches(args, cfg, 1)[0]
    assert (labels[:, :16] == IGNORE_INDEX).all() and (labels[:, 16:] != IGNORE_INDEX).all()
    assert bench_train.main(argv) == 0  # refuses to go on when the two first losses differ
    out = capsys.readouterr().out.splitlines()
    assert "Qwen2ForCausalLM" in out[0]
    assert re.fullmatch(r"speedup_vs_hf=\d+\.\d\d peak_mem_ratio_vs_hf=\d+\.\d\d", out[-1])


def test_init_from_refuses_a_preset_or_vocab_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--init-from", "somewhere", "--preset", "tiny"])
    assert "--init-from" in capsys.readouterr().err


def test_qwen2_0_5b_has_the_published_shapes():
    assert bench_train.config_to_hf(bench_train.QWEN2_0_5B).items() >= {
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_theta": 1e6,
    }.items()  # fmt: skip
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Decoder(bench_train.QWEN2_0_5B).parameters())
    assert round(n_params / 1e6) == 494
