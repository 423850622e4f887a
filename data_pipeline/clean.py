"""Cleaning and filtering: normalise text, then drop the records that are not fit to train on.

    Document     ─► clean_text ─► drop "empty" | "too_short" | "too_long"
    Conversation ─► clean_text on every content ─► check_conversation ─► drop one of:
        "unknown_role"        a role outside CleanOptions.allowed_roles (e.g. sharegpt "bing")
        "no_turns"            no user or assistant message at all
        "empty_turn"          a message whose content is missing or empty after cleaning
        "system_not_first"    a system message anywhere but first
        "turn_order"          after the optional system: not user, assistant, user, ... in turn
        "no_assistant_reply"  the conversation does not end with an assistant message
    PreferencePair ─► clean_text on every content ─► check_pair ─► drop "unknown_role", or one of:
        "prompt_mismatch"         chosen or rejected does not open with an assistant turn: the two
                                  were not answers to the same prompt (a row whose explicit prompt
                                  their own heads contradict, or whose implicit split falls short
                                  of an assistant turn)
        "empty_completion"        chosen or rejected has no message, or an empty one
        (prompt + chosen, then prompt + rejected: check_conversation's reasons)
        "chosen_equals_rejected"  the two completions are the same: nothing to prefer

Every drop is counted in the DropReport with the record's source. What is too long for a
conversation depends on tokens, so that policy lives in chat.py, not here.
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from data_pipeline.records import ROLES, Conversation, Document, DropReport, PreferencePair

# Only real tags are stripped: a known HTML tag name, then well-formed attributes (name=value,
# name="...", name='...', or a bare name from HTML's boolean attributes), then an optional "/".
# Prose, maths and code keep their angle brackets: "if a<b and c>d", "while (lo<b && hi>0)",
# "当x<a 且 y>b 时", vector<int>, List<String>. "<b and c>" is syntactically a tag, but bare
# attribute names other than HTML's boolean ones (disabled, nowrap, ...) are not written in HTML.
_BLOCK_TAGS = (
    "p|br|div|li|ul|ol|dl|dt|dd|h[1-6]|tr|td|th|table|thead|tbody|tfoot|blockquote|pre|hr|section|article|header|footer"
)
_INLINE_TAGS = "a|b|i|u|s|em|strong|span|font|small|big|sub|sup|code|tt|img|center|html|head|body|title|meta|link|nav"
_BOOLEAN_ATTRS = (
    "allowfullscreen|async|autofocus|autoplay|checked|compact|controls|default|defer|disabled|hidden|inert|ismap|"
    "itemscope|loop|multiple|muted|nohref|noshade|novalidate|nowrap|open|readonly|required|reversed|selected"
)
_ATTR_VALUE = r"""(?:"[^"<]*"|'[^'<]*'|[^\s"'=<>`]+)"""  # quoted values may hold ">" but not "<"
_ATTR = rf"(?:[a-z_:][-a-z0-9_:.]*\s*=\s*{_ATTR_VALUE}|(?:{_BOOLEAN_ATTRS}))"
_TAG_ATTRS = rf"(?:\s+{_ATTR})*\s*/?>"
# Block-level tags end a paragraph: they become a line break, so that "</p><p>" separates
# paragraphs instead of gluing them together.
_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS}){_TAG_ATTRS}", re.IGNORECASE)
_INLINE_TAG = re.compile(rf"</?(?:{_INLINE_TAGS}){_TAG_ATTRS}|<!--.*?-->", re.IGNORECASE | re.DOTALL)
# C0 and C1 control characters except \t and \n (\r is turned into \n first), and the byte-order
# mark / zero-width no-break space that editors leave at the start of files.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
# Complete character references only. html.unescape also rewrites legacy names without a
# semicolon, so that a URL's "?id=1&copy=2&not=3" would become "?id=1©=2¬=3".
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def _unescape(match: re.Match) -> str:
    entity = match.group()
    if entity[1] == "#":
        return html.unescape(entity)  # numeric: HTML's rules (out of range, surrogates → U+FFFD)
    return html.entities.html5.get(entity[1:], entity)  # an unknown name stays as written


def clean_text(text: str) -> str:
    """Normalise a text for training.

    In order: CRLF/CR → LF; HTML tags stripped (block tags such as <p>, <br/>, </div> become a
    line break, inline ones like <b> vanish; only real tag syntax, see _TAG_ATTRS) and complete
    entities (&amp; &#123; &#x1F;) unescaped; control characters removed
    (except \\n and \\t); Unicode NFC; trailing spaces on each line trimmed; runs of blank lines
    collapsed to a single blank line; both ends stripped.

    Args:
        text: raw text.

    Returns:
        The cleaned text (possibly empty).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _BLOCK_TAG.sub("\n", text)
    text = _INLINE_TAG.sub("", text)
    # After tag stripping, so that an escaped "&lt;p&gt;" stays as the text "<p>".
    text = _ENTITY.sub(_unescape, text)
    text = _CONTROL.sub("", text)
    # NFC last among the character edits: unescaping can produce decomposed sequences.
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


@dataclass
class CleanOptions:
    """What the cleaner keeps."""

    min_chars: int = 16
    """Documents shorter than this after cleaning are dropped ("too_short"); shorter ones are
    mostly fragments (a lone heading, a page number). Conversations are not length-filtered here."""
    max_chars: int | None = None
    """Documents longer than this after cleaning are dropped ("too_long"); None keeps all."""
    allowed_roles: tuple[str, ...] = ROLES
    """Roles a conversation may use; any other is "unknown_role". A subset of ROLES (for
    example ("user", "assistant") to refuse system prompts)."""

    def __post_init__(self) -> None:
        if self.min_chars < 1:
            raise ValueError(f"min_chars must be at least 1, got {self.min_chars}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be at least min_chars ({self.min_chars})")
        unknown = set(self.allowed_roles) - set(ROLES)
        if unknown:
            raise ValueError(f"allowed_roles must be a subset of {ROLES}, got {sorted(unknown)}")


def document_drop_reason(text: str, opts: CleanOptions) -> str | None:
    """Why a cleaned document text is dropped, or None to keep it.

    Args:
        text: the cleaned text.
        opts: the length limits.

    Returns:
        "empty", "too_short", "too_long" or None.
    """
    if not text:
        return "empty"
    if len(text) < opts.min_chars:
        return "too_short"
    if opts.max_chars is not None and len(text) > opts.max_chars:
        return "too_long"
    return None


def clean_documents(docs: Iterable[Document], opts: CleanOptions, report: DropReport) -> Iterator[Document]:
    """Clean each document's text and drop the ones that are empty, too short or too long.

    Args:
        docs: documents from an importer.
        opts: the length limits.
        report: where the drops are counted, with their sources.

    Returns:
        An iterator of cleaned documents.
    """
    for doc in docs:
        text = clean_text(doc.text)
        reason = document_drop_reason(text, opts)
        if reason is not None:
            report.drop(reason, doc.source)
            continue
        yield Document(text=text, source=doc.source)


def check_conversation(conv: Conversation, allowed_roles: tuple[str, ...] = ROLES) -> str | None:
    """Why a conversation is unfit for SFT, or None when it is fit.

    A fit conversation is: an optional system message, then user and assistant messages in
    turn starting with user and ending with assistant, none of them empty.

    Args:
        conv: the conversation (contents already cleaned).
        allowed_roles: the roles it may use.

    Returns:
        The first drop reason that applies ("unknown_role", "no_turns", "empty_turn", "system_not_first",
        "turn_order", "no_assistant_reply") or None.
    """
    roles = [m.get("role") for m in conv.messages]
    if any(r not in allowed_roles for r in roles):
        return "unknown_role"
    if not any(r in ("user", "assistant") for r in roles):
        return "no_turns"
    if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in conv.messages):
        return "empty_turn"
    if "system" in roles[1:]:
        return "system_not_first"
    turns = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)):
        return "turn_order"
    if turns[-1] != "assistant":
        return "no_assistant_reply"
    return None


def _clean_message(message: dict) -> dict:
    content = message.get("content")
    # A missing or non-string content is left as is for check_conversation to report.
    return {"role": message.get("role"), "content": clean_text(content) if isinstance(content, str) else content}


def clean_conversations(
    convs: Iterable[Conversation], opts: CleanOptions, report: DropReport
) -> Iterator[Conversation]:
    """Clean every message's content and drop the conversations that `check_conversation` refuses.

    Args:
        convs: conversations from an importer.
        opts: the cleaning options (allowed_roles; the length limits are for documents only).
        report: where the drops are counted, with their sources.

    Returns:
        An iterator of cleaned conversations (messages as {"role", "content"} only).
    """
    for conv in convs:
        cleaned = Conversation(messages=[_clean_message(m) for m in conv.messages], source=conv.source)
        reason = check_conversation(cleaned, opts.allowed_roles)
        if reason is not None:
            report.drop(reason, conv.source)
            continue
        yield cleaned


def check_pair(pair: PreferencePair, allowed_roles: tuple[str, ...] = ROLES) -> str | None:
    """Why a preference pair is unfit, or None when it is fit.

    A fit pair is a prompt that ends with a user turn and two different, non-empty completions
    that each open with an assistant turn, prompt + completion being a fit conversation
    (`check_conversation`) either way.

    Args:
        pair: the pair (contents already cleaned).
        allowed_roles: the roles it may use.

    Returns:
        The first drop reason that applies, in the order of the module docstring, or None.
    """
    messages = [*pair.prompt, *pair.chosen, *pair.rejected]
    if any(m.get("role") not in allowed_roles for m in messages):
        return "unknown_role"
    completions = (pair.chosen, pair.rejected)
    if any(c and c[0].get("role") != "assistant" for c in completions):
        return "prompt_mismatch"
    if any(not c or any(not isinstance(m.get("content"), str) or not m["content"] for m in c) for c in completions):
        return "empty_completion"
    for completion in completions:
        reason = check_conversation(Conversation([*pair.prompt, *completion], pair.source), allowed_roles)
        if reason is not None:
            return reason
    if pair.chosen == pair.rejected:
        return "chosen_equals_rejected"
    return None


def clean_pairs(pairs: Iterable[PreferencePair], opts: CleanOptions, report: DropReport) -> Iterator[PreferencePair]:
    """Clean every message's content and drop the pairs that `check_pair` refuses.

    Args:
        pairs: preference pairs from an importer.
        opts: the cleaning options (allowed_roles; the length limits are for documents only).
        report: where the drops are counted, with their sources.

    Returns:
        An iterator of cleaned pairs (messages as {"role", "content"} only; scores kept).
    """
    for pair in pairs:
        cleaned = PreferencePair(
            prompt=[_clean_message(m) for m in pair.prompt],
            chosen=[_clean_message(m) for m in pair.chosen],
            rejected=[_clean_message(m) for m in pair.rejected],
            source=pair.source,
            scores=pair.scores,
        )
        reason = check_pair(cleaned, opts.allowed_roles)
        if reason is not None:
            report.drop(reason, pair.source)
            continue
        yield cleaned
