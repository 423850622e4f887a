"""The decoder on its own: packed documents, causality, meta-device construction, presets."""

import pytest
import torch

from model.config import ModelConfig, preset, preset_names
from model.decoder import Decoder, document_causal_mask, positions_from_doc_ids
from tests.conftest import ROOT, requires_cuda

SMALL = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)


def small_model(seed=0, **kw) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(preset("tiny", **{**SMALL, **kw}))
    model.init_weights()
    return model.eval()


def test_packed_documents_match_each_document_alone():
    model = small_model()
    lengths = [5, 11, 1, 7]
    docs = [torch.randint(0, 101, (n,)) for n in lengths]
    tokens = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    # fp32, the same arithmetic on fewer keys: 1e-5.
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # A document is a run of equal ids: ids reused further on (0/1 alternating) are new documents.
    with torch.no_grad():
        alternating = model(tokens, doc_ids=doc_ids % 2)[0]
    torch.testing.assert_close(alternating, alone, rtol=1e-5, atol=1e-5)
    # Without doc_ids the later documents see the earlier ones, so the logits differ.
    with torch.no_grad():
        unmasked = model(tokens)[0]
    assert (unmasked[5:] - alone[5:]).abs().max() > 1e-3


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3, 3, 3]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]]
    mask = document_causal_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True] + [False] * 5
    assert mask.diagonal().all()


def test_output_is_causal():
    model = small_model()
    tokens = torch.randint(0, 101, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 101
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_hidden_and_labels_paths_agree_with_logits():
    from model.loss import causal_lm_loss

    model = small_model()
    tokens, labels = torch.randint(0, 101, (3, 10)), torch.randint(0, 101, (3, 10))
    labels[1, :4] = -100
    with torch.no_grad():
        logits = model(tokens)
        hidden = model.hidden_states(tokens)
        loss_sum, n = model(tokens, labels=labels)
    assert hidden.shape == (3, 10, 64) and logits.shape == (3, 10, 101)
    torch.testing.assert_close(hidden @ model.output_weight.t(), logits, rtol=1e-6, atol=1e-6)
    ref_sum, ref_n = causal_lm_loss(logits, labels)
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-6, atol=1e-6)
    assert n == ref_n


def test_8b_builds_on_meta_without_allocating():
    with torch.device("meta"):
        model = Decoder(preset("8b"))
    assert all(p.is_meta for p in model.parameters())
    # Llama-3-8B's published parameter count.
    assert model.num_params() == 8_030_261_248
    # 6N + 12·L·d·T with N excluding the 128256×4096 input embedding.
    n = 8_030_261_248 - 128256 * 4096
    assert model.num_flops_per_token(8192) == 6 * n + 12 * 32 * 4096 * 8192


@pytest.mark.parametrize("name,count", [("1b", 1_235_814_400), ("3b", 3_212_749_824)])
def test_presets_have_the_published_sizes(name, count):
    with torch.device("meta"):
        assert Decoder(preset(name)).num_params() == count  # Llama-3.2-1B / -3B


def test_tiny_preset_is_a_few_million_parameters():
    n = Decoder(preset("tiny")).num_params()
    assert 1e6 < n < 1e7
    assert set(preset_names()) >= {"tiny", "125m", "350m", "1b", "3b", "8b"}


def test_meta_then_init_weights_gives_a_working_model():
    with torch.device("meta"):
        model = Decoder(preset("tiny", **SMALL))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    w = model.layers[0].attn.wqkv.weight
    assert abs(w.std().item() - 0.02) < 2e-3
    assert torch.all(model.norm.weight == 1)
    residual = model.layers[0].ffn.w2.weight.std().item()
    assert residual == pytest.approx(0.02 / 2, rel=0.1)  # 0.02 / sqrt(2·n_layers)
    logits = model(torch.randint(0, 101, (1, 8)))
    assert torch.isfinite(logits).all()


def test_bad_shapes_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KeyError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(KeyError, match="'dimm'"):
        preset("tiny", dimm=3)
    with pytest.raises(TypeError, match="model.dim='64' must be of type int"):
        ModelConfig(dim="64", n_heads=4, n_kv_heads=4)
    with pytest.raises(TypeError, match="model.n_layers=None must be of type int"):
        ModelConfig(n_layers=None)


@requires_cuda
def test_flex_attention_path_matches_the_mask_path_on_gpu():
    model = small_model().cuda()
    tokens = torch.randint(0, 101, (2, 256), device="cuda")
    doc_ids = (torch.arange(256, device="cuda") // 37).expand(2, -1).contiguous()
    with torch.no_grad():
        flex = model(tokens, doc_ids=doc_ids)
        alone = torch.cat([model(tokens[:, s : s + 37]) for s in range(0, 256, 37)], dim=1)
    torch.testing.assert_close(flex, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_written_backward_passes_match_autograd(dtype):
    """RMSNorm and the SwiGLU feed-forward keep less for backward than autograd would; their
    outputs and gradients equal the plain-autograd formulas (bf16 under CPU autocast: outputs
    exactly, gradients to bf16 rounding)."""
    import torch.nn.functional as F

    block = small_model(seed=3).layers[0].float()
    with torch.no_grad():
        block.ffn_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 64, requires_grad=True)

    def reference(x):
        norm = block.ffn_norm
        normed = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + norm.eps)).type_as(x)
        gate, up = block.ffn.w13(normed * norm.weight).chunk(2, dim=-1)
        return block.ffn.w2(F.silu(gate) * up)

    results = []
    for fn in (lambda x: block.ffn(block.ffn_norm(x)), reference):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(x)
        params = [x, block.ffn_norm.weight, block.ffn.w13.weight, block.ffn.w2.weight]
        results.append((out, torch.autograd.grad(out.float().square().sum(), params)))
    (got, got_grads), (ref, ref_grads) = results
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("x", "norm", "w13", "w2"), got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def _loss_and_grads(model: Decoder, tokens, labels, doc_ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss_sum, _ = model(tokens, doc_ids=doc_ids, labels=labels)
    loss_sum.backward()
    return loss_sum.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("compiled", [False, True])
def test_activation_checkpointing_gives_the_gradients_of_no_checkpointing(mode, compiled):
    """Recomputation runs the same fp32 arithmetic again, so eager checkpointing is bit-exact;
    a compiled block fuses its elementwise ops differently from eager, hence 1e-5 there."""
    model = small_model().train()
    tokens, labels = torch.randint(0, 101, (2, 24)), torch.randint(0, 101, (2, 24))
    doc_ids = (torch.arange(24) // 10).expand(2, -1)  # the document mask path of attention
    ref_loss, ref_grads = _loss_and_grads(model, tokens, labels, doc_ids)
    model.set_recompute(mode)
    if compiled:
        for layer in model.layers:
            layer.compile()
    loss, grads = _loss_and_grads(model, tokens, labels, doc_ids)
    tol = dict(rtol=1e-5, atol=1e-5) if compiled else dict(rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def _kernel_calls(model: Decoder, tokens, labels) -> dict[str, int]:
    """How often forward + backward ran the attention kernel and the matmuls.

    Counted by a dispatch mode entered outside the checkpoints: selective checkpointing's own mode
    sits inside it and answers a kept op from its cache without passing it on, so only the ops
    that really run reach the counter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten, calls = torch.ops.aten, {"attention": 0, "mm": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is aten._scaled_dot_product_flash_attention_for_cpu.default:
                calls["attention"] += 1
            elif func is aten.mm.default:
                calls["mm"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(tokens, labels=labels)[0].backward()
    return calls


def test_selective_checkpointing_recomputes_everything_but_attention():
    model = small_model().train()
    tokens, labels = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    calls = {}
    for mode in ("none", "full", "selective"):
        model.set_recompute(mode)
        calls[mode] = _kernel_calls(model, tokens, labels)
    n_layers = model.cfg.n_layers
    assert calls["none"]["attention"] == n_layers  # forward only: its backward is another kernel
    assert calls["full"]["attention"] == 2 * n_layers  # run again in backward
    assert calls["selective"]["attention"] == n_layers  # kept, not run again
    # Both recompute every block's projections: wqkv, wo, w13 and w2, once more per layer.
    assert calls["full"]["mm"] == calls["selective"]["mm"] == calls["none"]["mm"] + 4 * n_layers


def test_an_unknown_checkpointing_mode_is_rejected():
    with pytest.raises(ValueError, match="expected one of none, full, selective"):
        small_model().set_recompute("some")


def test_compiled_selective_checkpointing_does_not_run_attention_again():
    """Under torch.compile the checkpoint is traced into the block's graph, so the kernels run
    are the compiled graph's: counted by torch.profiler (no dispatch mode can sit in between)."""
    from torch.profiler import ProfilerActivity, profile

    tokens, labels = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    runs = {}
    for mode in ("full", "selective"):
        model = small_model().train()
        model.set_recompute(mode)
        for layer in model.layers:
            layer.compile()
        model(tokens, labels=labels)[0].backward()  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens, labels=labels)[0].backward()
        runs[mode] = {e.key: e.count for e in prof.key_averages()}["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert runs == {"full": 2 * 2, "selective": 2}  # 2 layers: full runs attention again in backward


# --- the families' switches: decoupled head_dim, q/k norm, scaled RoPE, sliding window ---------


def test_preset_overrides_derive_head_dim_again_and_keep_an_explicit_one():
    assert preset("tiny").head_dim == 256 // 8
    assert preset("tiny", dim=64, n_heads=4).head_dim == 16  # not the preset's 32, frozen
    assert preset("tiny", dim=64, n_heads=4, head_dim=32).head_dim == 32
    assert ModelConfig(dim=64, n_heads=4, n_kv_heads=4) == ModelConfig(dim=64, n_heads=4, n_kv_heads=4, head_dim=16)
    assert ModelConfig(dim=60, n_heads=4, n_kv_heads=4, head_dim=32).head_dim == 32  # dim need not divide


def test_context_len_is_max_seq_len_capped_by_the_sliding_window():
    assert preset("tiny").context_len == 512
    assert preset("tiny", arch="mistral", sliding_window=128).context_len == 128
    assert preset("tiny", arch="mistral", sliding_window=4096).context_len == 512


@pytest.mark.parametrize(
    "fields, error, named",
    [
        (dict(arch="gpt2"), ValueError, "model.arch='gpt2': expected one of llama, mistral, qwen2, qwen3"),
        (dict(rope_type="yarn"), ValueError, "model.rope_type='yarn': expected one of default, llama3"),
        (dict(arch=None), TypeError, "model.arch=None must be of type str"),
        (dict(head_dim=-2), ValueError, "model.head_dim=-2 must be at least 0"),
        (dict(head_dim=15), ValueError, "model.head_dim=15 must be even"),
        (dict(dim=60, n_heads=8), ValueError, "model.dim=60 is not divisible by model.n_heads=8"),
        (dict(arch="mistral", sliding_window=-1), ValueError, "model.sliding_window=-1 must be at least 0"),
        (dict(rope_factor=0.0), ValueError, "model.rope_factor=0.0 must be positive"),
        (dict(rope_high_freq_factor=1.0), ValueError, "model.rope_high_freq_factor=1.0 must be above"),
        (dict(rope_original_max_len=0), ValueError, "model.rope_original_max_len=0 must be at least 1"),
    ],
)
def test_bad_family_fields_are_rejected_naming_the_field(fields, error, named):
    with pytest.raises(error, match=named):
        preset("tiny", **fields)


def test_qk_norm_and_decoupled_head_dim_set_the_attention_shapes():
    model = small_model(arch="qwen3", qk_norm=True, head_dim=32)
    attn = model.layers[0].attn
    assert attn.wqkv.weight.shape == ((4 + 2 * 2) * 32, 64)  # q: n_heads · head_dim, k and v: n_kv_heads · head_dim
    assert attn.wo.weight.shape == (64, 4 * 32)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (32,)
    assert torch.all(attn.q_norm.weight == 1)  # init_weights fills them
    assert small_model().layers[0].attn.q_norm is None
    # attention FLOPs count the attention width, n_heads · head_dim, not dim
    extra = model.num_flops_per_token(16) - 6 * model.num_params(exclude_embedding=True)
    assert extra == 12 * 2 * 4 * 32 * 16


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="qwen3", qk_norm=True, head_dim=32),
        dict(rope_type="llama3", rope_original_max_len=8, rope_theta=500000.0),
        dict(arch="mistral", sliding_window=32),
    ],
    ids=["qwen3", "llama3-rope", "mistral-window"],
)
def test_each_family_keeps_packed_documents_apart_and_is_causal(kw):
    model = small_model(**kw)
    for layer in model.layers:  # make the q/k norm count
        for norm in filter(None, (layer.attn.q_norm, layer.attn.k_norm)):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    lengths = [5, 11, 9]
    docs = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_a_row_longer_than_the_sliding_window_is_refused_even_when_packed():
    """Full attention equals the window's only within it; a packed row of that length may hold
    one document that long, so the row length counts."""
    model = small_model(arch="mistral", sliding_window=16)
    with torch.no_grad():
        model(torch.randint(0, 101, (1, 16)))
        with pytest.raises(ValueError, match="model.sliding_window=16: asked to attend over 17 positions"):
            model(torch.randint(0, 101, (1, 17)), doc_ids=(torch.arange(17) // 5)[None])


def test_model_files_import_torch_only():
    import subprocess
    import sys

    code = "import sys, model.config, model.decoder; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "transformers" not in loaded and "safetensors" not in loaded, loaded
