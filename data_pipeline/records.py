"""The typed records that pass between the data stages, and the report of what was dropped.

    importer (formats.py) ─► Document / Conversation ─► clean.py, dedup.py ─► tokenizer.py + chat.py
        ─► Sample (aligned input_ids + labels) ─► shards.py ─► stream.py ─► packed batches

Every stage that drops a record says why through a DropReport, so that nothing disappears
silently and prepare_data can print the table of kept and dropped records per reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input data. The message names the file (and line, shard or key) and what to do."""


@dataclass
class Document:
    """A pretraining document."""

    text: str
    source: str
    """Where it came from, as `path:line` (or `path`, `path#part`), for error messages."""


@dataclass
class Conversation:
    """An SFT example: messages `{"role": system|user|assistant, "content": str}` in order."""

    messages: list[dict[str, str]]
    source: str


@dataclass
class PreferencePair:
    """A preference example: one prompt and two answers to it, the chosen better than the
    rejected. `prompt` is messages (system, user, assistant...) ending with a user turn;
    `chosen` and `rejected` are the assistant message(s) that follow it."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    source: str
    scores: tuple[float, float] | None = None
    """(score_chosen, score_rejected) where the source rates its answers (UltraFeedback)."""


@dataclass
class Sample:
    """One tokenized document or conversation, labels already aligned (labels[t] is the target
    of position t; IGNORE_INDEX where there is none). Both int32, same length.

    A preference pair is one Sample holding two sequences back to back, prompt + chosen then
    prompt + rejected, with `segments` = (their lengths): packing keeps them in one window and
    gives each its own positions and attention (a document of its own)."""

    input_ids: np.ndarray
    labels: np.ndarray
    segments: tuple[int, ...] | None = None
    """The lengths of the sequences held back to back (summing to the length); None: one."""
    ref_logps: np.ndarray | None = None
    """float32, same length: the reference model's log-probability of each label (0 where
    there is none), computed once before preference training."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DropReport:
    """Counts of records read, kept and dropped (by reason), with a few examples per reason."""

    input_records: int = 0
    kept_records: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    modified: Counter = field(default_factory=Counter)
    """Records kept but changed (e.g. earlier turns cut to fit), by reason."""

    def drop(self, reason: str, source: str = "") -> None:
        self.dropped[reason] += 1
        if source and len(self.examples.setdefault(reason, [])) < 5:
            self.examples[reason].append(source)

    def to_dict(self) -> dict:
        return {
            "input_records": self.input_records,
            "kept_records": self.kept_records,
            "dropped": dict(sorted(self.dropped.items())),
            "modified": dict(sorted(self.modified.items())),
        }

    def table(self) -> str:
        """A plain-text table: kept, then each drop reason with its count and first examples."""
        rows = [("read", self.input_records, ""), ("kept", self.kept_records, "")]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            rows.append((f"dropped: {reason}", count, ", ".join(self.examples.get(reason, [])[:3])))
        for reason, count in sorted(self.modified.items()):
            rows.append((f"kept, {reason}", count, ""))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {count:>9,}  {ex}".rstrip() for name, count, ex in rows)


@dataclass
class RenderedChat:
    """A conversation rendered by a chat template: its ids, which of them carry loss, and how many
    each assistant message got (so that a turn left with none is counted, never silently empty)."""

    ids: list[int]
    trained: list[bool]
    """Same length as ids: True for the tokens of an assistant turn's content and its closing
    token(s) (`<|im_end|>`, `<|eot_id|>`, `</s>`); False for headers, system and user turns."""
    turn_tokens: list[int]
    """Trained tokens of each assistant message, in order."""
