"""The one loss, and the per-token log-probs, against references: naive cross-entropy,
F.cross_entropy, unchunked logits and log_softmax."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.loss as loss_module
from model.config import preset
from model.decoder import Decoder
from model.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    chunked_causal_lm_loss,
    chunked_token_logprobs,
    sequence_logprobs,
)


def uneven_labels(B, T, V, seed=0):
    """Labels with a different number of targets per row, including a fully masked row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        n_masked = [T, 0, T // 3, T - 1][b % 4]  # row 0 has no target at all
        labels[b, :n_masked] = IGNORE_INDEX
    return labels


def naive_loss(logits, labels, z_loss=0.0):
    """Token by token, in fp64: −log softmax(logits)[target] (+ z·lse²)."""
    total, count = 0.0, 0
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
    for row, y in zip(flat_logits, flat_labels.tolist(), strict=True):
        if y == IGNORE_INDEX:
            continue
        lse = torch.logsumexp(row, 0)
        total += (lse - row[y]).item() + z_loss * lse.item() ** 2
        count += 1
    return total, count


def test_loss_equals_cross_entropy_sum_and_count():
    B, T, V = 4, 9, 37
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    labels = uneven_labels(B, T, V)
    loss_sum, n = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss_sum, ref, rtol=1e-6, atol=1e-6)
    naive_sum, naive_count = naive_loss(logits, labels)
    assert n.item() == naive_count == (0 + T + (T - T // 3) + 1)
    assert loss_sum.item() == pytest.approx(naive_sum, rel=1e-6)


def test_fully_masked_batch_gives_zero_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss_sum, n = causal_lm_loss(logits, labels)
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and n.item() == 0
    assert torch.count_nonzero(logits.grad) == 0

    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    c_sum, c_n = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=3)
    c_sum.backward()
    assert c_sum.item() == 0.0 and c_n.item() == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_z_loss_matches_naive():
    B, T, V = 3, 6, 17
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(2)) * 3
    labels = uneven_labels(B, T, V, seed=3)
    loss_sum, n = causal_lm_loss(logits, labels, z_loss=1e-2)
    naive_sum, naive_count = naive_loss(logits, labels, z_loss=1e-2)
    assert loss_sum.item() == pytest.approx(naive_sum, rel=1e-6)
    assert n.item() == naive_count


def test_z_loss_ignores_rows_without_a_target_even_when_their_lse_is_infinite():
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(6))
    logits[0] = float("-inf")  # a row no target reads (lse = -inf, and -inf² · 0 would be NaN)
    labels = torch.tensor([IGNORE_INDEX, 4, 9])
    loss_sum, n = causal_lm_loss(logits, labels, z_loss=1e-2)
    ref_sum, _ = causal_lm_loss(logits[1:], labels[1:], z_loss=1e-2)
    assert n.item() == 2
    torch.testing.assert_close(loss_sum, ref_sum, rtol=0, atol=0)


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss_sum, n = fn(h, w, labels, **kw)
    (loss_sum / n.clamp(min=1)).backward()
    return loss_sum.detach(), n, h.grad, w.grad


def _unchunked(hidden, weight, labels, z_loss=0.0):
    return causal_lm_loss(hidden @ weight.t(), labels, z_loss=z_loss)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 1024])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_equals_unchunked_fp32(chunk_tokens, z_loss):
    B, T, D, V = 4, 12, 16, 53
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    labels = uneven_labels(B, T, V, seed=5)
    ref = _loss_and_grads(_unchunked, hidden, weight, labels, z_loss=z_loss)
    got = _loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_tokens=chunk_tokens, z_loss=z_loss)
    # fp32: equal to 1e-6 (relative and absolute), values and both gradients.
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)


def test_chunked_equals_unchunked_bf16():
    B, T, D, V = 4, 32, 64, 257
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(B, T, D, generator=g).bfloat16()
    weight = (torch.randn(V, D, generator=g) * 0.1).bfloat16()
    labels = uneven_labels(B, T, V, seed=7)
    ref = _loss_and_grads(_unchunked, hidden, weight, labels)
    got = _loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_tokens=24)
    # The loss is accumulated in fp32 from identical bf16 logits: 1e-5 relative.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1] == ref[1]
    # Gradients are bf16 (8 bits of mantissa); the chunked weight gradient is summed in fp32 and
    # rounded once, autograd's in one bf16 matmul: they agree to bf16 resolution, 2e-2.
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[3], ref[3], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_is_exact_where_the_target_probability_underflows(z_loss):
    """Targets 40 to 300 nats below their row's best logit: p_y is subnormal or 0 in fp32, so
    log(softmax) alone would be inexact or −inf; the CPU path redoes those rows' log p."""
    B, T, D, V = 2, 8, 4, 29
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    weight[:, 0] = 0.0
    weight[0, 0] = 1.0  # feature 0 lifts token 0 alone: the gap logit_0 − logit_y grows with it
    hidden[..., 0] = torch.linspace(40, 300, B * T).view(B, T)
    labels = torch.randint(1, V, (B, T), generator=g)  # never token 0
    ref = _loss_and_grads(_unchunked, hidden.double(), weight.double(), labels, z_loss=z_loss)
    got = _loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_tokens=5, z_loss=z_loss)
    assert torch.isfinite(got[0])
    # fp32 against fp64 logits of magnitude up to 300: 1e-6 relative on the loss
    torch.testing.assert_close(got[0], ref[0].float(), rtol=1e-6, atol=0)
    for r, c in zip(ref[2:], got[2:], strict=True):
        torch.testing.assert_close(c, r.float(), rtol=1e-5, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_chunked_never_materialises_full_logits():
    B, T, D, V = 2, 64, 8, 1000
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = uneven_labels(B, T, V)
    with LargestTensor() as probe:
        loss_sum, n = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=16)
        loss_sum.backward()
    assert probe.max_numel <= 16 * V < B * T * V
    with LargestTensor() as control:  # the probe does see the full logits of the plain path
        _unchunked(hidden, weight, labels)[0].backward()
    assert control.max_numel >= B * T * V


class MatmulRows(TorchDispatchMode):
    """Counts the rows of every (n, V)-wide matmul output while active."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.mkldnn._linear_pointwise.default)

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS and out.shape[-1] == self.vocab:
            self.rows += out.shape[0]
        return out


def test_rows_without_a_target_are_left_out_of_the_matmuls_on_cpu():
    B, T, D, V = 4, 12, 16, 53
    g = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    labels = uneven_labels(B, T, V, seed=10)
    n_targets = int((labels != IGNORE_INDEX).sum())
    with MatmulRows(V) as probe:
        got = _loss_and_grads(chunked_causal_lm_loss, hidden, weight, labels, chunk_tokens=7)
    assert probe.rows == n_targets < B * T  # the logits of target rows only
    ref = _loss_and_grads(_unchunked, hidden, weight, labels)
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(got[2][labels == IGNORE_INDEX]) == 0  # and no gradient


class OpsSeen(TorchDispatchMode):
    """The set of ops run while active."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def test_chunked_under_no_grad_computes_no_gradients():
    """Evaluation runs the loss under no_grad with weights that require grad: only the logits'
    matmuls may run, not those of the two gradients (and no (V, dim) buffer)."""
    B, T, D, V = 2, 10, 16, 53
    hidden, weight = torch.randn(B, T, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(11))
    with OpsSeen() as seen, torch.no_grad():
        got = chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=7)
    gradient_ops = {torch.ops.aten.addmm_.default, torch.ops.aten.scatter_add_.default}
    assert not seen.ops & gradient_ops
    torch.testing.assert_close(got[0], _unchunked(hidden, weight, labels)[0].detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_tokens=-1"):
        chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=-1)  # not a silent loss of 0


@pytest.mark.skipif(not loss_module._ONEDNN_LINEAR, reason="this torch has no oneDNN matmul op")
def test_cpu_fp32_logits_take_onednn_and_autocast_the_plain_matmul():
    hidden, weight = torch.randn(2, 8, 16, requires_grad=True), torch.randn(53, 16, requires_grad=True)
    labels = uneven_labels(2, 8, 53)
    onednn = torch.ops.mkldnn._linear_pointwise.default
    with OpsSeen() as fp32:
        chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5)[0].backward()
    assert onednn in fp32.ops
    with OpsSeen() as bf16, torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=5)[0].backward()
    assert onednn not in bf16.ops and torch.ops.aten.mm.default in bf16.ops


def _sft_batch(B=8, T=24, V=97, seed=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):  # prompts of very different lengths, as in SFT
        labels[b, : [2, 20, 5, 23, 0, 12, 17, 9][b]] = IGNORE_INDEX
    return tokens, labels


def _grads_after(model, micro_batches, normaliser):
    model.zero_grad()
    for tokens, labels in micro_batches:
        loss_sum, n = model(tokens, labels=labels)
        (loss_sum / normaliser(n)).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_token_weighted_accumulation_matches_whole_batch():
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    model.init_weights()
    tokens, labels = _sft_batch()
    global_count = (labels != IGNORE_INDEX).sum()
    k = 4
    micro = list(zip(tokens.chunk(k), labels.chunk(k), strict=True))

    whole = _grads_after(model, [(tokens, labels)], lambda n: n)
    exact = _grads_after(model, micro, lambda n: global_count)
    for w, e in zip(whole, exact, strict=True):
        torch.testing.assert_close(e, w, rtol=1e-5, atol=1e-7)

    # The control: averaging each micro-batch by its own count, then over micro-batches,
    # weights tokens of short micro-batches more; it must not match.
    mean_of_means = _grads_after(model, micro, lambda n: n * k)
    worst = max((m - w).abs().max() / w.abs().max() for m, w in zip(mean_of_means, whole, strict=True))
    assert worst > 1e-2


def naive_token_logprobs(hidden, weight, labels):
    """log_softmax(hidden @ weight.T) at the targets, from the full fp32 logits; 0 where ignored."""
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    valid = labels != IGNORE_INDEX
    return torch.where(valid, logp.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1), 0.0)


def _logprobs_and_grads(fn, hidden, weight, labels, upstream, **kw):
    """fn's log-probs and the gradients of sum(upstream · log-probs) w.r.t. hidden and weight."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = fn(h, w, labels, **kw)
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad


def _token_logprob_case(B=4, T=12, D=16, V=53, seed=12):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) * 0.5
    labels = uneven_labels(B, T, V, seed=seed + 1)  # one row without targets, one with a single one
    upstream = torch.randn(B, T, generator=g)  # a random upstream gradient, not just ones
    return hidden, weight, labels, upstream


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 1024])  # 5 and 16 do not divide the 21 target rows
def test_token_logprobs_equal_log_softmax_fp32(chunk_tokens):
    hidden, weight, labels, upstream = _token_logprob_case()
    ref = _logprobs_and_grads(naive_token_logprobs, hidden, weight, labels, upstream)
    got = _logprobs_and_grads(chunked_token_logprobs, hidden, weight, labels, upstream, chunk_tokens=chunk_tokens)
    assert got[0].dtype == torch.float32 and got[0].shape == labels.shape
    # fp32: equal to 1e-5 (relative and absolute), values and both gradients.
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)
    ignored = labels == IGNORE_INDEX
    assert torch.all(got[0][ignored] == 0.0) and torch.count_nonzero(got[1][ignored]) == 0


def test_token_logprobs_masks_rows_without_a_target_where_it_computes_them():
    """A GPU computes the ignored rows and masks them (no host sync to pick them): the same
    autograd Function, called without the CPU's row selection, gives the same values and grads."""
    hidden, weight, labels, upstream = _token_logprob_case(seed=14)
    hidden[labels == IGNORE_INDEX] *= 100  # large but finite: must still give exactly 0 and no gradient

    def all_rows(h, w, y, chunk_tokens):
        flat = loss_module._ChunkedTokenLogprobs.apply(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), chunk_tokens)
        return flat.view(y.shape)

    ref = _logprobs_and_grads(naive_token_logprobs, hidden, weight, labels, upstream)
    got = _logprobs_and_grads(all_rows, hidden, weight, labels, upstream, chunk_tokens=7)
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)
    ignored = labels == IGNORE_INDEX
    assert torch.all(got[0][ignored] == 0.0) and torch.count_nonzero(got[1][ignored]) == 0


def test_token_logprobs_of_a_batch_without_targets_are_zero():
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    logp = chunked_token_logprobs(hidden, weight, torch.full((2, 5), IGNORE_INDEX), chunk_tokens=3)
    logp.sum().backward()
    assert torch.count_nonzero(logp) == 0 and logp.shape == (2, 5)
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_token_logprobs_under_no_grad():
    hidden, weight, labels, _ = _token_logprob_case(seed=16)
    hidden.requires_grad_(), weight.requires_grad_()
    with OpsSeen() as seen, torch.no_grad():
        got = chunked_token_logprobs(hidden, weight, labels, chunk_tokens=7)
    assert not got.requires_grad
    assert torch.ops.aten.scatter_add_.default not in seen.ops  # no backward ran
    torch.testing.assert_close(got, naive_token_logprobs(hidden, weight, labels).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_tokens=-1"):
        chunked_token_logprobs(hidden, weight, labels, chunk_tokens=-1)


def test_token_logprobs_bf16():
    B, T, D, V = 4, 32, 64, 257
    g = torch.Generator().manual_seed(18)
    hidden = torch.randn(B, T, D, generator=g).bfloat16()
    weight = (torch.randn(V, D, generator=g) * 0.1).bfloat16()
    labels = uneven_labels(B, T, V, seed=19)
    upstream = torch.randn(B, T, generator=g)
    ref = _logprobs_and_grads(naive_token_logprobs, hidden, weight, labels, upstream)
    got = _logprobs_and_grads(chunked_token_logprobs, hidden, weight, labels, upstream, chunk_tokens=24)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    # Both take log_softmax in fp32 of the same bf16 logits: 1e-5.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    # Gradients are bf16 (8 bits of mantissa); the chunked weight gradient is summed in fp32 and
    # rounded once, autograd's in one bf16 matmul: they agree to bf16 resolution, 2e-2.
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-3)


def test_token_logprobs_backward_remakes_the_autocast_logits():
    """Forward under autocast, backward outside it (as training does): backward must make the
    same bf16 logits again, so the gradients match autograd through the bf16 matmul."""
    hidden, weight, labels, upstream = _token_logprob_case(seed=20)
    results = []
    for fn, kw in ((naive_token_logprobs, {}), (chunked_token_logprobs, {"chunk_tokens": 7})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = fn(h, w, labels, **kw)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), h.grad, w.grad))
    (ref_logp, ref_h, ref_w), (logp, grad_h, grad_w) = results
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    # fp32 gradients of bf16 matmuls (autograd's bf16 products, ours summed in fp32): 2e-2.
    torch.testing.assert_close(grad_h, ref_h, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad_w, ref_w, rtol=2e-2, atol=2e-3)
    # the control: gradients from fp32 logits are further off than that
    fp32 = _logprobs_and_grads(chunked_token_logprobs, hidden, weight, labels, upstream, chunk_tokens=7)
    assert (fp32[0] - ref_logp).abs().max() > 1e-3


def test_token_logprobs_never_materialise_full_logits():
    B, T, D, V = 2, 64, 8, 1000
    hidden, weight = torch.randn(B, T, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    labels = uneven_labels(B, T, V)
    with LargestTensor() as probe:
        (chunked_token_logprobs(hidden, weight, labels, chunk_tokens=16) * torch.randn(B, T)).sum().backward()
    assert probe.max_numel <= 16 * V < B * T * V


def test_sequence_logprobs_match_a_loop():
    B, T = 3, 10
    g = torch.Generator().manual_seed(22)
    token_logps = (-torch.rand(B, T, generator=g) * 5).requires_grad_()
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[0, :4] = labels[1, 7:] = labels[2, :] = IGNORE_INDEX  # the last row has no target
    # packed rows: two sequences in row 0, one in row 1 and a sequence (id 4) with no target
    seq_ids = torch.tensor([[0] * 6 + [1] * 4, [2] * 7 + [-1] * 3, [4] * 10])  # -1: padding, ignored
    n_seqs = 5  # sequence 3 has no position at all
    sums, counts = sequence_logprobs(token_logps, labels, seq_ids, n_seqs)
    want_sums, want_counts = [0.0] * n_seqs, [0] * n_seqs
    flat = (token_logps.flatten().tolist(), labels.flatten().tolist(), seq_ids.flatten().tolist())
    for logp, y, s in zip(*flat, strict=True):
        if y != IGNORE_INDEX:
            want_sums[s] += logp
            want_counts[s] += 1
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert counts.tolist() == want_counts == [2, 4, 7, 0, 0]
    assert sums.tolist() == pytest.approx(want_sums, rel=1e-6, abs=1e-6)
    weights = torch.arange(1.0, n_seqs + 1)
    (sums * weights).sum().backward()
    # d/d token = the weight of its sequence where it is a target, 0 elsewhere
    expected = torch.where(labels != IGNORE_INDEX, weights[seq_ids.clamp(min=0)], 0.0)
    torch.testing.assert_close(token_logps.grad, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_on_gpu(dtype):
    hidden, weight, labels, upstream = _token_logprob_case(B=4, T=300, D=64, V=1000, seed=24)
    hidden, weight = hidden.cuda().to(dtype), weight.cuda().to(dtype)
    labels, upstream = labels.cuda(), upstream.cuda()
    ref = _logprobs_and_grads(naive_token_logprobs, hidden, weight, labels, upstream)
    got = _logprobs_and_grads(chunked_token_logprobs, hidden, weight, labels, upstream, chunk_tokens=256)
    # fp32 matmuls may take TF32 on the GPU in neither or both paths; bf16 as on CPU.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for r, c in zip(ref[1:], got[1:], strict=True):
        torch.testing.assert_close(c, r, **tol)
    assert torch.count_nonzero(got[1][labels == IGNORE_INDEX]) == 0
