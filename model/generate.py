"""Token-by-token generation with the KV cache: greedy, or temperature and nucleus sampling.

`generate` is a Python generator that yields each new token id as soon as it is chosen, so a
caller can stream text. The prompt is run once (prefill) to fill the cache; every later step
feeds only the token just chosen. `generate_group` decodes n completions of one prompt together
(batch n), as online RL samples a group per prompt (GRPO, issue 20).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.decoder import Decoder


def sample_tokens(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose one token per row of logits.

    Args:
        logits: (n, vocab_size) scores, one row per sequence.
        temperature: 0 picks each row's argmax (greedy); above 0 divides the logits before sampling.
        top_p: nucleus sampling (Holtzman et al. 2019): each row samples only from its smallest set
            of most likely tokens whose probabilities sum to at least top_p (1: the whole vocabulary).
        generator: a torch.Generator on the logits' device, for reproducible sampling.
    Returns:
        (n,) int64 token ids, on the logits' device.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (n, V)
    if top_p >= 1:
        # No cut: the fp32 cumsum below reaches 1 before the tail (~10k tokens at 128k vocab).
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    probs, order = probs.sort(dim=-1, descending=True)  # (n, V) each
    # Keep a token while the mass before it is still short of top_p, and always the most likely.
    keep = probs.cumsum(-1) - probs < top_p
    keep[:, 0] = True
    choice = torch.multinomial(probs * keep, 1, generator=generator)  # (n, 1); multinomial renormalises
    return order.gather(-1, choice)[:, 0]


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Choose the next token from one position's logits (`sample_tokens` for one row).

    Args:
        logits: (vocab_size,) scores.
        temperature, top_p, generator: as `sample_tokens`.
    Returns:
        the token id.
    """
    return int(sample_tokens(logits[None], temperature, top_p, generator)[0])


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


@torch.no_grad()
def generate_group(
    model: Decoder,
    prompt_ids: Sequence[int],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """n completions of one prompt, decoded together as a batch of n over one KV cache.

    The prompt is prefilled once (batch 1) and its keys and values copied into every row of the
    batch-n cache. Each step samples one token per row; a row ends at its first stop id, which it
    keeps (a reward can see that the answer was closed), or after max_new_tokens. Decoding stops
    as soon as every row has ended; rows that ended earlier are still fed (the batch keeps its
    shape) but what they sample is discarded. The model runs in eval mode and every module's
    train/eval flag is restored afterwards, so a training loop can call this between steps.

    Args:
        model: the decoder; the cache takes its weights' device and dtype.
        prompt_ids: the prompt, at least one id.
        n: completions to sample (the group size), at least 1.
        max_new_tokens: most ids per completion. prompt + max_new_tokens must fit the model's
            context (`cfg.context_len`: max_seq_len, or the sliding window): checked before any
            work, rather than cut short, so that a caller's length budget is never silently changed.
        temperature: 0 for greedy decoding (every row then the same), else the sampling temperature.
        top_p: nucleus sampling threshold (see `sample_tokens`).
        stop_ids: a row ends when it samples one of these; it is included in the row.
        generator: a torch.Generator on the model's device, for reproducible sampling.
    Returns:
        n lists of generated ids (the prompt not included).
    Raises:
        ValueError: an empty prompt, n < 1, max_new_tokens < 0, or a sequence past the context.
    """
    if not prompt_ids:
        raise ValueError("generate_group needs a prompt of at least one token")
    if n < 1 or max_new_tokens < 0:
        raise ValueError(f"generate_group: n={n} must be >= 1 and max_new_tokens={max_new_tokens} >= 0")
    T, context = len(prompt_ids), model.cfg.context_len
    if T + max_new_tokens > context:
        raise ValueError(
            f"generate_group: prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds "
            f"model.context_len={context}; shorten the prompt or lower max_new_tokens"
        )
    if max_new_tokens == 0:
        return [[] for _ in range(n)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out, lengths = _decode_group(model, prompt_ids, n, max_new_tokens, temperature, top_p, stop_ids, generator)
    finally:
        for m, training in modes.items():
            m.training = training
    lengths = lengths.tolist()
    return [row[:length] for row, length in zip(out.tolist(), lengths, strict=True)]


def _decode_group(model, prompt_ids, n, max_new_tokens, temperature, top_p, stop_ids, generator):
    """The decoding loop of `generate_group`: (ids (n, steps), lengths (n,)) on the model's device."""
    device = model.tok_embeddings.weight.device
    T = len(prompt_ids)
    max_len = T + max_new_tokens
    # Prefill at batch 1 (the prompt's work done once, in a cache shaped as generate's, so that
    # n = 1 decodes as generate does), then copy its keys and values into each of the n rows.
    prefill = model.new_cache(1, max_len)
    h = model.hidden_states(torch.tensor([list(prompt_ids)], device=device), cache=prefill)[:, -1]  # (1, dim)
    cache = model.new_cache(n, max_len)
    for row_cache, prompt_cache in zip(cache.layers, prefill.layers, strict=True):
        k, v = (t[:, :, :T].expand(n, -1, -1, -1) for t in (prompt_cache.k, prompt_cache.v))  # (n, kv, T, hd)
        row_cache.append(k, v)
    del prefill
    h = h.expand(n, -1)  # (n, dim)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out = torch.zeros(n, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_ids = sample_tokens(F.linear(h, model.output_weight), temperature, top_p, generator)  # (n,)
        out[:, step] = next_ids
        lengths += ~done  # counted before the stop test: a row keeps its stop id
        done |= torch.isin(next_ids, stops)
        # One host sync per step, as generate's int(): the price of stopping early.
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        h = model.hidden_states(next_ids[:, None], cache=cache)[:, -1]  # (n, dim)
    return out, lengths
