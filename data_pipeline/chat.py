"""Messages → aligned input ids and labels, through the tokenizer's own chat template; and
documents → ids.

The template is the tokenizer's (data_pipeline/tokenizer.py): ChatML for the tokenizers Crucible
trains, the model's Jinja template for a Hugging Face tokenizer (or `--chat-template FILE`).
Either way only assistant turns carry loss: the content of each and the token(s) that close it
(`<|im_end|>`, `<|eot_id|>`, `</s>`), so the model learns to end its turn. Everything else is
IGNORE_INDEX: system and user messages, role headers, and what follows the end-of-turn token
(ChatML's newline), which generation never has to produce since it stops at that token.

This module holds the policies that do not depend on the template: which turns to keep when a
conversation is too long, how a document is framed (bos only where the tokenizer adds one, eos
always, never doubled), and how a prompt is fitted into the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.records import ROLES, DataError, Sample
from data_pipeline.tokenizer import Tokenizer
from model.loss import IGNORE_INDEX

CUT_EARLIER_TURNS = "cut_earlier_turns"
TOO_LONG = "too_long"
NO_ASSISTANT_TURN = "no_assistant_turn"
CONTROL_TOKEN_IN_TEXT = "control_token_in_text"
"""A message quoting a special token (`<|im_end|>`) that the template would read as a control
token: an answer would be trained to end mid-sentence, a user turn could forge a turn."""
UNTRAINED_TURN = "assistant_turn_without_loss"
"""A kept assistant turn to which the template gave no token to learn; the sample is kept when
another turn has some (a note in the report), dropped when none has."""


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
    an assistant message has nothing to learn and is dropped as "no_assistant_turn". A kept
    assistant turn that the template leaves without a trained token is "assistant_turn_without_loss":
    a note on the kept sample, or the drop reason when no turn has any. A conversation whose
    text holds a string the template would read as a control token is dropped as
    "control_token_in_text".

    Args:
        messages: `{"role": "system"|"user"|"assistant", "content": str}` in order.
        tok: the tokenizer.
        max_len: the longest Sample allowed (None: no limit).
    Returns:
        (sample, reason): the Sample (input_ids = ids[:-1], labels = targets[1:], so labels[t]
        is the target of position t) or None, and the cut/drop reason or None.
    Raises:
        DataError: a message with an unknown role or a non-string content, or a chat the
            template cannot render or mask (naming the template and the turn).
    """
    _check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        return None, NO_ASSISTANT_TURN
    if any(s in m["content"] for m in messages for s in tok.control_strings):
        return None, CONTROL_TOKEN_IN_TEXT
    head = 1 if messages[0]["role"] == "system" else 0
    for start in _exchange_starts(messages, head):
        chat = tok.encode_chat([*messages[:head], *messages[start:]])
        if max_len is None or len(chat.ids) - 1 <= max_len:
            break
    else:
        return None, TOO_LONG
    ids = np.array(chat.ids, dtype=np.int32)
    targets = np.where(np.array(chat.trained, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
    reason = CUT_EARLIER_TURNS if start > head else None
    if 0 in chat.turn_tokens:
        if not any(chat.turn_tokens):
            return None, UNTRAINED_TURN
        reason = UNTRAINED_TURN
    return Sample(input_ids=ids[:-1], labels=targets[1:]), reason


def encode_document(text: str, tok: Tokenizer) -> Sample:
    """Tokenize a pretraining document as `[bos] + encode(text) + [eos]`, every target learned.

    The bos is there only when the tokenizer's own config adds one (Llama's, Crucible's; not
    Qwen's). Neither is ever doubled: `encode` never yields a special id, even for a document
    that quotes the bos or eos string. Long documents are not cut here; the stream packs and
    splits them.

    Args:
        text: the document.
        tok: the tokenizer.
    Returns:
        The aligned Sample (length = number of ids - 1); its last label is eos, so the model
        learns where documents end.
    """
    bos = [] if tok.bos_id is None else [tok.bos_id]
    ids = np.array([*bos, *tok.encode(text), tok.eos_id], dtype=np.int32)
    return Sample(input_ids=ids[:-1], labels=ids[1:].copy())


def encode_prompt(messages: Sequence[dict[str, str]], tok: Tokenizer) -> list[int]:
    """The ids that ask the model for the next assistant turn.

    Args:
        messages: the conversation so far (any roles; usually ending with a user message).
        tok: the tokenizer.
    Returns:
        The rendered messages followed by the template's generation prompt, equal to
        `apply_chat_template(messages, add_generation_prompt=True)`.
    """
    _check_messages(messages, allow_empty=True)
    return tok.encode_chat(messages, add_generation_prompt=True).ids


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


def show_masks(messages: Sequence[dict[str, str]], tok: Tokenizer) -> str:
    """A conversation as its template renders it, each stretch of trained tokens between ⟦ and ⟧:
    what prepare_data's --show-masks prints, so a user sees what the model will learn.

    Args:
        messages: the conversation.
        tok: the tokenizer (its chat template renders).
    Returns:
        The rendered text with the marks.
    """
    _check_messages(messages)
    chat = tok.encode_chat(messages)
    parts, start = [], 0
    for end in range(1, len(chat.ids) + 1):
        if end == len(chat.ids) or chat.trained[end] != chat.trained[start]:
            text = tok.decode(chat.ids[start:end])
            parts.append(f"⟦{text}⟧" if chat.trained[start] else text)
            start = end
    return "".join(parts)


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
