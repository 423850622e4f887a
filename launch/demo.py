"""make demo   (or: python launch/demo.py [--steps N])

The quick start. Until the end-to-end path lands (data preparation, the Ray pretraining job,
DeepSpeed SFT, evaluation) this runs a short pretraining of the tiny model on a fixed set of
random token sequences: the decoder and the one loss learn to reproduce them, so the printed
loss falls from ln(vocab) towards zero.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from model.config import preset
from model.decoder import Decoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512)
    model = Decoder(cfg)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    tokens, labels = data[:, :-1], data[:, 1:]  # labels aligned: labels[t] is the target of t
    n_params, init_loss = model.num_params() / 1e6, math.log(cfg.vocab_size)
    print(f"tiny decoder: {n_params:.2f}M parameters; loss at init ≈ ln(V) = {init_loss:.2f}")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss_sum, n_tokens = model(tokens, labels=labels)
        loss = loss_sum / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            rate = step * tokens.numel() / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss.item():.4f}  tokens/s {rate:,.0f}")


if __name__ == "__main__":
    main()
