"""Prompt sets for online RL: rows → PromptItems → an endless, seeded stream of per-rank micro-batches.

    prompts.jsonl ─► read_prompts ─► [PromptItem(messages, info, source)]
        ─► PromptStream (an epoch is a seeded permutation of all items; epochs follow each other
           without a gap) ─► this rank's micro-batch: prompts_per_batch PromptItems, each with the
           `epoch` and `index` it was dealt at

A row is `{"messages": [system?, user, (assistant, user)...], ...}`: a conversation ending with the
user turn to be answered. Every other key of the row is the item's `info`, handed to the reward
functions (training/rewards.py); data_pipeline/synthetic.py's rows carry `character`, `field`,
`expected` and `conflicts`. Contents are used as written: a prompt set is made for RL (as
synthetic.rl_prompts makes one), not scraped, so there is nothing to clean.

Dealing. The stream is one sequence of global positions 0, 1, 2, ...: position p is item
order(epoch)[p % n] with epoch = p // n, where order(epoch) is a permutation of the n items seeded by
(seed, epoch). Positions are grouped into global micro-batches of prompts_per_batch; rank r's j-th
micro-batch is global micro-batch j · world_size + r. The ranks advance in lockstep, so an optimizer
step s of `accum` micro-batches per rank covers global micro-batches [s·A·W, (s+1)·A·W), that is the
consecutive positions [s·N, (s+1)·N) with N = accum · world_size · prompts_per_batch. Two layouts
with the same N therefore see the same prompts in the same step (world 1 × 4 prompts and world 2 ×
2 prompts, with any equal accumulation), which is what lets a data-parallel RL run match a single
process exactly. A step that needs more prompts than an epoch has left runs on into the next
epoch, reshuffled.

Each dealt item carries its `epoch` and `index` (its position in the epoch's order): the RL loop
seeds the sampling of its completions by (seed, epoch, index), so a prompt draws the same
completions on whichever rank it lands.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

# The importers' row reading (bad bytes, lone surrogates, `path:LINE` sources), shared rather
# than written twice; they are private to the package, not to formats.py.
from data_pipeline.formats import _check_messages_characters, _message_list, _RecordError, _rows_in
from data_pipeline.records import ROLES, DataError


@dataclass
class PromptItem:
    """One prompt: the conversation to answer, and what the rewards know about it."""

    messages: list[dict]
    """{"role", "content"} messages, an optional system message first, ending with a user turn."""
    info: dict
    """The row's other keys (e.g. character, field, expected, conflicts)."""
    source: str
    """Where it came from, `path:LINE` (or `path[i]`), for error messages."""
    epoch: int = -1
    """The epoch a PromptStream dealt it in (-1 as read)."""
    index: int = -1
    """Its position in that epoch's shuffled order (-1 as read)."""


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Read a prompt set: a .jsonl file (or .json, .parquet), or a folder of them read in sorted order.

    Args:
        path: the file or folder.

    Returns:
        The items in file order, `epoch` and `index` unset.

    Raises:
        DataError: naming `path:LINE`, for a line that is not a JSON object, holds bytes that are
            not UTF-8 or a lone surrogate, or whose `messages` is not a conversation ending with a
            user turn (roles system, user, assistant; the system message first if any; user and
            assistant in turn; every content a non-blank string); or for a set with no rows.
    """
    items = []
    for source, row in _rows_in(path, on_error="raise", bad_bytes="reject", report=None):
        try:
            messages = _message_list(row, "messages")
            _check_messages_characters(messages)
        except _RecordError as err:
            raise DataError(f"{source}: {err}") from err
        problem = _prompt_problem(messages)
        if problem is not None:
            raise DataError(f"{source}: {problem}")
        info = {k: v for k, v in row.items() if k != "messages"}
        items.append(PromptItem(messages=messages, info=info, source=source))
    if not items:
        raise DataError(f"{path}: no prompt rows (expected JSON Lines of {{'messages': [...], ...}})")
    return items


def _prompt_problem(messages: list[dict]) -> str | None:
    """What makes `messages` no prompt, or None: the checks of data_pipeline/chat.py (a known role,
    string content) and clean.py's turn order, ending with the user turn to answer."""
    if not messages:
        return "'messages' is empty: a prompt needs a user turn to answer"
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            return f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"message {i} ({m['role']}): content must be a non-blank string, got {m['content']!r}"
        if m["role"] == "system" and i > 0:
            return f"message {i}: a system message may only come first"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"message {i + len(messages) - len(turns)}: expected a {expected} turn, got {m['role']}"
    if not turns or turns[-1]["role"] != "user":
        return "the messages must end with the user turn to answer"
    return None


class PromptStream:
    """This rank's endless stream of prompt micro-batches (the dealing is in the module docstring).

    Args:
        items: the prompt set (read_prompts), the same list on every rank.
        prompts_per_batch: prompts in one micro-batch of this rank.
        rank: this rank, in [0, world_size).
        world_size: the data-parallel ranks.
        seed: seeds each epoch's permutation, with the epoch.
    """

    def __init__(self, items: list[PromptItem], *, prompts_per_batch: int, rank: int, world_size: int, seed: int):
        if not items:
            raise ValueError("PromptStream needs at least one prompt")
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be at least 1, got {prompts_per_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.items = items
        self.prompts_per_batch = prompts_per_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._next = 0  # this rank's next micro-batch number; every rank has the same in lockstep
        self._orders: dict[int, list[int]] = {}
        self._digest = _digest(items)

    def __iter__(self) -> Iterator[list[PromptItem]]:
        return self

    def __next__(self) -> list[PromptItem]:
        first = (self._next * self.world_size + self.rank) * self.prompts_per_batch
        self._next += 1
        return [self._at(p) for p in range(first, first + self.prompts_per_batch)]

    @property
    def epoch(self) -> int:
        """The epoch of the next step's first prompt (for logging)."""
        return self._position() // len(self.items)

    def _position(self) -> int:
        """Global prompts dealt to all ranks so far (exact in lockstep)."""
        return self._next * self.world_size * self.prompts_per_batch

    def _at(self, position: int) -> PromptItem:
        epoch, index = divmod(position, len(self.items))
        item = self.items[self._order(epoch)[index]]
        # Copies of the lists and info: the RL loop adds its keys to info (finished, ...), which
        # must not reach the same prompt in a later epoch.
        return replace(item, messages=list(item.messages), info=dict(item.info), epoch=epoch, index=index)

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation of item numbers, from (seed, epoch) alone."""
        if epoch not in self._orders:
            # A string seed is hashed with SHA-512 (not Python's salted hash): every rank and every
            # resume draws the same order.
            order = list(range(len(self.items)))
            random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
            # A micro-batch spans at most a few epochs, and they only move forward.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: plain ints.

        Returns:
            {"position": global prompts dealt to all ranks so far, "seed", "n_items",
            "items_digest": a 63-bit digest of the prompt set}.
        """
        return {
            "position": self._position(),
            "seed": self.seed,
            "n_items": len(self.items),
            "items_digest": self._digest,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`, on any layout whose world_size · prompts_per_batch
        divides the position (the same layout always does): the next micro-batches are those the
        uninterrupted run would have dealt.

        Args:
            state: what `state_dict()` returned.

        Raises:
            DataError: the state is for another seed or prompt set (continuing would change the
                order silently), or its position falls inside one of this layout's micro-batch rounds.
        """
        now = {"seed": self.seed, "n_items": len(self.items), "items_digest": self._digest}
        diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in now.items() if state.get(k) != v]
        if diff:
            raise DataError(
                "prompt stream state saved with " + ", ".join(diff) + ": resume with the run's prompt set and seed"
            )
        per_round = self.world_size * self.prompts_per_batch
        position = int(state["position"])
        if position % per_round:
            raise DataError(
                f"prompt stream state: position {position} is not a multiple of world_size × prompts_per_batch = "
                f"{per_round}: resume with a layout that deals whole rounds from there"
            )
        self._next = position // per_round


def _digest(items: list[PromptItem]) -> int:
    """A 63-bit digest of the prompts and their info, so a resume notices an edited prompt set."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.messages, item.info], sort_keys=True, default=str).encode() + b"\n")
    return int.from_bytes(h.digest()[:8], "big") >> 1
