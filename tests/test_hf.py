"""Parity with transformers: load_hf of random Llama (3.x), Mistral, Qwen2 and Qwen3 models, save_hf back into
them, greedy generation, sharded and bf16 checkpoints, and the configs that are refused."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

from model.config import ModelConfig, preset
from model.decoder import Decoder
from model.generate import generate
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
    assert_same_loss_and_gradients(random_hf_llama(case, seed=4), tmp_path)


def assert_same_loss_and_gradients(hf, tmp_path, T=37) -> None:
    hf.train().save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    x = tokens(seed=5, T=T)
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

    config_file.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
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
    assert config_from_hf({**hf, "head_dim": 32}).head_dim == 32  # decoupled, as Qwen3 and Mistral have it
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


# --- the families people fine-tune: Llama 3.x, Mistral, Qwen2, Qwen3 -------------------------

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=128)
# original_max_position_embeddings 64 with theta 5e5 and head_dim 16 puts the frequencies in all
# three of Llama 3.1's bands (kept, interpolated, divided by factor).
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)  # fmt: skip
QWEN_NO_WINDOW = dict(use_sliding_window=False, sliding_window=16, max_window_layers=1)
FAMILIES = {
    "llama3-scaled-tied": (
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    ),
    "mistral-no-window": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    # a window longer than every sequence here, and a decoupled head_dim as Mistral configs carry
    "mistral-window-head-dim": (
        MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=64),
    ),
    # Qwen2.5 configs carry a window number and max_window_layers beside use_sliding_window false
    "qwen2-bias-tied": (
        Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **QWEN_NO_WINDOW),
    ),
    "qwen3-qk-norm-head-dim-untied": (
        Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, **QWEN_NO_WINDOW),
    ),
}
"""Each family as transformers builds it (its config class, tiny shapes)."""

OURS = {
    "llama3-scaled-tied": dict(
        arch="llama", n_kv_heads=2, tie_embeddings=True, rope_type="llama3", rope_theta=500000.0, rope_factor=8.0,
        rope_original_max_len=64,
    ),
    "mistral-no-window": dict(arch="mistral", n_kv_heads=2, tie_embeddings=False),
    "mistral-window-head-dim": dict(arch="mistral", n_kv_heads=1, head_dim=32, sliding_window=64, tie_embeddings=False),
    "qwen2-bias-tied": dict(arch="qwen2", n_kv_heads=2, qkv_bias=True, tie_embeddings=True),
    "qwen3-qk-norm-head-dim-untied": dict(arch="qwen3", n_kv_heads=2, qk_norm=True, head_dim=32, tie_embeddings=False),
}  # fmt: skip
"""The same families as Crucible ModelConfigs."""

T_LONG = 45
"""Sequence length of the family tests: past the llama3 original context, within Mistral's window."""


def perturbed_(named_parameters) -> None:
    """Norm weights away from 1 and biases away from 0, so a swapped or dropped one shows."""
    with torch.no_grad():
        for name, p in named_parameters:
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)


def random_hf_family(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config_class, fields = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(config_class(**TINY, **fields, rms_norm_eps=1e-6))
    perturbed_(model.named_parameters())
    return model.eval()


def random_crucible_family(family: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=211, dim=64, n_layers=2, n_heads=4, ffn_dim=112, max_seq_len=128, norm_eps=1e-6,
                      **OURS[family])  # fmt: skip
    model = Decoder(cfg)
    model.init_weights()
    perturbed_(model.named_parameters())
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_hf_of_each_family_gives_transformers_logits(family, tmp_path):
    hf = random_hf_family(family)
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf(tmp_path)
    assert cfg == replace(random_crucible_family(family).cfg, init_std=cfg.init_std)
    x = tokens(T=T_LONG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)  # fp32


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_of_each_family_loads_in_transformers_with_same_logits(family, tmp_path):
    model = random_crucible_family(family, seed=1)
    save_hf(model, model.cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == type(random_hf_family(family)).__name__
    x = tokens(seed=3, T=T_LONG)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)
    back, back_cfg = load_hf(tmp_path)
    assert back_cfg == model.cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_gradients_of_each_family_match_transformers(family, tmp_path):
    """The q/k norm's backward (RMSNorm over head_dim) and scaled RoPE included."""
    assert_same_loss_and_gradients(random_hf_family(family, seed=5), tmp_path, T=T_LONG)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_of_each_family_matches_transformers(family, tmp_path):
    hf = random_hf_family(family, seed=2)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf(tmp_path)
    prompt = tokens(seed=4, B=1, T=9)
    with torch.no_grad():
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=T_LONG - 9,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 9:].tolist()
    assert list(generate(model, prompt[0].tolist(), max_new_tokens=T_LONG - 9)) == ref


def test_llama3_frequencies_are_those_of_transformers():
    """Bit for bit, over settings that put the frequencies in each of the three bands."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model.decoder import rope_frequencies

    for theta, original, factor, head_dim in [(5e5, 64, 8.0, 16), (5e5, 8192, 32.0, 64), (1e4, 16, 4, 128)]:
        rope = {**LLAMA3_ROPE, "rope_theta": theta, "original_max_position_embeddings": original, "factor": factor}
        hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope)
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        cfg = config_from_hf(hf_config.to_dict())
        assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_len) == ("llama3", factor, original)
        got = rope_frequencies(cfg)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert not torch.equal(got, rope_frequencies(replace(cfg, rope_type="default")))


def test_transformers_4_rope_scaling_reads_as_transformers_5_rope_parameters():
    v5 = config_to_hf(replace(SMALL, rope_type="llama3", rope_theta=5e5, rope_factor=32.0, rope_original_max_len=64))
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}  # rope_scaling beside a top-level rope_theta
    assert "rope_theta" not in v4["rope_scaling"]
    assert config_from_hf(v4) == config_from_hf(v5) == config_from_hf({**v5, "rope_scaling": None})
    llama31 = {k: v for k, v in v4.items() if k != "rope_theta"}  # Llama 3.1's own file has both; no theta: 1e4
    assert config_from_hf({**llama31, "rope_theta": 5e5}).rope_factor == 32.0
    # original_max_position_embeddings left out: transformers takes max_position_embeddings
    scaling = {k: v for k, v in v4["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert config_from_hf({**v4, "rope_scaling": scaling}).rope_original_max_len == SMALL.max_seq_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama3-scaled-tied", "qwen3-qk-norm-head-dim-untied"])
def test_sharded_and_bf16_checkpoints_load_and_pass_the_check(family, dtype, tmp_path):
    from model.hf import check_hf

    hf = random_hf_family(family).to(dtype)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = check_hf(tmp_path)
    model, loaded_cfg = load_hf(tmp_path)
    assert cfg == loaded_cfg
    assert {p.dtype for p in model.parameters()} == {dtype}  # the stored dtype is kept
    as_fp32, _ = load_hf(tmp_path, dtype=torch.float32)
    # transformers' own fp32 load as the reference: hf.float() would keep its RoPE frequency
    # buffer rounded to bf16 by hf.to(bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens(T=T_LONG)
    with torch.no_grad():
        torch.testing.assert_close(as_fp32(x), ref(x).logits, rtol=1e-5, atol=1e-5)


def test_a_single_file_bf16_checkpoint_loads_and_passes_the_check(tmp_path):
    from model.hf import check_hf

    hf = random_hf_family("mistral-window-head-dim").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert check_hf(tmp_path).sliding_window == 64
    model, _ = load_hf(tmp_path)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_mistral_refuses_to_attend_past_its_sliding_window(tmp_path):
    hf = random_hf_family("mistral-window-head-dim")
    hf.config.sliding_window = 8
    hf.save_pretrained(tmp_path)
    model, cfg = load_hf(tmp_path)
    assert (cfg.sliding_window, cfg.context_len) == (8, 8)
    with torch.no_grad():
        model(tokens(T=8))  # full attention is the window's attention up to 8 positions
        with pytest.raises(ValueError, match="model.sliding_window=8: asked to attend over 9 positions"):
            model(tokens(T=9))
        cache = model.new_cache(1, 16)
        model(tokens(B=1, T=6), cache=cache)
        with pytest.raises(ValueError, match="sliding_window"):
            model(tokens(B=1, T=3), cache=cache)
    with pytest.raises(ValueError, match="sliding_window"):
        list(generate(model, [1, 2, 3], max_new_tokens=10))


QWEN2 = config_to_hf(replace(SMALL, arch="qwen2", qkv_bias=True))
QWEN3 = config_to_hf(replace(SMALL, arch="qwen3", qk_norm=True))


@pytest.mark.parametrize(
    "hf, named",
    [
        ({"auto_map": {"AutoConfig": "x.XConfig"}}, "auto_map .* needs trust_remote_code; Crucible runs only llama"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures entry 'LlamaForSequenceClassification'"),
        ({"model_type": "gemma"}, "model_type 'gemma'"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling rope_type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters rope_type 'longrope'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_parameters rope_type 'llama3' lacks"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_theta 10000.0 disagrees"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({**QWEN3, "attention_bias": True}, "Qwen3 attention_bias"),
        ({**QWEN2, "use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({**QWEN3, "layer_types": ["full_attention", "sliding_attention"]}, r"layer_types \['sliding_attention'\]"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 0}, "sliding_window"),
    ],
)
def test_each_unsupported_field_is_one_line_naming_file_and_field(hf, named):
    with pytest.raises(ValueError, match=f"x/config.json: .*{named}") as error:
        config_from_hf({**config_to_hf(SMALL), **hf}, source="x/config.json")
    assert "\n" not in str(error.value)


def test_a_remote_code_checkpoint_is_refused_by_the_check_and_the_load(tmp_path):
    from model.hf import check_hf

    random_hf_family("qwen2-bias-tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    for read in (check_hf, load_hf):
        with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: auto_map \(AutoModelForCausalLM\)"):
            read(tmp_path)


def test_fields_left_out_take_each_config_class_default():
    mistral = {k: v for k, v in config_to_hf(replace(SMALL, arch="mistral")).items() if k != "sliding_window"}
    assert config_from_hf(mistral).sliding_window == 4096  # MistralConfig's default window
    assert config_from_hf({**mistral, "sliding_window": None}).sliding_window == 0
    qwen3 = {k: v for k, v in QWEN3.items() if k not in ("head_dim", "num_key_value_heads")}
    cfg = config_from_hf({**qwen3, "num_attention_heads": 32})
    assert (cfg.head_dim, cfg.n_kv_heads) == (128, 32)  # Qwen3Config's defaults
    nulls = config_from_hf({**qwen3, "head_dim": None, "num_key_value_heads": None})
    assert (nulls.head_dim, nulls.n_kv_heads) == (SMALL.dim // SMALL.n_heads, SMALL.n_heads)


@pytest.mark.parametrize(
    "cfg, named",
    [
        (dict(arch="qwen3"), "model.qk_norm=False with model.arch='qwen3'"),
        (dict(qk_norm=True), "model.qk_norm=True with model.arch='llama'"),
        (dict(arch="qwen2"), "model.qkv_bias=False with model.arch='qwen2'"),
        (dict(arch="mistral", qkv_bias=True), "model.qkv_bias=True with model.arch='mistral'"),
        (dict(sliding_window=64), "model.sliding_window=64 with model.arch='llama'"),
    ],
)
def test_a_config_its_arch_cannot_express_is_refused(cfg, named):
    with pytest.raises(ValueError, match=named):
        replace(SMALL, **cfg)


def test_a_llama_with_qkv_bias_is_exported_as_qwen2(tmp_path):
    model = Decoder(replace(SMALL, qkv_bias=True))
    model.init_weights()
    perturbed_(model.named_parameters())
    save_hf(model.eval(), model.cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    x = tokens(V=300)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)


PUBLISHED = {
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False, hidden_size=4096,
        intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=False,
        vocab_size=128256, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192, rope_type="llama3"),
    ),
    "Mistral-7B-v0.1": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, vocab_size=32000,
    ),
    "Qwen2.5-0.5B": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
        max_position_embeddings=32768, max_window_layers=24, num_attention_heads=14, num_hidden_layers=24,
        num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=32768,
        tie_word_embeddings=True, use_mrope=False, use_sliding_window=False, vocab_size=151936,
    ),
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=128, hidden_size=1024,
        intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28, num_attention_heads=16,
        num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000,
        sliding_window=None, tie_word_embeddings=True, use_sliding_window=False, vocab_size=151936,
    ),
}  # fmt: skip
"""The model-shaping fields of published config.json files (transformers 4.x spellings)."""


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_give_transformers_tensor_shapes(name):
    """On the meta device: every tensor transformers builds for the config, name and shape."""
    from transformers import AutoConfig

    published = PUBLISHED[name]
    cfg = config_from_hf(published)
    with torch.device("meta"):
        ours = state_dict_to_hf(Decoder(cfg).state_dict(), cfg)
        config = AutoConfig.for_model(**published)
        theirs = AutoModelForCausalLM.from_config(config).state_dict()
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert cfg.context_len == (4096 if name == "Mistral-7B-v0.1" else published["max_position_embeddings"])
