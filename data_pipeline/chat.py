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
always, never doubled), how a preference pair becomes one Sample of two sequences with loss on
its completions only, and how a prompt is fitted into the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.records import ROLES, DataError, PreferencePair, Sample
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
COMPLETION_CUT = "completion_cut"
"""A preference pair kept with the end of a completion cut off to fit --max-len (a note)."""
COMPLETION_CUT_TO_NOTHING = "completion_cut_to_nothing"
"""A preference pair whose prompt leaves a completion no token within --max-len (dropped)."""


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


def encode_pair(pair: PreferencePair, tok: Tokenizer, max_len: int | None = None) -> tuple[Sample | None, str | None]:
    """Tokenize a preference pair as one Sample of two sequences: prompt + chosen, then prompt +
    rejected, each rendered by the chat template as `encode_conversation` renders a conversation
    and aligned on its own (labels[t] is the target of position t within its sequence).

    Only the completion carries loss: the content of its assistant turn(s) and the token(s) that
    close each. Every prompt token is IGNORE_INDEX, its earlier assistant turns included, since
    DPO compares the likelihood of the two answers given the same prompt.

    Over-length policy, per sequence (each at most `max_len` aligned positions, so the Sample at
    most 2 * max_len): the prompt is kept whole and the completion's end is cut off (the pair is
    kept with the note "completion_cut"), as TRL's DPO truncates; a cut answer loses its
    end-of-turn token, but both answers are still compared on the same prompt. When the prompt
    leaves a completion no token, the pair is dropped as "completion_cut_to_nothing". A pair
    quoting a control token is "control_token_in_text"; one whose completion the template gives
    no trained token is "assistant_turn_without_loss" (a note when another completion turn has
    some).

    Args:
        pair: a cleaned pair (prompt ending with a user turn, completions opening with an
            assistant turn: clean.check_pair).
        tok: the tokenizer.
        max_len: the longest aligned sequence allowed (None: no limit).
    Returns:
        (sample, reason): Sample(input_ids = ids_A ++ ids_B, labels = labels_A ++ labels_B,
        segments = (len A, len B)) or None, and the note or drop reason or None.
    Raises:
        DataError: a message with an unknown role or a non-string content, or a chat the
            template cannot render or mask (naming the template and the turn).
    """
    sequences, notes = [], set()
    for completion in (pair.chosen, pair.rejected):
        messages = [*pair.prompt, *completion]
        _check_messages(messages)
        if any(s in m["content"] for m in messages for s in tok.control_strings):
            return None, CONTROL_TOKEN_IN_TEXT
        ids, targets, untrained = _completion_targets(pair.prompt, messages, tok)
        if (targets == IGNORE_INDEX).all():
            return None, UNTRAINED_TURN
        if untrained:
            notes.add(UNTRAINED_TURN)
        if max_len is not None and len(ids) - 1 > max_len:
            ids, targets = ids[: max_len + 1], targets[: max_len + 1]
            if (targets == IGNORE_INDEX).all():
                return None, COMPLETION_CUT_TO_NOTHING
            notes.add(COMPLETION_CUT)
        sequences.append((ids[:-1], targets[1:]))
    (ids_a, labels_a), (ids_b, labels_b) = sequences
    sample = Sample(
        input_ids=np.concatenate([ids_a, ids_b]),
        labels=np.concatenate([labels_a, labels_b]),
        segments=(len(ids_a), len(ids_b)),
    )
    note = COMPLETION_CUT if COMPLETION_CUT in notes else next(iter(notes), None)
    return sample, note


def _completion_targets(
    prompt: Sequence[dict[str, str]], messages: Sequence[dict[str, str]], tok: Tokenizer
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, targets, number of completion turns without a trained token) of prompt + completion:
    targets are the ids where the template trains them after the prompt, IGNORE_INDEX elsewhere."""
    chat = tok.encode_chat(messages)
    # The template trains every assistant turn; a turn's trained tokens come in order, so the
    # first ones, as many as the prompt's assistant turns got, are the prompt's.
    prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    trained = np.array(chat.trained, dtype=bool)
    trained[np.flatnonzero(trained)[: sum(chat.turn_tokens[:prompt_turns])]] = False
    ids = np.array(chat.ids, dtype=np.int32)
    targets = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
    return ids, targets, chat.turn_tokens[prompt_turns:].count(0)


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
    return _marked(chat.ids, chat.trained, tok)


def show_pair_masks(pair: PreferencePair, tok: Tokenizer) -> str:
    """A preference pair's two sequences as `show_masks` writes a conversation, each under a
    `[chosen]` or `[rejected]` line: only the completions are marked (see encode_pair).

    Args:
        pair: the pair.
        tok: the tokenizer (its chat template renders).
    Returns:
        The two marked renderings.
    """
    parts = []
    for name, completion in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        messages = [*pair.prompt, *completion]
        _check_messages(messages)
        ids, targets, _ = _completion_targets(pair.prompt, messages, tok)
        parts.append(f"[{name}]\n{_marked(ids.tolist(), list(targets != IGNORE_INDEX), tok)}")
    return "\n".join(parts)


def _marked(ids: Sequence[int], trained: Sequence[bool], tok: Tokenizer) -> str:
    """The decoded ids, each stretch of trained ones between ⟦ and ⟧."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tok.decode(ids[start:end])
            parts.append(f"⟦{text}⟧" if trained[start] else text)
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
