"""Importers on the real files in ../shared/data and on small files of every format written here."""

import json
import re

import pytest

from data_pipeline.formats import default_profile, iter_rows, load_profiles, read_conversations, read_documents
from data_pipeline.records import DataError, DropReport

CHAPTER = r"^第.+回"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- real data ---------------------------------------------------------------------------


def test_tinyshakespeare_is_one_document(shared_data):
    path = shared_data / "pretrain" / "tinyshakespeare.txt"
    report = DropReport()
    docs = list(read_documents(path, report=report))
    assert len(docs) == 1
    assert docs[0].text == path.read_text(encoding="utf-8")
    assert docs[0].source == str(path)
    assert report.input_records == 1 and not report.dropped


def test_journey_to_the_west_splits_into_its_100_chapters(shared_data):
    path = shared_data / "pretrain" / "journey_to_the_west.txt"
    raw = path.read_bytes().decode("utf-8")
    # The reference: the chapter headings as the data has them, one per line, "第一回：..." to "第一零零回：...".
    headings = re.findall(r"^第.+?回：", raw, re.MULTILINE)
    assert len(headings) == 100
    report = DropReport()
    docs = list(read_documents(path, split=CHAPTER, report=report))
    assert len(docs) == 100 and report.input_records == 100
    assert [d.text.split("：", 1)[0] + "：" for d in docs] == headings
    assert docs[0].text.startswith("第一回：灵根育孕源流出") and docs[-1].text.startswith("第一零零回：径回东土")
    assert [d.source for d in docs] == [f"{path}#{k}" for k in range(1, 101)]
    # Nothing lost: the pieces are the file minus the blank line before chapter 1.
    assert "".join(d.text for d in docs) == raw[raw.index("第一回") :]
    assert raw[: raw.index("第一回")].strip() == ""


def test_split_accepts_a_compiled_pattern_and_a_literal(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n===\ntwo\n===\nthree\n", encoding="utf-8")
    assert [d.text for d in read_documents(path, split="===")] == ["one\n", "===\ntwo\n", "===\nthree\n"]
    assert len(list(read_documents(path, split=re.compile(r"^=+$")))) == 3
    assert len(list(read_documents(path, split=re.escape("***")))) == 1  # no match: one document


@pytest.mark.parametrize("name", ["rolebench_zh_train", "rolebench_en_train", "rolebench_zh_test"])
def test_rolebench_gives_one_conversation_per_generated_answer(shared_data, name):
    path = shared_data / "sft" / f"{name}.jsonl"
    rows = _rows(path)
    report = DropReport()
    convs = list(read_conversations(path, "rolebench", report=report))
    assert len(convs) == sum(len(r["generated"]) for r in rows) == report.input_records
    expected = [(r["role"], r["question"], answer) for r in rows for answer in r["generated"]]
    for conv, (role, question, answer) in zip(convs, expected, strict=True):
        assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
        assert conv.messages[1]["content"] == question and conv.messages[2]["content"] == answer
        assert conv.messages[0]["content"] == default_profile(role, question)
        assert role in conv.messages[0]["content"]
    assert len({c.source for c in convs}) == len(convs)  # several answers: path:LINE#k


def test_rolebench_system_message_from_profiles_file(shared_data, tmp_path):
    path = shared_data / "sft" / "rolebench_zh_train.jsonl"
    roles = sorted({r["role"] for r in _rows(path)})
    assert len(roles) == 5 and "张飞" in roles
    profile_file = tmp_path / "profiles.yaml"
    # Keys are stripped: "张飞 " (a trailing space, easily typed) is 张飞's profile.
    profile_file.write_text("".join(f'"{r} ": 你是{r}，本色出演。\n' for r in roles), encoding="utf-8")
    profiles = load_profiles(profile_file)
    convs = list(read_conversations(path, "rolebench", profiles=profiles))
    assert {c.messages[0]["content"] for c in convs} == {f"你是{r}，本色出演。" for r in roles}


def test_rolebench_role_missing_from_profiles_is_an_error(shared_data, tmp_path):
    profile_file = tmp_path / "profiles.yaml"
    profile_file.write_text("孙悟空: 你是齐天大圣孙悟空，花果山美猴王。\n李白: 你是诗仙李白。\n", encoding="utf-8")
    profiles = load_profiles(profile_file)
    path = shared_data / "sft" / "rolebench_zh_train.jsonl"
    first_missing = next(r["role"] for r in _rows(path) if r["role"] not in profiles)
    for on_error in ("raise", "skip"):
        with pytest.raises(
            DataError, match=rf"role '{first_missing}' has no profile in {re.escape(str(profile_file))}"
        ):
            list(read_conversations(path, "rolebench", profiles=profiles, on_error=on_error, report=DropReport()))


def test_load_profiles_strips_keys_and_refuses_clashes(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"张飞 ": "燕人张翼德。", " 李白": "诗仙。"}, ensure_ascii=False), encoding="utf-8")
    assert load_profiles(path) == {"张飞": "燕人张翼德。", "李白": "诗仙。"}
    path.write_text(json.dumps({"张飞": "a", "张飞 ": "b"}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="张飞"):
        load_profiles(path)


def test_default_profile_language_follows_the_question():
    assert default_profile("张飞", "三将军，你怎么看？").startswith("你是张飞。")
    assert default_profile("Jack Sparrow", "Where is the Black Pearl?").startswith("You are Jack Sparrow.")


def test_load_profiles_json_and_bad_files(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"Coriolanus": "A proud Roman general."}), encoding="utf-8")
    assert load_profiles(good) == {"Coriolanus": "A proud Roman general."}
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.yaml"):
        load_profiles(bad)
    not_a_map = tmp_path / "list.json"
    not_a_map.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError, match="list.json"):
        load_profiles(not_a_map)
    with pytest.raises(DataError, match="missing.yaml"):
        load_profiles(tmp_path / "missing.yaml")


# --- conversation formats on small files --------------------------------------------------

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Farewell."},
]


def test_messages_format_multi_turn_jsonl_and_json(tmp_path):
    rows = [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[1:3], "id": 7}]
    jsonl = _write_jsonl(tmp_path / "chat.jsonl", rows)
    as_json = tmp_path / "chat.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8")
    for path, sources in [(jsonl, [f"{jsonl}:1", f"{jsonl}:2"]), (as_json, [f"{as_json}[0]", f"{as_json}[1]"])]:
        convs = list(read_conversations(path, "messages"))
        assert [c.messages for c in convs] == [MULTI_TURN, MULTI_TURN[1:3]]
        assert [c.source for c in convs] == sources


def test_messages_content_parts_are_joined(tmp_path):
    parts = [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": "x"},
        {"type": "text", "text": "2+2?"},
    ]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": parts}]}])
    assert next(read_conversations(path, "messages")).messages[0]["content"] == "What is 2+2?"


def test_sharegpt_maps_speakers_and_passes_unknown_ones(tmp_path):
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Farewell."},
    ]
    path = _write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"conversations": turns},
            {"conversations": [{"from": "bing", "value": "?"}]},
            {"system": "S", "conversations": turns[1:3]},
        ],
    )
    convs = list(read_conversations(path, "sharegpt"))
    assert convs[0].messages == MULTI_TURN
    assert convs[1].messages == [{"role": "bing", "content": "?"}]
    assert convs[2].messages == [{"role": "system", "content": "S"}, *MULTI_TURN[1:3]]


def test_alpaca_with_input_system_and_history(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {
            "instruction": "Bye",
            "input": "",
            "output": "Farewell.",
            "system": "Be brief.",
            "history": [["Hi", "Hello."]],
        },
    ]
    convs = list(read_conversations(_write_jsonl(tmp_path / "a.jsonl", rows), "alpaca"))
    assert convs[0].messages == [
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert convs[1].messages == MULTI_TURN


# --- document formats: jsonl, json, parquet, datasets, folders -----------------------------


def test_documents_from_jsonl_and_json(tmp_path):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [{"body": "first"}, {"body": "second"}])
    docs = list(read_documents(jsonl, text_field="body"))
    assert [(d.text, d.source) for d in docs] == [("first", f"{jsonl}:1"), ("second", f"{jsonl}:2")]
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert [(d.text, d.source) for d in read_documents(as_json)] == [("a", f"{as_json}[0]"), ("b", f"{as_json}[1]")]


def test_parquet_documents_and_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), path)
    report = DropReport()
    docs = list(read_documents(path, report=report))
    assert [(d.text, d.source) for d in docs] == [
        ("alpha", f"{path}[0]"),
        ("beta", f"{path}[1]"),
        ("gamma", f"{path}[2]"),
    ]
    assert report.input_records == 3
    with pytest.raises(DataError, match="no column 'body'"):
        list(read_documents(path, text_field="body"))
    chats = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": MULTI_TURN}]), chats)
    assert next(read_conversations(chats, "messages")).messages == MULTI_TURN


def test_datasets_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    docs = list(read_documents(tmp_path / "ds"))
    assert [(d.text, d.source) for d in docs] == [("one", f"{tmp_path / 'ds'}[0]"), ("two", f"{tmp_path / 'ds'}[1]")]
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"messages": MULTI_TURN}]),
            "test": datasets.Dataset.from_list([{"messages": MULTI_TURN[1:3]}]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    convs = list(read_conversations(tmp_path / "dd", "messages"))
    assert [c.messages for c in convs] == [MULTI_TURN[1:3], MULTI_TURN]  # splits in sorted order
    assert convs[0].source == f"{tmp_path / 'dd'}/test[0]"


def test_folder_reads_every_supported_file_sorted(tmp_path):
    import datasets

    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["from ds"]}).save_to_disk(str(tmp_path / "c_ds"))
    assert [d.text for d in read_documents(tmp_path)] == ["from a", "from b", "from ds"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no supported files"):
        list(read_documents(tmp_path / "empty"))


def test_iter_rows_rejects_unknown_types(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        iter_rows(path)
    with pytest.raises(DataError, match="unknown conversation format 'chatml'"):
        list(read_conversations(path, "chatml"))


# --- errors ------------------------------------------------------------------------------


def test_invalid_json_line_raises_with_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: invalid JSON: Expecting value"):
        list(read_documents(path))


def test_invalid_json_line_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n[1]\n{"text": "fine"}\n', encoding="utf-8")
    report = DropReport()
    assert [d.text for d in read_documents(path, on_error="skip", report=report)] == ["ok", "fine"]
    assert report.input_records == 4
    assert report.dropped == {"invalid_json": 2}
    assert report.examples["invalid_json"] == [f"{path}:2", f"{path}:3"]


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: invalid JSON"):
        list(read_documents(path))
    report = DropReport()
    assert list(read_documents(path, on_error="skip", report=report)) == []
    assert report.dropped == {"invalid_json": 1} and report.input_records == 1


def test_undecodable_bytes_skipped_and_counted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1") + b'{"text": "ok2"}\n')
    report = DropReport()
    assert [d.text for d in read_documents(path, on_error="skip", report=report)] == ["ok", "ok2"]
    assert report.dropped == {"undecodable_bytes": 1}
    assert report.examples["undecodable_bytes"] == [f"{path}:2"]
    assert report.input_records == 3


def _not_utf8(path, line):
    """The error for a file that is not UTF-8: its first bad line, and the ways forward."""
    return rf"{re.escape(str(path))}:{line}: not UTF-8 .*Re-encode.*--bad-bytes replace"


def test_undecodable_bytes_raise_naming_the_first_bad_line(tmp_path):
    gbk_text = "第一回 猴王出世\n" + "话表美猴王得了姓名，怡然踊跃。\n" * 3
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(gbk_text.encode("gbk"))
    with pytest.raises(DataError, match=_not_utf8(gbk, 1)):
        list(read_documents(gbk))
    row = json.dumps({"role": "孙悟空", "question": "你是谁？", "generated": ["俺老孙！"]}, ensure_ascii=False)
    gbk_jsonl = tmp_path / "gbk.jsonl"
    gbk_jsonl.write_bytes(("\n".join([row] * 3)).encode("gbk"))
    with pytest.raises(DataError, match=_not_utf8(gbk_jsonl, 1)):
        list(read_conversations(gbk_jsonl, "rolebench"))
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(f"{row}\n".encode("utf-16"))
    with pytest.raises(DataError, match=r":1: not UTF-8 .*UTF-16"):
        list(read_conversations(utf16, "rolebench"))
    # One stray byte deep in a book that is not split: the error names its line.
    book = tmp_path / "book.txt"
    book.write_bytes(b"line\n" * 500 + b"bad \xff byte\n" + b"line\n" * 500)
    with pytest.raises(DataError, match=_not_utf8(book, 501)):
        list(read_documents(book))
    as_json = tmp_path / "rows.json"
    as_json.write_bytes(b'[\n{"text": "a"},\n{"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=_not_utf8(as_json, 3)):
        list(read_documents(as_json))


def test_undecodable_bytes_replaced(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    report = DropReport()
    assert [d.text for d in read_documents(path, bad_bytes="replace", report=report)] == ["caf\ufffd"]
    assert not report.dropped


def test_undecodable_bytes_in_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"CHAPTER 1\nfine\nCHAPTER 2\nbad \xff byte\nCHAPTER 3\nfine\n")
    report = DropReport()
    assert list(read_documents(path, on_error="skip", report=report)) == []
    assert report.dropped == {"undecodable_bytes": 1} and report.examples["undecodable_bytes"] == [f"{path}:4"]
    report = DropReport()
    docs = list(read_documents(path, split="^CHAPTER", on_error="skip", report=report))
    assert [d.source for d in docs] == [f"{path}#1", f"{path}#3"]  # only the piece holding the bad byte goes
    assert report.examples["undecodable_bytes"] == [f"{path}:4"] and report.input_records == 3
    with pytest.raises(DataError, match=_not_utf8(path, 4)):
        list(read_documents(path, split="^CHAPTER"))
    kept = list(read_documents(path, bad_bytes="replace"))
    assert "bad \ufffd byte" in kept[0].text


def test_skipping_needs_a_report_to_count_in(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="report"):
        list(read_documents(path, on_error="skip"))
    with pytest.raises(ValueError, match="report"):
        list(read_conversations(path, "messages", on_error="skip"))
    with pytest.raises(ValueError, match="report"):
        iter_rows(path, on_error="skip")


def test_lone_surrogate_escape_raises_or_is_counted(tmp_path):
    # "\ud83d" is half of an emoji's UTF-16 pair; "\udc80" the form a stray byte takes in Python.
    path = tmp_path / "sur.jsonl"
    path.write_text(
        '{"text": "fine"}\n{"text": "broken emoji \\ud83d here"}\n{"text": "escaped \\udc80 byte"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: .*lone surrogate"):
        list(read_documents(path))
    report = DropReport()
    assert [d.text for d in read_documents(path, on_error="skip", report=report)] == ["fine"]
    assert report.dropped == {"lone_surrogate": 2} and report.examples["lone_surrogate"] == [f"{path}:2", f"{path}:3"]
    chats = tmp_path / "c.jsonl"
    rows = [{"role": "r", "question": "q", "generated": ["good", "bad \ud83d"]}, {"messages": []}]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # ASCII: escapes kept
    with pytest.raises(DataError, match=rf"{re.escape(str(chats))}:1#2: .*lone surrogate"):
        list(read_conversations(chats, "rolebench"))
    report = DropReport()
    convs = list(read_conversations(chats, "rolebench", on_error="skip", report=report))
    assert [c.source for c in convs] == [f"{chats}:1#1"]  # the good answer of the row stays
    assert report.dropped == {"lone_surrogate": 1, "missing_field": 1} and report.input_records == 3
    as_json = tmp_path / "sur.json"
    as_json.write_text('[{"text": "ok"}, {"text": "x \\udfff"}]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(as_json))}\[1\]: .*lone surrogate"):
        list(read_documents(as_json))


def test_json_lines_in_a_json_file_is_an_error_in_either_mode(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: .*JSON Lines.*\.jsonl"):
            list(read_documents(path, on_error=on_error, report=DropReport()))


def test_empty_files_yield_nothing(tmp_path):
    for name in ("e.txt", "e.jsonl", "e.json"):
        (tmp_path / name).write_bytes(b"")
        report = DropReport()
        assert list(read_documents(tmp_path / name, report=report)) == []
        assert report.input_records == 0 and not report.dropped
    report = DropReport()
    assert list(read_conversations(tmp_path / "e.jsonl", "messages", report=report)) == []
    assert report.input_records == 0 and not report.dropped


def test_missing_file_names_the_path(tmp_path):
    for path in (tmp_path / "nope.txt", tmp_path / "nope.jsonl", tmp_path / "nope.parquet"):
        with pytest.raises(DataError, match=re.escape(str(path))):
            list(read_documents(path))
    with pytest.raises(DataError, match="nope.jsonl"):
        list(read_conversations(tmp_path / "nope.jsonl", "rolebench"))


def test_missing_field_raise_and_skip(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"body": "b"}, {"text": None}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: no 'text' field"):
        list(read_documents(path))
    report = DropReport()
    assert [d.text for d in read_documents(path, on_error="skip", report=report)] == ["a"]
    assert report.dropped == {"missing_field": 2} and report.examples["missing_field"] == [f"{path}:2", f"{path}:3"]
    chats = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"question": "q", "generated": ["a"]}, {"instruction": "i"}, {"role": "r", "question": "q", "generated": []}],
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(chats))}:1: no 'role' field"):
        list(read_conversations(chats, "rolebench"))
    report = DropReport()
    assert list(read_conversations(chats, "rolebench", on_error="skip", report=report)) == []
    assert report.dropped == {"missing_field": 3}
    with pytest.raises(DataError, match=r":1: no 'instruction' field"):
        list(read_conversations(chats, "alpaca", on_error="raise"))
