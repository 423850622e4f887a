"""Preference data (issue 20): the four importers, the pair's drop reasons, the rendered pair (loss on
the completions only, over-length policy), pair dedup, and one end-to-end `prepare_data.py pref` run."""

import json
import re

import numpy as np
import pytest

from data_pipeline.chat import COMPLETION_CUT, COMPLETION_CUT_TO_NOTHING, encode_pair
from data_pipeline.clean import CleanOptions, clean_pairs
from data_pipeline.dedup import dedup_pairs
from data_pipeline.formats import read_preference_pairs
from data_pipeline.records import DataError, DropReport, PreferencePair
from data_pipeline.shards import load_manifest, read_shard
from data_pipeline.tokenizer import load_tokenizer
from model.loss import IGNORE_INDEX
from tests.test_prepare_data import prepare
from tests.test_tokenizer import small_tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def _pairs(path, fmt, **kwargs):
    return list(read_preference_pairs(path, fmt, **kwargs))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


# --- importers ------------------------------------------------------------------------------


def test_trl_standard_strings_with_system(tmp_path):
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "Who goes there?", "chosen": "A friend.", "rejected": "None of your business."},
            {"system": "You are a guard.", "prompt": "Halt!", "chosen": "I halt.", "rejected": "No."},
        ],
    )
    first, second = _pairs(path, "trl")
    assert first == PreferencePair(
        [user("Who goes there?")], [assistant("A friend.")], [assistant("None of your business.")], f"{path}:1"
    )
    assert second.prompt == [system("You are a guard."), user("Halt!")] and second.source == f"{path}:2"
    assert second.chosen == [assistant("I halt.")] and second.rejected == [assistant("No.")]


def test_trl_conversational_explicit_prompt_and_full_conversations(tmp_path):
    prompt = [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye")]
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": prompt, "chosen": [assistant("Farewell.")], "rejected": [assistant("Whatever.")]},
            # chosen/rejected repeating the prompt at their head lose it
            {"prompt": prompt, "chosen": [*prompt, assistant("Farewell.")], "rejected": [assistant("Whatever.")]},
        ],
    )
    for pair in _pairs(path, "trl"):
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, [assistant("Farewell.")], [assistant("Whatever.")])


def test_trl_implicit_prompt_is_the_longest_common_prefix_of_whole_messages(tmp_path):
    shared = [user("Hi"), assistant("Hello."), user("What colour is the sky?")]
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"chosen": [*shared, assistant("Blue.")], "rejected": [*shared, assistant("Blue, like cheese.")]},
            # the completion may run on over several turns
            {
                "chosen": [*shared, assistant("Blue."), user("Sure?"), assistant("Yes.")],
                "rejected": [*shared, assistant("Green.")],
            },
        ],
    )
    first, second = _pairs(path, "trl")
    assert first.prompt == shared and first.chosen == [assistant("Blue.")]
    assert first.rejected == [assistant("Blue, like cheese.")]
    assert second.prompt == shared and second.chosen == [assistant("Blue."), user("Sure?"), assistant("Yes.")]


def test_ultrafeedback_strips_the_prompt_from_full_lists_and_keeps_scores(tmp_path):
    row = {
        "prompt": "Name a river.",
        "prompt_id": "abc",
        "chosen": [user("Name a river."), assistant("The Yangtze.")],
        "rejected": [user("Name a river."), assistant("A mountain.")],
        "messages": [user("Name a river."), assistant("The Yangtze.")],
        "score_chosen": 8.5,
        "score_rejected": 3,
    }
    jsonl = _jsonl(tmp_path / "u.jsonl", [row])
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "u.parquet"  # how the dataset is published
    pq.write_table(pa.Table.from_pylist([row]), parquet)
    for path, source in ((jsonl, f"{jsonl}:1"), (parquet, f"{parquet}[0]")):
        (pair,) = _pairs(path, "ultrafeedback")
        assert pair == PreferencePair(
            [user("Name a river.")], [assistant("The Yangtze.")], [assistant("A mountain.")], source, (8.5, 3.0)
        )


def test_alpaca_pref_builds_the_prompt_as_alpaca_does(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "goodbye"},
        {"system": "Be brief.", "instruction": "Bye", "history": [["Hi", "Hello."]], "chosen": "Bye.", "rejected": ""},
    ]
    first, second = _pairs(_jsonl(tmp_path / "a.jsonl", rows), "alpaca_pref")
    assert first.prompt == [user("Translate\n\nbonjour")]
    assert (first.chosen, first.rejected) == ([assistant("hello")], [assistant("goodbye")])
    assert second.prompt == [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye")]


def test_sharegpt_pref_maps_speakers(tmp_path):
    turns = [("human", "Hi"), ("gpt", "Hello."), ("human", "Bye")]
    row = {
        "system": "Be brief.",
        "conversations": [{"from": speaker, "value": text} for speaker, text in turns],
        "chosen": {"from": "gpt", "value": "Farewell."},
        "rejected": {"from": "gpt", "value": "Whatever."},
    }
    answered = {**row, "conversations": row["conversations"][:2]}  # ends with a gpt turn: no question left
    path = _jsonl(tmp_path / "s.jsonl", [row, answered])
    pair, _ = _pairs(path, "sharegpt_pref")
    assert pair.prompt == [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye")]
    assert (pair.chosen, pair.rejected) == ([assistant("Farewell.")], [assistant("Whatever.")])
    report = DropReport()
    assert [p.source for p in clean_pairs(_pairs(path, "sharegpt_pref"), CleanOptions(), report)] == [f"{path}:1"]
    assert report.examples == {"turn_order": [f"{path}:2"]}


# --- drop reasons -----------------------------------------------------------------------------


def test_each_drop_reason_is_counted_with_its_source(tmp_path):
    good = {"prompt": "Who goes there?", "chosen": "A friend.", "rejected": "Go away."}
    opening = [user("Hi"), assistant("Hey.")]
    rows = [
        good,
        {"prompt": "Same?", "chosen": "<b>Yes.</b>", "rejected": " Yes. "},  # equal once cleaned
        {"prompt": "Empty?", "chosen": "Here.", "rejected": "<p></p>"},
        # an explicit prompt that chosen's own head contradicts
        {"prompt": "Hi", "chosen": [user("Hello?"), assistant("Yes.")], "rejected": [user("Hi"), assistant("No.")]},
        # an implicit split that stops short of an assistant turn: the two differ at a user turn
        {"chosen": [*opening, user("A?"), assistant("a")], "rejected": [*opening, user("B?"), assistant("b")]},
        {"prompt": "No rejected", "chosen": "Hm."},
        '{"prompt": oops}',
    ]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    report = DropReport()
    pairs = read_preference_pairs(path, "trl", on_error="skip", report=report)
    kept = list(clean_pairs(pairs, CleanOptions(), report))
    assert [p.source for p in kept] == [f"{path}:1"]
    assert report.input_records == len(rows)
    expected = {
        "chosen_equals_rejected": [2],
        "empty_completion": [3],
        "prompt_mismatch": [4, 5],
        "missing_field": [6],
        "invalid_json": [7],
    }
    assert report.dropped == {reason: len(lines) for reason, lines in expected.items()}
    assert report.examples == {reason: [f"{path}:{n}" for n in lines] for reason, lines in expected.items()}


def test_invalid_json_line_raises_naming_path_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        _pairs(path, "trl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: no 'conversations' field"):
        _pairs(path, "sharegpt_pref")  # a row of another format: its missing field, named


def test_completion_cut_to_fit_and_cut_to_nothing(tok):
    pair = PreferencePair(
        [user("Tell me a long story about the river.")],
        [assistant("Once upon a time a river ran through the town, and the town loved it well.")],
        [assistant("No.")],
        "p.jsonl:1",
    )
    whole, note = encode_pair(pair, tok)
    assert note is None
    long_side, short_side = whole.segments
    cut, note = encode_pair(pair, tok, max_len=short_side + 2)
    assert note == COMPLETION_CUT and cut.segments == (short_side + 2, short_side)
    np.testing.assert_array_equal(
        cut.input_ids[: short_side + 2], whole.input_ids[: short_side + 2]
    )  # the prompt whole
    prompt_only = len(tok.encode_chat(pair.prompt, add_generation_prompt=True).ids)
    assert encode_pair(pair, tok, max_len=prompt_only - 1) == (None, COMPLETION_CUT_TO_NOTHING)


# --- the rendered pair ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["crucible", "qwen2.5"])
def any_tok(request, tok, tmp_path_factory):
    """Crucible's own ChatML tokenizer, and a Hugging Face one with Qwen 2.5's published template
    (its default system message, masks derived by rendering)."""
    if request.param == "crucible":
        return tok
    from tests.hf_fixtures import qwen2_tokenizer

    return load_tokenizer(qwen2_tokenizer(tmp_path_factory.mktemp("qwen")))


def test_labels_are_the_completion_and_its_end_of_turn_only(any_tok):
    prompt = [system("You are a guard."), user("Who goes there?"), assistant("Halt, stranger."), user("A friend.")]
    pair = PreferencePair(prompt, [assistant("Pass, friend.")], [assistant("Begone.")], "p.jsonl:1")
    sample, note = encode_pair(pair, any_tok)
    assert note is None and sample.segments is not None
    first, second = sample.segments
    assert first + second == len(sample) == len(sample.labels)
    for (start, end), answer in (((0, first), "Pass, friend."), ((first, first + second), "Begone.")):
        labels = sample.labels[start:end]
        assert any_tok.decode(labels[labels != IGNORE_INDEX]) == answer + "<|im_end|>"
        # aligned within its own sequence: the label at t is the id at t + 1
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        ids = sample.input_ids[start:end]
        np.testing.assert_array_equal(labels[trained[:-1]], ids[trained[:-1] + 1])
    # the two sequences share the prompt, earlier assistant turn included, and it carries no loss
    np.testing.assert_array_equal(sample.input_ids[: trained[0]], sample.input_ids[first : first + trained[0]])
    assert "Halt" not in any_tok.decode(sample.labels[sample.labels != IGNORE_INDEX])


# --- dedup ------------------------------------------------------------------------------------


def test_a_copy_repeats_prompt_chosen_and_rejected_under_the_same_card():
    def pair(source, chosen="A friend.", rejected="Go away.", card="You are a guard."):
        return PreferencePair(
            [system(card), user("Who goes there?")], [assistant(chosen)], [assistant(rejected)], source
        )

    pairs = [
        pair("a:1"),
        pair("a:2"),  # a copy
        pair("a:3", chosen="Go away.", rejected="A friend."),  # swapped: the opposite preference, not a copy
        pair("a:4", rejected="Leave at once."),  # same prompt and chosen, another rejected: kept
        pair("a:5", card="You are a poet."),  # another card
        pair("a:6", rejected="Go away!"),  # nearly a copy of a:1
    ]
    report = DropReport()
    kept = [p.source for p in dedup_pairs(pairs, report, near_threshold=None)]
    assert kept == ["a:1", "a:3", "a:4", "a:5", "a:6"] and report.examples == {"exact_duplicate": ["a:2"]}
    # Near-dedup judges the texts: the swapped pair holds the same ones (Jaccard 0.92 here)
    report = DropReport()
    kept = [p.source for p in dedup_pairs(pairs, report, near_threshold=0.8)]
    assert kept == ["a:1", "a:4", "a:5"]
    assert report.examples == {"exact_duplicate": ["a:2"], "near_duplicate": ["a:3", "a:6"]}


# --- launch/prepare_data.py pref --------------------------------------------------------------

_SUBJECTS = ["river", "bridge", "market", "temple", "orchard", "harbour", "forest", "mill", "tower", "well"]
_WHEN = ["at dawn", "in winter"]


def _pref_rows():
    """20 distinct UltraFeedback rows, a copy of one and one with equal answers."""
    rows = []
    for subject in _SUBJECTS:
        for when in _WHEN:
            question = f"What happens at the {subject} {when}?"
            rows.append(
                {
                    "prompt": question,
                    "chosen": [
                        user(question),
                        assistant(f"The {subject} wakes slowly {when}; {len(rows)} lamps glow."),
                    ],
                    "rejected": [user(question), assistant(f"Nothing happens at any {subject}, ever.")],
                    "score_chosen": 8.0,
                    "score_rejected": 2.0,
                }
            )
    same = {**rows[0], "rejected": rows[0]["chosen"]}
    return [*rows, rows[5], same]


def test_prepare_data_pref_writes_preference_shards(tok, tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", _pref_rows())
    out = tmp_path / "out"
    result = prepare(
        "pref", "--format", "ultrafeedback", "--input", str(path), "--tokenizer", str(tok.path.parent),
        "--out", str(out), "--max-len", "256", "--show-masks", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[chosen]" in result.stdout and "⟦The river wakes slowly at dawn" in result.stdout
    manifest = load_manifest(out)
    assert manifest["kind"] == "preference"
    assert manifest["dropped"] == {"exact_duplicate": 1, "chosen_equals_rejected": 1}
    assert manifest["input_records"] == 22 and manifest["kept_records"] == manifest["samples"] == 20
    assert re.search(rf"dropped: exact_duplicate +1 +{re.escape(str(path))}:21", result.stdout), result.stdout
    stats = manifest["extra"]["preference"]
    assert stats["format"] == "ultrafeedback" and stats["pairs"] == 20 and stats["scored_pairs"] == 20
    assert (stats["mean_score_chosen"], stats["mean_score_rejected"]) == (8.0, 2.0)
    samples = [s for entry in manifest["shards"] for s in read_shard(out / entry["path"], on_error="raise")]
    assert len(samples) == 20 and all(s.segments is not None and sum(s.segments) == len(s) for s in samples)
    first = samples[0]
    end = first.segments[0]
    chosen = first.labels[:end][first.labels[:end] != IGNORE_INDEX]
    assert tok.decode(chosen) == "The river wakes slowly at dawn; 0 lamps glow.<|im_end|>"


def test_pref_needs_a_tokenizer_and_a_preference_format(tmp_path, capsys):
    from launch.prepare_data import parse_args

    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    for argv, expected in (
        (["pref", "--format", "trl", "--input", str(path), "--out", str(tmp_path / "o")], "pref needs --tokenizer"),
        (["pref", "--format", "messages", "--input", str(path), "--out", str(tmp_path / "o")], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert expected in capsys.readouterr().err
