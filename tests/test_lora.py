"""model/lora.py against transformers + peft on the same random Llama and Qwen2 (GQA, q/k/v bias)
bases and the same adapters: loss and adapter gradients, the adapter folder both ways, the merged
export, a training step that leaves the base untouched, a subset of targets, and bad configs."""

import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.config import preset
from model.decoder import Decoder
from model.hf import load_hf, save_hf
from model.lora import (
    TARGETS,
    LoRAConfig,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    named_adapters,
    save_adapter,
)

SHAPE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, rms_norm_eps=1e-6)
BASES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, num_attention_heads=4, num_key_value_heads=4)),
    "qwen2-gqa": lambda: Qwen2ForCausalLM(
        Qwen2Config(**SHAPE, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    ),
}
SUBSET = ("q_proj", "v_proj", "down_proj")


def tokens(seed=1, B=2, T=29, V=211):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def setup(base: str, tmp_path, targets=TARGETS):
    """A random HF base saved to tmp_path/base, Crucible's LoRA model of it with random non-zero
    adapters, and peft's model of the same base holding the same adapters."""
    torch.manual_seed(0)
    hf = BASES[base]()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
    hf.save_pretrained(tmp_path / "base")
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets)
    model, _ = load_hf(tmp_path / "base")
    apply_lora(model, cfg)
    with torch.no_grad():  # B non-zero: with peft's zero init every adapter would be a no-op
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    peft_model = get_peft_model(hf, peft_config(targets))
    set_peft_model_state_dict(peft_model, adapter_state_dict(model))
    return model, cfg, peft_model


def peft_config(targets=TARGETS) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")


def assert_same_logits(model, hf) -> None:
    x = tokens(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def assert_same_loss_and_adapter_grads(model, peft_model) -> None:
    x = tokens(seed=5)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # an SFT-like prompt without targets
    ref = peft_model(input_ids=x, labels=labels, shift_labels=labels).loss
    ref.backward()
    loss_sum, count = model(x, labels=labels)
    (loss_sum / count).backward()
    torch.testing.assert_close(loss_sum / count, ref, rtol=1e-5, atol=1e-6)
    theirs = dict(peft_model.named_parameters())
    ours = dict(named_adapters(model))
    assert len(ours) == sum(".lora_" in n for n in theirs)
    for key, p in ours.items():
        ref_grad = theirs[key.replace(".weight", ".default.weight")].grad
        assert ref_grad.abs().max() > 0, key  # a gradient that means something
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("base", list(BASES))
def test_loss_and_adapter_gradients_match_peft(base, tmp_path):
    model, _, peft_model = setup(base, tmp_path)
    assert_same_loss_and_adapter_grads(model.train(), peft_model.train())


@pytest.mark.parametrize("base", list(BASES))
def test_adapter_round_trips_through_peft(base, tmp_path):
    model, cfg, peft_model = setup(base, tmp_path)
    save_adapter(model, cfg, tmp_path / "ours", base_model_path=tmp_path / "base")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert_same_logits(model.eval(), PeftModel.from_pretrained(fresh, tmp_path / "ours").eval())

    peft_model.save_pretrained(tmp_path / "theirs")  # the other way: peft's folder into Crucible
    back, _ = load_hf(tmp_path / "base")
    apply_lora(back, cfg)
    load_adapter(back, tmp_path / "theirs")
    x = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x), rtol=0, atol=0)


def test_load_adapter_refuses_another_rank_or_targets(tmp_path):
    model, cfg, _ = setup("llama", tmp_path)
    save_adapter(model, cfg, tmp_path / "r4")
    for other in (LoRAConfig(rank=8, alpha=8.0), LoRAConfig(rank=4, alpha=8.0, targets=SUBSET)):
        back, _ = load_hf(tmp_path / "base")
        with pytest.raises(ValueError, match=r"adapter_config\.json: (r|target_modules)="):
            load_adapter(apply_lora(back, other), tmp_path / "r4")


def test_load_adapter_refuses_missing_or_misshapen_tensors(tmp_path):
    model, cfg, _ = setup("llama", tmp_path)
    folder = save_adapter(model, cfg, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    shorter = tensors | {key: tensors[key][:, :-1].contiguous()}
    without = {k: v for k, v in tensors.items() if k != key}
    (folder / "cut.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes()[:100])
    (folder / "cut.safetensors").replace(folder / "adapter_model.safetensors")  # a damaged file: named
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(model, folder)
    for broken, error in ((shorter, "has shape"), (without, "missing")):
        save_file(broken, folder / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: (tensor )?'{re.escape(key)}' {error}"):
            load_adapter(model, folder)


@pytest.mark.parametrize("base", list(BASES))
def test_merged_export_equals_base_plus_adapter(base, tmp_path):
    model, _, peft_model = setup(base, tmp_path)
    save_hf(model, model.cfg, tmp_path / "merged", state_dict=merge_lora(model))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_same_logits(model.eval(), merged)
    assert_same_logits(model, peft_model.merge_and_unload().eval())


def test_training_step_moves_only_the_adapters(tmp_path):
    model, _, _ = setup("qwen2-gqa", tmp_path)
    trainable = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}
    adapters_before = [p.detach().clone() for p in lora_parameters(model)]
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    x = tokens(seed=7)
    loss_sum, count = model.train()(x, labels=torch.roll(x, -1, dims=1))
    (loss_sum / count).backward()
    opt.step()
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name
            assert torch.equal(p, frozen_before[name]), name
    assert all(not torch.equal(p, q) for p, q in zip(lora_parameters(model), adapters_before, strict=True))


def test_subset_of_targets_matches_peft(tmp_path):
    model, _, peft_model = setup("qwen2-gqa", tmp_path, targets=SUBSET)
    assert {k.split(".")[-3] for k in adapter_state_dict(model)} == set(SUBSET)
    assert_same_loss_and_adapter_grads(model.train(), peft_model.train())
    save_hf(model, model.cfg, tmp_path / "merged", state_dict=merge_lora(model))
    assert_same_logits(model.eval(), AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval())


def test_fresh_adapters_leave_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    BASES["llama"]().save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    x = tokens()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B starts at zero
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=()), "targets"),
        (dict(targets=("q_proj", "lm_head")), "targets"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^train\.lora\.{field}="):
        LoRAConfig(**kwargs)


# --- the base alone, as a reference (DPO, GRPO's KL) ----------------------------------------


def decoder_with_adapters() -> tuple[Decoder, torch.Tensor]:
    """A small random Decoder with non-zero adapters on every target, and its logits before
    apply_lora (the base's) on `tokens()`."""
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=211, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96))
    model.init_weights()
    with torch.no_grad():
        base = model(tokens())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # B non-zero: with peft's zero init the adapters would be a no-op anyway
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    return model.eval(), base


def test_adapters_disabled_gives_the_base_and_restores_the_adapters():
    model, base = decoder_with_adapters()
    x = tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base, atol=1e-3)
        with adapters_disabled(model):
            assert torch.equal(model(x), base)
            with adapters_disabled(model):  # nested: the inner exit leaves them off
                assert torch.equal(model(x), base)
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)
        with pytest.raises(RuntimeError, match="inside"), adapters_disabled(model):
            raise RuntimeError("inside")
        assert torch.equal(model(x), adapted)
    # Nothing but a flag moved: the same tensors, still the only trainable ones, still training.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}
    with pytest.raises(ValueError, match="no LoRA adapters"):
        adapters_disabled(Decoder(model.cfg)).__enter__()


def test_adapters_disabled_under_fsdp2(tmp_path):
    """fully_shard (as training.engine.parallelize applies it: every block, then the root) keeps
    the LoRALinear objects, so the switch reaches them in a sharded model (one gloo rank)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    model, base = decoder_with_adapters()
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        with torch.no_grad():
            with adapters_disabled(model):
                torch.testing.assert_close(model(x), base, rtol=0, atol=0)
            torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
