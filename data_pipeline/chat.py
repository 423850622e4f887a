"""The one chat template (ChatML) and the loss mask: messages → aligned input ids and labels.

Each message is rendered as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

and a generation prompt appends `<|im_start|>assistant\\n`. Only assistant turns carry loss: the
assistant's content tokens and its closing `<|im_end|>` (so the model learns to end its turn).
Everything else is IGNORE_INDEX: system and user messages, every `<|im_start|>role\\n` header,
and the `\\n` after each `<|im_end|>`. That newline is part of the template (it separates turns,
as in ChatML) but is never a target: generation stops at `<|im_end|>`, so the model never has
to produce it, and the next prompt supplies it.

Ids are built piece by piece (special tokens as ids, texts through `Tokenizer.encode`) and equal
what `AutoTokenizer.apply_chat_template` gives on the folder `Tokenizer.save_hf` writes: the
tokenizer never merges across a newline or a special token, the only places pieces are joined.
One deliberate difference: a special-token string inside a content (an answer quoting
`<|im_end|>`) is text here, never a control id, so that it cannot end a turn early or forge one;
apply_chat_template, which tokenizes the rendered string, cannot tell it from the template's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.records import ROLES, DataError, Sample
from data_pipeline.tokenizer import Tokenizer
from model.loss import IGNORE_INDEX

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""The Jinja template written into the Hugging Face tokenizer folder; the same text as this module builds."""

CUT_EARLIER_TURNS = "cut_earlier_turns"
TOO_LONG = "too_long"
NO_ASSISTANT_TURN = "no_assistant_turn"


def encode_conversation(
    messages: Sequence[dict[str, str]], tok: Tokenizer, max_len: int | None = None
) -> tuple[Sample | None, str | None]:
    """Tokenize a conversation with its loss mask, cutting or dropping it when over-long.

    Over-length policy (a Sample of n ids has length n - 1, the number of aligned positions;
    it must be at most `max_len`): a leading system message is always kept, and whole exchanges
    (a user message with the replies that follow it) are removed from the start, earliest first,
    until the rest fits — the sample is returned with the reason "cut_earlier_turns". If even the
    system message plus the last exchange that holds an assistant reply does not fit, nothing is
    returned and the reason is "too_long". A single turn is never cut in the middle: a truncated
    answer would teach the model to stop mid-sentence, or never to stop. A conversation without
    an assistant message has nothing to learn and is dropped as "no_assistant_turn".

    Args:
        messages: `{"role": "system"|"user"|"assistant", "content": str}` in order.
        tok: the tokenizer.
        max_len: the longest Sample allowed (None: no limit).
    Returns:
        (sample, reason): the Sample (input_ids = ids[:-1], labels = targets[1:], so labels[t]
        is the target of position t) or None, and the cut/drop reason or None.
    Raises:
        DataError: a message with an unknown role or a non-string content.
    """
    _check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        return None, NO_ASSISTANT_TURN
    blocks = [_encode_message(m, tok) for m in messages]
    head = 1 if messages[0]["role"] == "system" else 0
    start, reason = head, None
    if max_len is not None:
        sizes = [len(ids) for ids, _ in blocks]
        fixed = sum(sizes[:head])
        for start in _exchange_starts(messages, head):
            if fixed + sum(sizes[start:]) - 1 <= max_len:
                break
        else:
            return None, TOO_LONG
        reason = CUT_EARLIER_TURNS if start > head else None
    kept = blocks[:head] + blocks[start:]
    ids = np.concatenate([b[0] for b in kept])
    targets = np.concatenate([b[1] for b in kept])
    return Sample(input_ids=ids[:-1], labels=targets[1:]), reason


def encode_document(text: str, tok: Tokenizer) -> Sample:
    """Tokenize a pretraining document as `[bos] + encode(text) + [eos]`, every target learned.

    Long documents are not cut here; the stream packs and splits them.

    Args:
        text: the document.
        tok: the tokenizer.
    Returns:
        The aligned Sample (length = number of text tokens + 1); its last label is eos, so the
        model learns where documents end.
    """
    ids = np.array([tok.bos_id, *tok.encode(text), tok.eos_id], dtype=np.int32)
    return Sample(input_ids=ids[:-1], labels=ids[1:].copy())


def encode_prompt(messages: Sequence[dict[str, str]], tok: Tokenizer) -> list[int]:
    """The ids that ask the model for the next assistant turn.

    Args:
        messages: the conversation so far (any roles; usually ending with a user message).
        tok: the tokenizer.
    Returns:
        The rendered messages followed by `<|im_start|>assistant\\n`, equal to
        `apply_chat_template(messages, add_generation_prompt=True)`.
    """
    _check_messages(messages, allow_empty=True)
    ids = [int(i) for m in messages for i in _encode_message(m, tok)[0]]
    return ids + [tok.im_start_id, *tok.encode("assistant\n")]


def fit_prompt(messages: Sequence[dict[str, str]], tok: Tokenizer, max_seq_len: int, max_new_tokens: int):
    """Prompt ids for the next answer that leave room for it, dropping the oldest exchanges.

    The system message (the character card) is always kept; whole user/assistant exchanges after
    it go, oldest first, until prompt + max_new_tokens fit in max_seq_len. When even the last user
    turn alone leaves less room, the answer gets what is left. With no turn after the card (or no
    message at all) the prompt asks the model to open the conversation.

    Args:
        messages: the conversation, optionally opening with a system message, then alternating
            user / assistant turns that end with a user turn (or none).
        tok: the tokenizer.
        max_seq_len: the model's context.
        max_new_tokens: room wanted for the answer.
    Returns:
        (prompt ids, number of exchanges dropped from the start).
    Raises:
        DataError: the system message and the last user turn alone fill the context.
    """
    head = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(head) :])
    # At least one try: with no turns, the card alone (range(0, 0, 2) would try nothing).
    for start in range(0, max(len(turns), 1), 2):
        ids = encode_prompt(head + turns[start:], tok)
        if len(ids) + max_new_tokens <= max_seq_len:
            return ids, start // 2
    if len(ids) < max_seq_len:
        return ids, start // 2
    raise DataError(f"the prompt is {len(ids)} tokens; the model's context is {max_seq_len}")


def _encode_message(message: dict[str, str], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, targets) of one rendered message, unaligned: targets[i] is ids[i] or IGNORE_INDEX."""
    header = [tok.im_start_id, *tok.encode(message["role"] + "\n")]
    body = [*tok.encode(message["content"]), tok.im_end_id]
    tail = tok.encode("\n")
    ids = np.array(header + body + tail, dtype=np.int32)
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    if message["role"] == "assistant":
        targets[len(header) : len(header) + len(body)] = body
    return ids, targets


def _exchange_starts(messages: Sequence[dict[str, str]], head: int) -> list[int]:
    """Indices where the exchanges after the first `head` messages begin, up to the last one
    that holds an assistant reply (a cut never starts after it: nothing would be learned)."""
    starts = [head] + [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [s for s in starts if s <= last_reply]


def _check_messages(messages: Sequence[dict[str, str]], allow_empty: bool = False) -> None:
    if not messages and not allow_empty:
        raise DataError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"message {i} ({m['role']}): content must be a string, got {type(m.get('content')).__name__}"
            )
