"""Token-by-token generation with the KV cache: greedy, or temperature and nucleus sampling.

`generate` is a Python generator that yields each new token id as soon as it is chosen, so a
caller can stream text. The prompt is run once (prefill) to fill the cache; every later step
feeds only the token just chosen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.decoder import Decoder


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Choose the next token from one position's logits.

    Args:
        logits: (vocab_size,) scores.
        temperature: 0 picks the argmax (greedy); above 0 divides the logits before sampling.
        top_p: nucleus sampling (Holtzman et al. 2019): sample only from the smallest set of
            most likely tokens whose probabilities sum to at least top_p (1: the whole vocabulary).
        generator: a torch.Generator on the logits' device, for reproducible sampling.
    Returns:
        the token id.
    """
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p >= 1:
        # No cut: the fp32 cumsum below reaches 1 before the tail (~10k tokens at 128k vocab).
        return int(torch.multinomial(probs, 1, generator=generator))
    probs, order = probs.sort(descending=True)
    # Keep a token while the mass before it is still short of top_p, and always the most likely.
    keep = probs.cumsum(-1) - probs < top_p
    keep[0] = True
    choice = torch.multinomial(probs * keep, 1, generator=generator)  # multinomial renormalises
    return int(order[choice])


@torch.no_grad()
def generate(
    model: Decoder,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time, continuing `prompt_ids` (batch size 1).

    Args:
        model: the decoder (put in eval mode here); the cache takes its weights' device and dtype.
        prompt_ids: the prompt, at least one id.
        max_new_tokens: most ids to yield.
        temperature: 0 for greedy decoding, else the sampling temperature (see `sample_next`).
        top_p: nucleus sampling threshold (see `sample_next`).
        stop_ids: generation ends when one of these is chosen; it is not yielded.
        generator: a torch.Generator on the model's device, for reproducible sampling.
    Returns:
        an iterator over the generated ids; the work happens as it is consumed.
    """
    if not prompt_ids:
        raise ValueError("generate needs a prompt of at least one token")
    model.eval()
    device = model.tok_embeddings.weight.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([list(prompt_ids)], device=device)  # (1, T): the whole prompt first
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        # Hidden states, then logits for the last position only: the prompt's (T, V) logits
        # would be large and unused.
        h = model.hidden_states(tokens, cache=cache)[0, -1]  # (dim,)
        next_id = sample_next(F.linear(h, model.output_weight), temperature, top_p, generator)
        if next_id in stop:
            return
        yield next_id
        tokens = torch.tensor([[next_id]], device=device)  # (1, 1)
