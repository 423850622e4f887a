"""python benchmarks/bench_loss.py [--tokens 2048] [--dim 256] [--vocab 8192] [--chunk-tokens N] [--eval]

The output projection and the loss alone, forward + backward (with --eval: forward alone under
torch.no_grad, with the weights requiring grad as a model's do, as in validation and perplexity),
three ways on the same hidden states, weight and labels:

- `chunked`: Crucible's `chunked_causal_lm_loss` as the Decoder calls it (on CPU in fp32 the
  logits go through oneDNN's matmul and the softmax is taken in place);
- `chunked-mkl`: the same with the logits through torch's matmul (MKL's sgemm on x86 CPUs),
  to show what the oneDNN path is worth on this machine;
- `full`: the whole (tokens, vocab) logits, then `F.cross_entropy` on them in fp32, as
  transformers' LlamaForCausalLM computes its loss.

The three run in a random order in each round, in this one process, so the machine's drift
falls on all of them alike; each reports its median over the rounds. All three must give the
same loss (1e-5 relative), or the benchmark stops: they are the same work.

The last line printed is `speedup_vs_full=<x.xx> onednn_speedup=<y.yy>` (chunked against full,
and chunked against chunked-mkl: time ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model.loss as loss_module  # noqa: E402
from model.loss import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss  # noqa: E402

WAYS = ("chunked", "chunked-mkl", "full")
ONEDNN = loss_module._ONEDNN_LINEAR  # whether this torch has oneDNN's matmul op at all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of hidden states (batch × seq_len)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--masked", type=float, default=0.0, help="fraction of labels set to IGNORE_INDEX (SFT)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: model.loss.default_chunk_tokens")
    parser.add_argument("--eval", action="store_true", help="forward only, under torch.no_grad")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    return parser.parse_args(argv)


def inputs(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=g)
    weight = torch.randn(args.vocab, args.dim, generator=g) * args.dim**-0.5
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    labels[torch.rand(args.tokens, generator=g) < args.masked] = IGNORE_INDEX
    return hidden, weight, labels


@contextlib.contextmanager
def logits_through_onednn(on: bool):
    """model.loss's choice of matmul for the logits, for the duration of the block."""
    before, loss_module._ONEDNN_LINEAR = loss_module._ONEDNN_LINEAR, on
    try:
        yield
    finally:
        loss_module._ONEDNN_LINEAR = before


def run(way: str, hidden, weight, labels, chunk_tokens, evaluating: bool = False) -> float:
    """One forward + backward of `way` (forward alone under no_grad when evaluating); the mean
    loss per target."""
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.no_grad() if evaluating else contextlib.nullcontext():
        if way == "full":
            loss_sum, count = causal_lm_loss(h @ w.t(), labels)
        else:
            with logits_through_onednn(way == "chunked" and ONEDNN):
                loss_sum, count = chunked_causal_lm_loss(h, w, labels, chunk_tokens=chunk_tokens)
        loss = loss_sum / count
    if not evaluating:
        loss.backward()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hidden, weight, labels = inputs(args)
    print(
        f"{args.tokens} tokens × dim {args.dim} × vocab {args.vocab}, {args.masked:.0%} masked, fp32, "
        f"{'forward under no_grad' if args.eval else 'forward + backward'}, "
        f"{torch.get_num_threads()} threads, oneDNN {'available' if ONEDNN else 'unavailable'}, "
        f"torch {torch.__version__}"
    )
    losses = {way: run(way, hidden, weight, labels, args.chunk_tokens, args.eval) for way in WAYS}
    if max(abs(v - losses["full"]) for v in losses.values()) > 1e-5 * abs(losses["full"]):
        raise SystemExit(f"the losses differ: {losses}; the three do not do the same work")
    times = {way: [] for way in WAYS}
    order = list(WAYS)
    for r in range(args.warmup + args.rounds):
        random.Random(r).shuffle(order)
        for way in order:
            started = time.perf_counter()
            run(way, hidden, weight, labels, args.chunk_tokens, args.eval)
            if r >= args.warmup:
                times[way].append(time.perf_counter() - started)
    median = {way: statistics.median(t) for way, t in times.items()}
    for way in WAYS:
        print(f"{way:12s} {1e3 * median[way]:9.1f} ms  ({args.tokens / median[way]:,.0f} tokens/s)")
    full, mkl = median["full"] / median["chunked"], median["chunked-mkl"] / median["chunked"]
    print(f"speedup_vs_full={full:.2f} onednn_speedup={mkl:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
