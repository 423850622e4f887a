"""Parity with transformers: load_hf of a random LlamaForCausalLM, and save_hf back into it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.config import preset
from model.decoder import Decoder
from model.hf import config_from_hf, config_to_hf, load_hf, save_hf, state_dict_to_hf

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=128)

CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-untied-theta500k": dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0
    ),
}


def random_hf_llama(case: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**BASE, **CASES[case], rms_norm_eps=1e-6))
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(seed=1, B=2, T=37, V=211):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_load_hf_gives_transformers_logits(case, tmp_path):
    hf = random_hf_llama(case)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf(tmp_path)
    assert cfg.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.rope_theta == CASES[case].get("rope_theta", 10000.0)
    x = tokens()
    with torch.no_grad():
        ref, got = hf(x).logits, model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # fp32


@pytest.mark.parametrize("case", list(CASES))
def test_training_gradients_match_transformers(case, tmp_path):
    """Loss and every weight's gradient equal LlamaForCausalLM's (fp32, 1e-5): the hand-written
    backward passes (RMSNorm, SwiGLU, the chunked loss) are those of the reference model."""
    hf = random_hf_llama(case, seed=4).train()
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    x = tokens(seed=5)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100  # an SFT-like prompt without targets
    hf_loss = hf(input_ids=x, labels=labels, shift_labels=labels).loss
    hf_loss.backward()
    loss_sum, count = model(x, labels=labels)
    (loss_sum / count).backward()
    torch.testing.assert_close(loss_sum / count, hf_loss, rtol=1e-5, atol=1e-6)
    theirs = dict(hf.named_parameters())
    ours = state_dict_to_hf({name: p.grad for name, p in model.named_parameters()}, model.cfg)
    assert set(ours) <= set(theirs)
    for name, grad in ours.items():
        torch.testing.assert_close(
            grad, theirs[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("case", list(CASES))
def test_save_hf_loads_in_transformers_with_same_logits(case, tmp_path):
    hf = random_hf_llama(case, seed=3)
    hf.save_pretrained(tmp_path / "src")
    model, cfg = load_hf(tmp_path / "src")
    save_hf(model, cfg, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    x = tokens(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_crucible_model_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    model = Decoder(cfg)
    model.init_weights()
    save_hf(model, cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back, back_cfg = load_hf(tmp_path)
    assert back_cfg == cfg
    x = tokens(V=300)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(hf(x).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), ours, rtol=0, atol=0)


def test_qwen2_qkv_bias_parity(tmp_path):
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)  # HF inits biases to zero, which would hide a dropped bias
    hf.eval().save_pretrained(tmp_path / "qwen")
    model, cfg = load_hf(tmp_path / "qwen")
    assert cfg.qkv_bias
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    save_hf(model, cfg, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_unsupported_or_unsafe_checkpoints_are_refused(tmp_path):
    hf = random_hf_llama("gqa-tied")
    hf.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}))
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        load_hf(tmp_path)

    config_file.write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_hf(tmp_path)

    config_file.write_text(json.dumps(config))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only pickled weights"):
        load_hf(tmp_path)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")


SMALL = preset("tiny", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_act": "relu2"}, "hidden_act 'relu2'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        # a 4.x rope_scaling beside a plain transformers-5 rope_parameters still counts
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling rope_type 'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters rope_type 'yarn'"),
        ({"head_dim": 32}, "head_dim 32 != hidden_size / num_attention_heads = 16"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
        ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ],
)
def test_config_fields_that_would_change_the_math_are_refused(change, named):
    with pytest.raises(ValueError, match=named):
        config_from_hf({**config_to_hf(SMALL), **change}, source="x/config.json")


@pytest.mark.parametrize(
    "change, named",
    [
        ({"vocab_size": None}, "x/config.json: required field.* vocab_size"),
        ({"intermediate_size": "96"}, "x/config.json: model.ffn_dim='96' must be of type int"),
        ({"num_attention_heads": 0}, "x/config.json: model.n_heads=0 must be at least 1"),
        ({"tie_word_embeddings": "yes"}, "x/config.json: model.tie_embeddings='yes' must be of type bool"),
    ],
)
def test_a_missing_or_bad_config_value_is_one_error_naming_file_and_field(change, named):
    hf = {**config_to_hf(SMALL), **change}
    with pytest.raises(ValueError, match=named):
        config_from_hf({k: v for k, v in hf.items() if v is not None}, source="x/config.json")


def test_null_optional_fields_and_swish_take_the_transformers_meaning():
    hf = config_to_hf(SMALL)
    nulls = dict(rope_theta=None, rope_parameters=None, rms_norm_eps=None, tie_word_embeddings=None)
    cfg = config_from_hf({**hf, **nulls, "hidden_act": "swish"})  # ACT2FN["swish"] is SiLU
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (10000.0, 1e-6, False)
    absent = {k: v for k, v in hf.items() if k != "max_position_embeddings"}
    assert config_from_hf(absent).max_seq_len == 2048  # LlamaConfig's default
    assert config_from_hf({**absent, "model_type": "qwen2"}).max_seq_len == 32768  # Qwen2Config's


def test_config_fields_that_keep_the_math_are_accepted():
    hf = config_to_hf(SMALL)
    assert config_from_hf(hf) == SMALL
    for key in ("hidden_act", "head_dim", "rope_parameters"):  # absent: silu, hidden / heads, plain RoPE
        assert config_from_hf({k: v for k, v in hf.items() if k != key}).dim == SMALL.dim
    assert config_from_hf({**hf, "head_dim": None}) == SMALL
    qwen = {**hf, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 1}
    assert config_from_hf(qwen).qkv_bias


@pytest.mark.parametrize("field", ["intermediate_size", "vocab_size"])
def test_weights_that_do_not_fit_the_config_are_one_error_naming_the_folder(field, tmp_path):
    model = Decoder(SMALL)
    save_hf(model, SMALL, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] *= 2  # an edited config.json beside the old weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{tmp_path}: the weights do not fit config.json"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    "index, named",
    [
        ("{", "not an index"),
        ('{"metadata": {}}', "not an index"),
        ('{"weight_map": {"a": "../x.safetensors"}}', "outside"),
    ],
)
def test_a_bad_weight_index_is_one_error_naming_it_in_the_check_and_the_load(index, named, tmp_path):
    from model.hf import check_hf

    save_hf(Decoder(SMALL), SMALL, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    for read in (check_hf, load_hf):
        with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json: .*{named}"):
            read(tmp_path)
