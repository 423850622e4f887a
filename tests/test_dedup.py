"""Exact and near-duplicate removal, checked against the true Jaccard similarity of shingle sets."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.clean import CleanOptions, clean_conversations
from data_pipeline.dedup import (
    Deduplicator,
    NearDuplicateIndex,
    conversation_dedup_text,
    dedup_conversations,
    dedup_documents,
    estimated_jaccard,
    exact_key,
    minhash_signature,
    shingle_hashes,
    shingles,
)
from data_pipeline.formats import read_conversations, read_documents
from data_pipeline.records import Conversation, Document, DropReport

ROOT = Path(__file__).resolve().parents[1]
LONG = (
    "The quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree. "
    "In the morning the farmer wakes, milks the cows, feeds the hens and walks to the market in town, "
    "where he sells eggs, butter and cheese to the baker, the smith and the schoolteacher. "
    "At noon he eats bread and soup at the inn, talks about the weather with his neighbours, "
    "and in the evening he returns home along the river, counting the coins in his leather purse."
)


def _true_jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)


def _change_words(text: str, every: int) -> str:
    words = text.split()
    return " ".join(w.upper() + "x" if i % every == 0 else w for i, w in enumerate(words))


def test_exact_duplicates_differing_in_case_and_whitespace():
    docs = [
        Document("Hello   World.\nSecond line.", "d:1"),
        Document("hello world. second\tline.", "d:2"),
        Document("  HELLO WORLD. SECOND LINE.  ", "d:3"),
        Document("Hello World. Third line.", "d:4"),
    ]
    report = DropReport()
    kept = list(dedup_documents(docs, report, near_threshold=None))
    assert [d.source for d in kept] == ["d:1", "d:4"]
    assert report.dropped == {"exact_duplicate": 2} and report.examples["exact_duplicate"] == ["d:2", "d:3"]
    assert exact_key("Ａ") != exact_key("A")  # casefold and NFC, not NFKC: full-width stays distinct


def test_near_duplicate_dropped_unrelated_kept():
    near = _change_words(LONG, every=20)  # a few words changed
    unrelated = "Completely different: a recipe for dumplings with pork, cabbage, ginger and soy sauce. " * 4
    assert 0.8 <= _true_jaccard(LONG, near) < 1.0 and _true_jaccard(LONG, unrelated) < 0.1
    docs = [Document(LONG, "a"), Document(near, "b"), Document(unrelated, "c")]
    report = DropReport()
    assert [d.source for d in dedup_documents(docs, report)] == ["a", "c"]
    assert report.dropped == {"near_duplicate": 1} and report.examples["near_duplicate"] == ["b"]
    # Near-dedup off: only exact duplicates go.
    assert len(list(dedup_documents(docs, DropReport(), near_threshold=None))) == 3


def test_chinese_near_duplicate(shared_data):
    chapter = next(read_documents(shared_data / "pretrain" / "journey_to_the_west.txt", split=r"^第.+回")).text[:3000]
    edited = chapter.replace("猴", "猿", 5)
    assert 0.8 < _true_jaccard(chapter, edited) < 1.0
    index = NearDuplicateIndex(threshold=0.8)
    assert index.add("original", minhash_signature(chapter)) is False
    assert index.add("edited", minhash_signature(edited)) is True
    assert index.find(minhash_signature(edited)) == "original"
    assert len(index) == 1


def test_estimated_jaccard_matches_true_jaccard():
    others = [_change_words(LONG, every) for every in (2, 3, 5, 10, 40)] + [LONG[: len(LONG) // 2]]
    for other in others:
        true = _true_jaccard(LONG, other)
        est = estimated_jaccard(minhash_signature(LONG), minhash_signature(other))
        assert abs(est - true) < 0.1, (true, est)


def test_shingle_hashes_are_the_shingle_set(shared_data):
    text = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    # No collisions and the same set definition as `shingles` (normalised, character n-grams).
    assert len(shingle_hashes(text)) == len(shingles(text))
    assert len(shingle_hashes("abc")) == len(shingles("abc")) == 1 and len(shingle_hashes("")) == 0
    assert len(shingle_hashes("天地玄黄宇宙洪荒", ngram=5)) == len(shingles("天地玄黄宇宙洪荒")) == 4


def test_signature_is_deterministic_across_processes():
    text = "同一段文字 the same text"
    sig = minhash_signature(text, num_perm=64)
    assert sig.dtype == np.uint64 and sig.shape == (64,)
    # A fresh interpreter with another str-hash salt (as a Ray worker has) computes the same signature.
    code = f"from data_pipeline.dedup import minhash_signature as m; print(m({text!r}, num_perm=64).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(out.stdout) == sig.tolist()


def test_index_accepts_signatures_from_bytes_and_checks_shape():
    sig = minhash_signature(LONG)
    index = NearDuplicateIndex()
    assert index.add("x", np.frombuffer(sig.tobytes(), dtype=np.uint64)) is False
    assert index.add("y", np.frombuffer(sig.tobytes(), dtype=np.uint64)) is True
    with pytest.raises(ValueError, match="128 values"):
        index.add("z", sig[:64])


def test_deduplicator_sequential_decisions():
    dedup = Deduplicator(near_threshold=0.8)
    sig = minhash_signature(LONG)
    near_sig = minhash_signature(_change_words(LONG, 20))
    assert dedup.check("a", exact_key(LONG), sig) is None
    assert dedup.check("b", exact_key(LONG.upper()), sig) == "exact_duplicate"
    assert dedup.check("c", exact_key("other"), near_sig) == "near_duplicate"
    assert Deduplicator(near_threshold=None).check("a", exact_key(LONG), None) is None


def test_conversation_key_leaves_out_the_system_message():
    a = Conversation(
        [
            {"role": "system", "content": "You are A."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        "a",
    )
    b = Conversation(
        [
            {"role": "system", "content": "You are B."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        "b",
    )
    c = Conversation([{"role": "user", "content": "Hi Yo"}, {"role": "assistant", "content": "!"}], "c")
    a2 = Conversation([{**m} for m in a.messages], "a2")
    assert conversation_dedup_text(a) == conversation_dedup_text(b) == "user: Hi\nassistant: Yo"
    report = DropReport()
    # The same turns under another card (b) are another character's sample; under the same card (a2), a copy.
    assert [x.source for x in dedup_conversations([a, b, c, a2], report)] == ["a", "b", "c"]
    assert report.dropped == {"exact_duplicate": 1} and report.examples["exact_duplicate"] == ["a2"]


def test_near_duplicate_turns_under_different_cards_are_kept(shared_data):
    path = shared_data / "sft" / "rolebench_en_train.jsonl"
    conv = next(read_conversations(path, "rolebench"))
    answer = conv.messages[2]["content"] + " " + LONG  # long enough for a few edits to stay above 0.8
    turns = [conv.messages[1], {"role": "assistant", "content": answer}]
    edited = [turns[0], {"role": "assistant", "content": _change_words(answer, every=25)}]
    card_a, card_b = {"role": "system", "content": conv.messages[0]["content"]}, {"role": "system", "content": "Be B."}
    convs = [
        Conversation([card_a, *turns], "a"),
        Conversation([card_b, *edited], "b"),  # near the first, but another card: kept
        Conversation([card_a, *edited], "a-edited"),  # near the first, same card: dropped
    ]
    assert _true_jaccard(conversation_dedup_text(convs[0]), conversation_dedup_text(convs[1])) > 0.85
    report = DropReport()
    assert [x.source for x in dedup_conversations(convs, report)] == ["a", "b"]
    assert report.dropped == {"near_duplicate": 1} and report.examples["near_duplicate"] == ["a-edited"]


def _edit_characters(text: str, n: int, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(n):
        chars[rng.randrange(len(chars))] = rng.choice("天地玄黄宇宙洪荒abcdefgh")
    return "".join(chars)


@pytest.mark.parametrize("book", ["tinyshakespeare.txt", "journey_to_the_west.txt"])
def test_near_duplicates_are_found_as_the_banding_says(shared_data, book):
    """Pairs of real passages, against their brute-force Jaccard: from 0.95 all are found (the
    default bands make them candidates with probability ~1), well below the threshold none are."""
    text = (shared_data / "pretrain" / book).read_text(encoding="utf-8")
    rng = random.Random(0)
    above, below = [], []
    while len(above) < 40 or len(below) < 20:
        start = rng.randrange(len(text) - 2000)
        a = text[start : start + rng.choice((400, 1000, 2000))]
        b = _edit_characters(a, rng.randrange(1, len(a) // 8), rng)
        true = _true_jaccard(a, b)
        if true >= 0.95 and len(above) < 40:
            above.append((a, b))
        elif true <= 0.7 and len(below) < 20:
            below.append((a, b))
    found = []
    for a, b in above + below:
        index = NearDuplicateIndex(threshold=0.8)
        index.add("a", minhash_signature(a))
        found.append(index.find(minhash_signature(b)) is not None)
    assert all(found[: len(above)]), sum(found[: len(above)])
    assert not any(found[len(above) :])


def test_rolebench_different_answers_to_one_question_are_kept(shared_data):
    path = shared_data / "sft" / "rolebench_en_train.jsonl"
    report = DropReport()
    convs = list(clean_conversations(read_conversations(path, "rolebench", report=report), CleanOptions(), report))
    kept = list(dedup_conversations(convs, report))
    # The reference: the file repeats 196 (role, question, answer) rows verbatim; those, and only
    # those, go as exact duplicates, and no near duplicates are found among the rest, so every
    # distinct answer to a question is kept, including the several answers some questions have.
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    distinct = {(r["question"].strip(), a.strip()) for r in rows for a in r["generated"]}
    pairs = [(c.messages[1]["content"], c.messages[2]["content"]) for c in kept]
    assert len(pairs) == len(set(pairs)) and set(pairs) == distinct
    assert report.dropped == {"exact_duplicate": 196} and len(kept) == len(convs) - 196
    answers_per_question = Counter(q for q, _ in pairs)
    assert sum(n > 1 for n in answers_per_question.values()) >= 10
    # Every record read is kept or dropped with a reason.
    assert report.input_records == len(kept) + sum(report.dropped.values())
