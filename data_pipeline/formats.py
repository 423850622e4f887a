"""Importers: files on disk → Document / Conversation / PreferencePair records.

    .txt ─────────────────────────────────────────────► Document (whole file, or cut at `split`)
    .jsonl / .json / .parquet / datasets save_to_disk ─► rows ─► Document (a text field)
                                                              ├► Conversation (messages | sharegpt
                                                              │   | alpaca | rolebench)
                                                              └► PreferencePair (trl | ultrafeedback
                                                                  | alpaca_pref | sharegpt_pref)

Each importer does one thing: turn a row into records. It does not clean (clean.py) or
deduplicate (dedup.py). A bad record either raises a DataError naming `path:line` and the
reason (on_error="raise"), or is counted in the DropReport under one of these reasons and
skipped (on_error="skip"):

    invalid_json       a line (or .json file) that is not valid JSON, or a row that is no object
    missing_field      a row without the field the format needs (text, messages, output, ...)
    undecodable_bytes  bytes that are not UTF-8 (with bad_bytes="reject"; "replace" keeps the
                       record with U+FFFD in their place)
    lone_surrogate     a JSON escape for half of a UTF-16 pair ("\\ud83d" without its low half):
                       not a character, and it would break every later stage that encodes text

Skipping needs a DropReport to count in: on_error="skip" without one is refused, so that no
record disappears uncounted. Some errors are not about one record and raise in either mode: a
.json file that holds JSON Lines (its count would be wrong), a RoleBench role missing from the
profiles file, a missing parquet column.

Sources name where a record came from: `path:LINE` (1-based) for line-based files, `path[i]`
(0-based) for a .json list, a parquet file or a dataset, and `path#k` (1-based) for the k-th
piece of a split .txt file. `report.input_records` counts every record the importer produced
or dropped, so that read == kept + dropped holds at the end of the pipeline; a RoleBench row
with n answers counts as n records.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_pipeline.records import Conversation, DataError, Document, DropReport, PreferencePair

CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca", "rolebench")
PREFERENCE_FORMATS = ("trl", "ultrafeedback", "alpaca_pref", "sharegpt_pref")
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
DOCUMENT_SUFFIXES = (".txt", *ROW_SUFFIXES)

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# CJK Unified Ideographs (+ extension A and compatibility ideographs): enough to tell a Chinese
# RoleBench question from an English one.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# The default persona when no profile is given, in the language of the question.
DEFAULT_PROFILE_EN = "You are {role}. Stay in character: speak in {role}'s voice and keep to what {role} knows."
DEFAULT_PROFILE_ZH = "你是{role}。请始终保持角色：用{role}的口吻说话，只谈{role}所知道的事。"

Row = dict[str, Any]
# Valid UTF-8 never decodes to a lone surrogate, so one in the text came from surrogateescape.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# After that check, a surrogate in a parsed string came from a JSON "\\uXXXX" escape.
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF16_BOMS = ("\udcff\udcfe", "\udcfe\udcff")  # b"\xff\xfe", b"\xfe\xff" after surrogateescape


class _RecordError(Exception):
    """A bad record: `reason` is its DropReport key, the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _reject(err: _RecordError, source: str, on_error: str, report: DropReport | None) -> None:
    """Raise a DataError for a bad record, or count it as dropped (on_error="skip", which
    `_check_modes` only allows with a report)."""
    if on_error == "raise":
        raise DataError(f"{source}: {err}")
    report.drop(err.reason, source)


def _count(report: DropReport | None, n: int = 1) -> None:
    if report is not None:
        report.input_records += n


def _check_modes(on_error: str, bad_bytes: str, report: DropReport | None) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if bad_bytes not in ("reject", "replace"):
        raise ValueError(f"bad_bytes must be 'reject' or 'replace', got {bad_bytes!r}")
    if on_error == "skip" and report is None:
        raise ValueError("on_error='skip' needs a DropReport (report=...) to count the records it skips")


# ---------------------------------------------------------------------------------------------
# Bytes → text


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes of the line) from a file opened in binary mode."""
    try:
        with path.open("rb") as f:
            yield from enumerate(f, start=1)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e


def _decode_line(raw: bytes, lineno: int, bad_bytes: str) -> str:
    """Decode one line as UTF-8 (a leading BOM on line 1 is dropped).

    With bad_bytes="reject" undecodable bytes become lone surrogates (errors="surrogateescape")
    so that the caller can find them with `_has_bad_bytes` after splitting; with "replace" they
    become U+FFFD.
    """
    errors = "replace" if bad_bytes == "replace" else "surrogateescape"
    text = raw.decode("utf-8", errors=errors)
    return text.removeprefix("\ufeff") if lineno == 1 else text


def _has_bad_bytes(text: str) -> bool:
    return _ESCAPED_BYTE.search(text) is not None


def _not_utf8(text: str) -> _RecordError:
    """The error for a text holding undecodable bytes: which byte, and the ways forward."""
    byte = ord(_ESCAPED_BYTE.search(text).group()) - 0xDC00
    if text.startswith(_UTF16_BOMS):
        what, example = "the file starts with a UTF-16 byte-order mark", "iconv -f UTF-16 -t UTF-8"
    else:
        what, example = (
            "the file is in another encoding (GBK, Latin-1, ...) or holds stray bytes",
            "iconv -f GBK -t UTF-8",
        )
    return _RecordError(
        "undecodable_bytes",
        f"not UTF-8 (byte 0x{byte:02X}): {what}. Re-encode it as UTF-8 (e.g. {example}), or replace such "
        "bytes with U+FFFD (prepare_data.py --bad-bytes replace), or drop and count the records that hold "
        "them (--on-error skip)",
    )


def _check_characters(value: str, what: str) -> None:
    """Refuse a string holding a lone surrogate (from a JSON escape such as "\\ud83d")."""
    match = _SURROGATE.search(value)
    if match:
        raise _RecordError(
            "lone_surrogate",
            f"{what} holds a lone surrogate \\u{ord(match.group()):04x} (a JSON escape for half of a "
            "UTF-16 pair, such as an emoji cut in two), which is not a character: fix the escape, or drop "
            "and count such records (prepare_data.py --on-error skip)",
        )


def _bad_line(text: str, first_line: int) -> int:
    """The line number of the first undecodable byte in `text`, which starts at `first_line`."""
    for offset, line in enumerate(text.split("\n")):
        if _has_bad_bytes(line):
            return first_line + offset
    return first_line


# ---------------------------------------------------------------------------------------------
# Files → rows


def _jsonl_rows(path: Path, on_error: str, bad_bytes: str, report: DropReport | None) -> Iterator[tuple[str, Row]]:
    """Rows of a JSON Lines file, one object per non-blank line, as (`path:LINE`, row)."""
    for lineno, raw in _read_lines(path):
        if not raw.strip():
            continue  # blank lines (a trailing newline, spacing) hold no record
        _count(report)
        source = f"{path}:{lineno}"
        try:
            yield source, _parse_row(_decode_line(raw, lineno, bad_bytes))
        except _RecordError as err:
            _reject(err, source, on_error, report)


def _parse_row(text: str) -> Row:
    return _parse_json(text, dict, "a JSON object")


def _parse_json_list(text: str) -> list:
    return _parse_json(text, list, "a JSON list of objects")


def _parse_json(text: str, expected: type, what: str):
    if _has_bad_bytes(text):
        raise _not_utf8(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _RecordError("invalid_json", f"invalid JSON: {e}") from e
    if not isinstance(value, expected):
        raise _RecordError("invalid_json", f"expected {what}, got {type(value).__name__}")
    return value


def _json_rows(path: Path, on_error: str, bad_bytes: str, report: DropReport | None) -> Iterator[tuple[str, Row]]:
    """Rows of a .json file holding a list of objects, as (`path[i]`, row).

    The file is one JSON value, so a decode or parse error drops the whole file (counted as one
    record, named by the line of the error). A file holding JSON Lines is an error in either
    mode: skipping it would count its many records as one.
    """
    text = "".join(_decode_line(raw, lineno, bad_bytes) for lineno, raw in _read_lines(path))
    if not text.strip():
        return
    try:
        rows = _parse_json_list(text)
    except _RecordError as err:
        cause = err.__cause__
        if isinstance(cause, json.JSONDecodeError) and cause.msg == "Extra data":
            raise DataError(
                f"{path}:{cause.lineno}: a second JSON value starts here, after a complete first one: the file "
                f"looks like JSON Lines (one value per line); name it {path.with_suffix('.jsonl').name}"
            ) from cause
        _count(report)
        line = _bad_line(text, 1) if err.reason == "undecodable_bytes" else getattr(err.__cause__, "lineno", 1)
        _reject(err, f"{path}:{line}", on_error, report)
        return
    for i, row in enumerate(rows):
        _count(report)
        if isinstance(row, dict):
            yield f"{path}[{i}]", row
        else:
            err = _RecordError("invalid_json", f"expected a JSON object, got {type(row).__name__}")
            _reject(err, f"{path}[{i}]", on_error, report)


def _parquet_rows(path: Path, columns: list[str] | None, report: DropReport | None) -> Iterator[tuple[str, Row]]:
    """Rows of a parquet file, as (`path[i]`, row); only `columns` are read when given."""
    import pyarrow.parquet as pq  # lazily: only parquet inputs pay for the import

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types (OSError, ArrowInvalid) for bad files
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
    if missing:
        # A missing column is a schema error for every row: raise whatever on_error says.
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
    i = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            _count(report)
            yield f"{path}[{i}]", row
            i += 1


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets.Dataset(Dict).save_to_disk`.

    Args:
        path: a folder.

    Returns:
        True when the folder holds the files save_to_disk writes.
    """
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _saved_dataset_rows(path: Path, columns: list[str] | None, report: DropReport | None) -> Iterator[tuple[str, Row]]:
    """Rows of a `save_to_disk` folder, as (`path[i]`, or `path/split[i]` for a DatasetDict)."""
    import datasets  # lazily: the import takes about a second

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for bad folders
        raise DataError(f"{path}: cannot load with datasets.load_from_disk: {e}") from e
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for name, ds in sorted(splits, key=lambda kv: kv[0]):
        missing = [c for c in columns or [] if c not in ds.column_names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {ds.column_names})")
        prefix = f"{path}/{name}" if name else str(path)
        for i, row in enumerate(ds.select_columns(columns) if columns else ds):
            _count(report)
            yield f"{prefix}[{i}]", row


def _folder_entries(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The inputs found under a folder, sorted: files with one of `suffixes`, and save_to_disk
    folders as a whole (their own .json files are metadata, not rows). Hidden folders are skipped.
    """
    entries = []
    for folder, subdirs, files in os.walk(path):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for d in list(subdirs):
            if is_saved_dataset(Path(folder, d)):
                entries.append(Path(folder, d))
                subdirs.remove(d)
        entries += [Path(folder, f) for f in files if Path(f).suffix in suffixes and not f.startswith(".")]
    if not entries:
        raise DataError(f"{path}: no supported files in this folder (looked for {', '.join(suffixes)})")
    return sorted(entries)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")


def iter_rows(
    path: str | Path,
    *,
    columns: list[str] | None = None,
    on_error: str = "raise",
    bad_bytes: str = "reject",
    report: DropReport | None = None,
) -> Iterator[tuple[str, Row]]:
    """Read the rows (JSON objects) of a .jsonl, .json or .parquet file or a save_to_disk folder.

    Args:
        path: the file or folder.
        columns: for parquet and datasets, the columns to read (missing ones are a DataError).
        on_error: "raise" a DataError on a bad row, or "skip" it and count it in `report`.
        bad_bytes: "reject" rows with bytes that are not UTF-8 (an error, or counted under
            "skip"), or "replace" those bytes with U+FFFD.
        report: counts rows read and dropped (required with on_error="skip").

    Returns:
        An iterator of (source, row).
    """
    _check_modes(on_error, bad_bytes, report)
    path = Path(path)
    _check_exists(path)
    if path.is_dir() and is_saved_dataset(path):
        return _saved_dataset_rows(path, columns, report)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, on_error, bad_bytes, report)
    if path.suffix == ".json":
        return _json_rows(path, on_error, bad_bytes, report)
    if path.suffix == ".parquet":
        return _parquet_rows(path, columns, report)
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(ROW_SUFFIXES)})")


# ---------------------------------------------------------------------------------------------
# Documents


def _compile_split(split: str | re.Pattern) -> re.Pattern:
    """A split pattern in multiline mode, so that `^` anchors at every line start."""
    if isinstance(split, re.Pattern):
        return re.compile(split.pattern, split.flags | re.MULTILINE)
    return re.compile(split, re.MULTILINE)


def _text_documents(
    path: Path, split: str | re.Pattern | None, on_error: str, bad_bytes: str, report: DropReport | None
) -> Iterator[Document]:
    """The documents of a .txt file: the whole file, or the pieces cut before each `split` match.

    Blank pieces (such as the newline before the first chapter heading) are not records and are
    passed over. With bad_bytes="reject", a piece holding undecodable bytes is an error naming
    the line of its first bad byte, or (on_error="skip") is dropped whole and counted.
    """
    text = "".join(_decode_line(raw, lineno, bad_bytes) for lineno, raw in _read_lines(path))
    starts = [0]
    if split is not None:
        # Each match opens a new piece and stays at its head: a chapter heading belongs to its chapter.
        starts += [m.start() for m in _compile_split(split).finditer(text) if m.start() > 0]
    bounds = zip(starts, [*starts[1:], len(text)], strict=True)
    pieces = [(text[a:b], text.count("\n", 0, a) + 1) for a, b in bounds]
    pieces = [(piece, line) for piece, line in pieces if piece.strip()]
    for k, (piece, first_line) in enumerate(pieces, start=1):
        _count(report)
        source = f"{path}#{k}" if split is not None else str(path)
        if _has_bad_bytes(piece):
            _reject(_not_utf8(piece), f"{path}:{_bad_line(piece, first_line)}", on_error, report)
            continue
        yield Document(text=piece, source=source)


def _row_document(source: str, row: Row, text_field: str) -> Document:
    text = row.get(text_field)
    if text is None:
        raise _RecordError("missing_field", f"no {text_field!r} field (keys: {sorted(row)})")
    if not isinstance(text, str):
        raise _RecordError("missing_field", f"field {text_field!r} is a {type(text).__name__}, not a string")
    _check_characters(text, f"field {text_field!r}")
    return Document(text=text, source=source)


def read_documents(
    path: str | Path,
    *,
    text_field: str = "text",
    split: str | re.Pattern | None = None,
    on_error: str = "raise",
    bad_bytes: str = "reject",
    report: DropReport | None = None,
) -> Iterator[Document]:
    """Read pretraining documents from a file or folder.

    A .txt file is one document, or with `split` the pieces that each match of the regex
    opens (sources `path#k`). .jsonl/.json/.parquet files and `save_to_disk` folders give one
    document per row from `text_field`. Any other folder is read file by file (sorted, found
    recursively, .txt/.jsonl/.json/.parquet only).

    Args:
        path: a file or folder.
        text_field: the row field that holds the text.
        split: for .txt files, a regex (compiled in multiline mode; e.g. r"^第.+回" for chapter
            headings) whose every match starts a new document, the match kept at its head. A
            literal separator works as is when it has no regex metacharacters; else pass it
            through re.escape.
        on_error: "raise" a DataError on a bad record, or "skip" it and count it in `report`.
        bad_bytes: "reject" records with bytes that are not UTF-8 (an error naming the line of
            the first bad byte, or dropped and counted under "skip"), or "replace" those bytes
            with U+FFFD.
        report: counts records read and dropped (kept is counted by the caller at the end);
            required with on_error="skip".

    Returns:
        An iterator of Documents.
    """
    _check_modes(on_error, bad_bytes, report)
    path = Path(path)
    _check_exists(path)
    if path.is_dir() and not is_saved_dataset(path):
        for file in _folder_entries(path, DOCUMENT_SUFFIXES):
            yield from read_documents(
                file, text_field=text_field, split=split, on_error=on_error, bad_bytes=bad_bytes, report=report
            )
        return
    if path.suffix == ".txt":
        yield from _text_documents(path, split, on_error, bad_bytes, report)
        return
    for source, row in iter_rows(path, columns=[text_field], on_error=on_error, bad_bytes=bad_bytes, report=report):
        try:
            yield _row_document(source, row, text_field)
        except _RecordError as err:
            _reject(err, source, on_error, report)


# ---------------------------------------------------------------------------------------------
# Conversations: one converter per format, row → list of message lists


def _field(row: Row, key: str, kind: type = str) -> Any:
    """row[key], which must be present and of `kind`."""
    value = row.get(key)
    if value is None:
        raise _RecordError("missing_field", f"no {key!r} field (keys: {sorted(row)})")
    if not isinstance(value, kind):
        raise _RecordError("missing_field", f"field {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _optional_text(row: Row, key: str) -> str | None:
    """row[key] when it is a non-blank string, else None (an optional field left empty)."""
    value = row.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _content_text(content: Any) -> Any:
    """OpenAI content given as a list of parts → the joined text parts; anything else as is.

    A missing or non-text content is passed on unchanged so that the cleaner drops the
    conversation as "empty_turn" and counts it.
    """
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def _from_messages(row: Row, profiles: dict[str, str] | None) -> list[list[dict]]:
    """OpenAI chat: {"messages": [{"role", "content"}, ...]}."""
    return [_message_list(row, "messages")]


def _message_list(row: Row, key: str) -> list[dict]:
    """row[key] as messages: a list of {"role", "content"} objects (OpenAI content parts joined)."""
    messages = _field(row, key, list)
    if not all(isinstance(m, dict) for m in messages):
        raise _RecordError("missing_field", f"every item of {key!r} must be an object with 'role' and 'content'")
    return [{"role": m.get("role"), "content": _content_text(m.get("content"))} for m in messages]


def _from_sharegpt(row: Row, profiles: dict[str, str] | None) -> list[list[dict]]:
    """ShareGPT: {"conversations": [{"from", "value"}, ...]}, optional top-level "system"."""
    turns = _field(row, "conversations", list)
    if not all(isinstance(t, dict) for t in turns):
        raise _RecordError("missing_field", "every item of 'conversations' must be an object with 'from' and 'value'")
    # Unknown speakers pass through unchanged, so that the cleaner drops them as "unknown_role".
    messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in turns]
    system = _optional_text(row, "system")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return [messages]


def _from_alpaca(row: Row, profiles: dict[str, str] | None) -> list[list[dict]]:
    """Alpaca: instruction (+ optional input), output; optional system and history [[q, a], ...]."""
    prompt = _alpaca_prompt(row)
    return [[*prompt, {"role": "assistant", "content": _field(row, "output")}]]


def _alpaca_prompt(row: Row) -> list[dict]:
    """The messages of an alpaca row up to its question: the optional system message, the
    history exchanges, then the instruction with its `input` after a blank line."""
    instruction = _field(row, "instruction")
    extra_input = _optional_text(row, "input")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    system = _optional_text(row, "system")
    messages = [{"role": "system", "content": system}] if system else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise _RecordError("missing_field", f"each 'history' item must be a [question, answer] pair, got {pair!r}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return [*messages, {"role": "user", "content": prompt}]


def default_profile(role: str, question: str) -> str:
    """The one-line persona used when no profile is given for a RoleBench role.

    Args:
        role: the character's name.
        question: the user's question; CJK characters in it choose the Chinese wording.

    Returns:
        The system message text.
    """
    template = DEFAULT_PROFILE_ZH if _CJK.search(question) else DEFAULT_PROFILE_EN
    return template.format(role=role)


def _profile(role: str, question: str, profiles: dict[str, str] | None) -> str:
    """The system message of a RoleBench role: its profile, or the default card without profiles.

    A role missing from a profiles file is an error, not a quiet fallback to the one-line card:
    the file was meant to describe every character.
    """
    if profiles is None:
        return default_profile(role, question)
    profile = profiles.get(role.strip())
    if profile is None:
        where = getattr(profiles, "path", None) or "the profiles given"
        known = ", ".join(sorted(profiles)[:10]) + (", ..." if len(profiles) > 10 else "")
        raise DataError(
            f"role {role!r} has no profile in {where} (it has: {known}); add one, or leave out the profiles "
            "to give every role the default one-line card"
        )
    return profile


def _from_rolebench(row: Row, profiles: dict[str, str] | None) -> list[list[dict]]:
    """RoleBench: {"role", "question", "generated": [answer, ...]} → one conversation per answer."""
    role, question = _field(row, "role"), _field(row, "question")
    answers = row.get("generated")
    answers = [answers] if isinstance(answers, str) else answers
    if not answers or not isinstance(answers, list):
        raise _RecordError("missing_field", f"no answers in 'generated' (keys: {sorted(row)})")
    system = _profile(role, question, profiles)
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        for answer in answers
    ]


_CONVERTERS: dict[str, Callable[[Row, dict[str, str] | None], list[list[dict]]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "rolebench": _from_rolebench,
}


def read_conversations(
    path: str | Path,
    fmt: str,
    *,
    profiles: dict[str, str] | None = None,
    on_error: str = "raise",
    bad_bytes: str = "reject",
    report: DropReport | None = None,
) -> Iterator[Conversation]:
    """Read SFT conversations from a .jsonl/.json/.parquet file, a save_to_disk folder or a folder
    of such files.

    Formats (multi-turn in all of them):
      messages   {"messages": [{"role", "content"}, ...]} (OpenAI)
      sharegpt   {"conversations": [{"from", "value"}, ...]}; human→user, gpt→assistant,
                 system→system, other speakers kept as is (the cleaner drops them)
      alpaca     {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
      rolebench  {"role", "question", "generated": [answer, ...]}: one conversation per answer,
                 the system message being profiles[role] (a role missing from the profiles is a
                 DataError in either mode), or `default_profile` when no profiles are given

    Roles and contents are passed on as found; checking them is clean.py's job.

    Args:
        path: a file or folder.
        fmt: one of CONVERSATION_FORMATS.
        profiles: for rolebench, role → persona text (see load_profiles).
        on_error: "raise" a DataError on a bad record, or "skip" it and count it in `report`.
        bad_bytes: "reject" lines with bytes that are not UTF-8 (an error, or dropped and
            counted under "skip"), or "replace" those bytes with U+FFFD.
        report: counts records read and dropped; required with on_error="skip".

    Returns:
        An iterator of Conversations, sources `path:LINE` (`path:LINE#k` for the k-th of several
        RoleBench answers) or `path[i]`.
    """
    if fmt not in _CONVERTERS:
        raise DataError(f"unknown conversation format {fmt!r} (expected one of {', '.join(CONVERSATION_FORMATS)})")
    for source, row in _rows_in(path, on_error, bad_bytes, report):
        try:
            conversations = _CONVERTERS[fmt](row, profiles)
        except _RecordError as err:
            _reject(err, source, on_error, report)
            continue
        except DataError as err:  # not about this row alone (a role without a profile): name the row
            raise DataError(f"{source}: {err}") from err
        _count(report, len(conversations) - 1)  # the row was counted once; each answer is a record
        for k, messages in enumerate(conversations, start=1):
            conv = Conversation(messages=messages, source=f"{source}#{k}" if len(conversations) > 1 else source)
            try:
                _check_messages_characters(messages)
            except _RecordError as err:
                _reject(err, conv.source, on_error, report)
                continue
            yield conv


def _rows_in(path: str | Path, on_error: str, bad_bytes: str, report: DropReport | None) -> Iterator[tuple[str, Row]]:
    """The rows of a row file, a save_to_disk folder, or every such file under a folder (sorted)."""
    _check_modes(on_error, bad_bytes, report)
    path = Path(path)
    _check_exists(path)
    files = _folder_entries(path, ROW_SUFFIXES) if path.is_dir() and not is_saved_dataset(path) else [path]
    for file in files:
        yield from iter_rows(file, on_error=on_error, bad_bytes=bad_bytes, report=report)


def _check_messages_characters(messages: list[dict]) -> None:
    """Refuse a conversation whose role or content strings hold a lone surrogate."""
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            if isinstance(m.get(key), str):
                _check_characters(m[key], f"message {i} {key}")


# ---------------------------------------------------------------------------------------------
# Preference pairs: one converter per format, row → (prompt, chosen, rejected, scores)

_PairParts = tuple[list[dict], list[dict], list[dict], tuple[float, float] | None]


def _text_or_messages(row: Row, key: str, role: str) -> list[dict]:
    """row[key] as messages: a string is one message of `role`, a list is messages as given
    (TRL takes either, and a dataset may mix them row by row)."""
    value = row.get(key)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if value is not None and not isinstance(value, list):
        raise _RecordError(
            "missing_field", f"field {key!r} is a {type(value).__name__}, not a string or a list of messages"
        )
    return _message_list(row, key)


def _same_message(a: dict, b: dict) -> bool:
    """Whether two raw messages are the same turn (contents compared without outer whitespace,
    which exporters add or drop: UltraFeedback's prompt and its copy in `chosen`)."""
    ca, cb = a.get("content"), b.get("content")
    if isinstance(ca, str) and isinstance(cb, str):
        ca, cb = ca.strip(), cb.strip()
    return a.get("role") == b.get("role") and ca == cb


def _after_prompt(prompt: list[dict], messages: list[dict]) -> list[dict]:
    """A completion without its head where that head repeats the prompt (UltraFeedback and some
    TRL exports give full conversations; one that is only the prompt is left empty, and dropped
    as "empty_completion"). A head that differs stays: the completion then opens with a user
    turn, which the cleaner drops as "prompt_mismatch"."""
    n = len(prompt)
    if len(messages) >= n and all(_same_message(p, m) for p, m in zip(prompt, messages, strict=False)):
        return messages[n:]
    return messages


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of two full conversations: the prompt is their longest common
    prefix of whole messages, but at most all messages but the last, so that each completion
    keeps one (TRL's extract_prompt does the same; identical conversations become a pair whose
    chosen equals its rejected, dropped as such)."""
    n, limit = 0, min(len(chosen), len(rejected)) - 1
    while n < limit and _same_message(chosen[n], rejected[n]):
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _with_system(row: Row, prompt: list[dict]) -> list[dict]:
    """The prompt with the row's optional top-level `system` text first, unless it has one."""
    system = _optional_text(row, "system")
    if system and not (prompt and prompt[0].get("role") == "system"):
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _pair_from_trl(row: Row) -> _PairParts:
    """TRL: prompt/chosen/rejected as strings (standard) or message lists (conversational), or
    no prompt and chosen/rejected full conversations sharing it as their prefix (implicit)."""
    chosen = _text_or_messages(row, "chosen", "assistant")
    rejected = _text_or_messages(row, "rejected", "assistant")
    if row.get("prompt") is None:
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise _RecordError(
                "missing_field", f"no 'prompt' field, which string chosen/rejected need (keys: {sorted(row)})"
            )
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    else:
        prompt = _text_or_messages(row, "prompt", "user")
        chosen, rejected = _after_prompt(prompt, chosen), _after_prompt(prompt, rejected)
    return _with_system(row, prompt), chosen, rejected, None


def _scores(row: Row) -> tuple[float, float] | None:
    """(score_chosen, score_rejected), or None when the row has neither."""
    chosen, rejected = row.get("score_chosen"), row.get("score_rejected")
    if chosen is None and rejected is None:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (chosen, rejected)):
        raise _RecordError(
            "missing_field", f"'score_chosen' and 'score_rejected' must both be numbers, got {chosen!r}, {rejected!r}"
        )
    return float(chosen), float(rejected)


def _pair_from_ultrafeedback(row: Row) -> _PairParts:
    """UltraFeedback binarized: prompt string; chosen/rejected full [user, assistant] lists."""
    prompt = [{"role": "user", "content": _field(row, "prompt")}]
    chosen = _after_prompt(prompt, _message_list(row, "chosen"))
    rejected = _after_prompt(prompt, _message_list(row, "rejected"))
    return prompt, chosen, rejected, _scores(row)


def _pair_from_alpaca(row: Row) -> _PairParts:
    """LLaMA-Factory ranking alpaca: the alpaca prompt, chosen/rejected answer strings."""
    prompt = _alpaca_prompt(row)
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}], None


def _sharegpt_turn(row: Row, key: str) -> dict:
    turn = _field(row, key, dict)
    return {"role": SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), "content": turn.get("value")}


def _pair_from_sharegpt(row: Row) -> _PairParts:
    """LLaMA-Factory ranking sharegpt: the conversation up to the question, and one turn object
    each for chosen and rejected."""
    (prompt,) = _from_sharegpt(row, None)
    return prompt, [_sharegpt_turn(row, "chosen")], [_sharegpt_turn(row, "rejected")], None


_PAIR_CONVERTERS: dict[str, Callable[[Row], _PairParts]] = {
    "trl": _pair_from_trl,
    "ultrafeedback": _pair_from_ultrafeedback,
    "alpaca_pref": _pair_from_alpaca,
    "sharegpt_pref": _pair_from_sharegpt,
}


def read_preference_pairs(
    path: str | Path,
    fmt: str,
    *,
    on_error: str = "raise",
    bad_bytes: str = "reject",
    report: DropReport | None = None,
) -> Iterator[PreferencePair]:
    """Read preference pairs from a .jsonl/.json/.parquet file, a save_to_disk folder or a folder
    of such files.

    Formats:
      trl            {"prompt", "chosen", "rejected"} as strings (the prompt one user message,
                     an optional "system" before it) or as message lists (conversational); without
                     "prompt", chosen and rejected are full conversations split after their longest
                     common prefix of whole messages. String or list is decided per row.
      ultrafeedback  {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant],
                     "score_chosen", "score_rejected"} (UltraFeedback binarized); scores kept
      alpaca_pref    {"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}
                     (LLaMA-Factory ranking; the prompt built as the alpaca format builds it)
      sharegpt_pref  {"conversations": [{"from", "value"}, ...] ending with a human turn (else
                     the cleaner drops it as "turn_order"), "chosen": {"from": "gpt", "value"},
                     "rejected": {...}, "system"?}

    A completion that repeats the prompt at its head (full conversations) loses that head. What
    is left is checked by clean.check_pair, not here: a completion that does not open with an
    assistant turn (chosen and rejected under different prompts) is "prompt_mismatch" there.

    Args:
        path: a file or folder.
        fmt: one of PREFERENCE_FORMATS.
        on_error: "raise" a DataError on a bad record, or "skip" it and count it in `report`.
        bad_bytes: "reject" lines with bytes that are not UTF-8 (an error, or dropped and
            counted under "skip"), or "replace" those bytes with U+FFFD.
        report: counts records read and dropped; required with on_error="skip".

    Returns:
        An iterator of PreferencePairs, sources `path:LINE` or `path[i]`.
    """
    if fmt not in _PAIR_CONVERTERS:
        raise DataError(f"unknown preference format {fmt!r} (expected one of {', '.join(PREFERENCE_FORMATS)})")
    for source, row in _rows_in(path, on_error, bad_bytes, report):
        try:
            prompt, chosen, rejected, scores = _PAIR_CONVERTERS[fmt](row)
            _check_messages_characters([*prompt, *chosen, *rejected])
        except _RecordError as err:
            _reject(err, source, on_error, report)
            continue
        yield PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=source, scores=scores)


class Profiles(dict):
    """Role → persona text for the rolebench format, remembering the file it was loaded from
    (`path`) so that errors can name it."""

    def __init__(self, by_role: dict[str, str], path: Path):
        super().__init__(by_role)
        self.path = path


def load_profiles(path: str | Path) -> Profiles:
    """Load character profiles (role → persona text) for the rolebench format.

    Role names are stripped of surrounding whitespace (`"张飞 "` is 张飞's profile); two names
    that are the same once stripped are an error.

    Args:
        path: a .json or .yaml/.yml file holding one mapping of role name to text.

    Returns:
        The mapping (a dict that also knows its `path`).
    """
    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise DataError(f"{path}: profiles must be a .json or .yaml/.yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read profiles: {e}") from e
    profiles = _parse_json_or_yaml(path, text)
    if not isinstance(profiles, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in profiles.items()
    ):
        raise DataError(f"{path}: profiles must map each role name to its persona text (a string)")
    by_role: dict[str, str] = {}
    for role, text in profiles.items():
        if role.strip() in by_role:
            raise DataError(f"{path}: role {role.strip()!r} is given twice (names are compared without spaces)")
        try:
            _check_characters(role + text, f"the profile of {role.strip()!r}")
        except _RecordError as err:
            raise DataError(f"{path}: {err}") from err
        by_role[role.strip()] = text
    return Profiles(by_role, path)


def _parse_json_or_yaml(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON: {e}") from e
    import yaml  # lazily: only YAML profiles need it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: invalid YAML: {e}") from e
