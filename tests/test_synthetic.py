"""The synthetic game world of the quick start: determinism, facts stated where they must be (and
nowhere they must not be), disjoint train/eval wordings, the held-out split, and file formats."""

import json
import re
import sys

import pytest

from data_pipeline import synthetic
from data_pipeline.clean import clean_text
from data_pipeline.dedup import conversation_dedup_text, exact_key
from data_pipeline.formats import read_conversations, read_documents
from data_pipeline.records import Conversation
from data_pipeline.sp_tokenizer import SPECIAL_TOKENS
from data_pipeline.synthetic import (
    CARD_FIELDS,
    EVAL_QUESTIONS,
    FIELDS,
    SOCIAL_FIELDS,
    TRAIN_QUESTIONS,
    character_card,
    make_world,
    write_corpus,
)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus at its defaults, with the world and the data read back."""
    paths = write_corpus(tmp_path_factory.mktemp("synthetic"))
    world = make_world()
    chats = _jsonl(paths["sft_train"]) + _jsonl(paths["sft_val"])
    by_card = {character_card(c): c for c in world.characters}
    return {
        "paths": paths,
        "world": world,
        "lore": [row["text"] for row in _jsonl(paths["lore"])],
        "chats": chats,
        # each character's chats, found by its card (the system message)
        "chats_of": {
            c.name: [ch for ch in chats if by_card[ch["messages"][0]["content"]] == c] for c in world.characters
        },
        "facts": _jsonl(paths["eval_facts"]),
        "lore_items": _jsonl(paths["eval_lore"]),
    }


def _exchanges(chat):
    """(question, answer) pairs of a chat."""
    turns = chat["messages"][1:]
    return [(q["content"], a["content"]) for q, a in zip(turns[::2], turns[1::2], strict=True)]


def _field_of(question):
    return next(f for f, qs in TRAIN_QUESTIONS.items() if question in qs)


# --- determinism and the world ---------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sizes = {"n_characters": 6, "n_lore_docs": 60, "n_chats_per_character": 10}
    a, b, c = (write_corpus(tmp_path / name, seed=seed, **sizes) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
        assert a[name].read_bytes() != c[name].read_bytes(), name


@pytest.mark.parametrize("seed, n", [(0, 3), (0, 16), (1, 16), (7, synthetic.MAX_CHARACTERS)])
def test_world_is_well_formed(seed, n):
    world = make_world(seed, n)
    names = [c.name for c in world.characters]
    towns = {p.name for p in world.places}
    assert len(set(names)) == n
    # No name inside another, so that "the expected name appears in the answer" is unambiguous.
    assert not any(a.lower() in b.lower() for a in names for b in names if a != b)
    assert len({c.item for c in world.characters}) == len({c.catchphrase for c in world.characters}) == n
    for c in world.characters:
        assert len({c.name, c.ally, c.rival}) == 3 and {c.ally, c.rival} <= set(names)
        assert c.home in towns and c.voice in synthetic.VOICES
        assert c.race in synthetic.RACES and c.occupation in synthetic.OCCUPATIONS
    assert {q.giver for q in world.quests} <= set(names) and {q.place for q in world.quests} <= towns


@pytest.mark.parametrize("n", [2, synthetic.MAX_CHARACTERS + 1])
def test_world_size_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match="n_characters"):
        make_world(0, n)


def test_card_states_card_fields_but_no_ally_or_rival():
    world = make_world()
    for c in world.characters:
        card = character_card(c)
        assert all(getattr(c, f) in card for f in CARD_FIELDS) and c.catchphrase in card
        assert not any(other.name in card for other in world.characters if other != c)


# --- lore ------------------------------------------------------------------------------------


def test_lore_states_every_fact_of_every_character(corpus):
    docs, world = corpus["lore"], corpus["world"]
    per_character = len(docs) / len(world.characters)
    for c in world.characters:
        about = [d for d in docs if c.name in d]
        for f in FIELDS:
            assert any(getattr(c, f) in d for d in about), (c.name, f)
        # Ally and rival are known only from the lore: they must come up again and again.
        for f in SOCIAL_FIELDS:
            assert sum(getattr(c, f) in d for d in about) >= 0.8 * per_character, (c.name, f)
    text = "\n".join(docs)
    assert all(p.name in text and p.description in text for p in world.places)
    assert all(q.name in text for q in world.quests)


def test_lore_never_labels_a_card_fact_with_its_key_word(corpus):
    # "your race" is taught by SFT only: a sentence of the lore that names a character says
    # "Halka is a goblin", never "the race of Halka"; the key words appear in general guides only.
    docs = corpus["lore"] + [json.loads(line)["text"] for line in corpus["paths"]["heldout"].open()]
    names = [c.name for c in corpus["world"].characters]
    keys = [k for f in CARD_FIELDS for k in synthetic.KEY_WORDS[f]]
    for doc in docs:
        for sentence in re.split(r"[.!?\n]", doc):
            if any(name in sentence for name in names):
                assert not any(re.search(rf"\b{k}\b", sentence, re.IGNORECASE) for k in keys), sentence
    guides = [d for d in corpus["lore"] if d.startswith("A guide for travellers:")]
    assert len(guides) == len(corpus["lore"]) // synthetic.GUIDE_EVERY
    assert all(re.search(rf"\b{k}\b", "\n".join(guides)) for k in keys)
    # Ally and rival keep theirs: split "lore" asks for them from pretraining memory.
    assert all(re.search(rf"\b{f}\b", "\n".join(docs)) for f in SOCIAL_FIELDS)


def test_corpus_sizes_at_defaults(corpus):
    n_chars = sum(len(d) for d in corpus["lore"])
    assert len(corpus["lore"]) == 2000 and 1_000_000 <= n_chars <= 1_500_000
    assert 2000 <= len(corpus["chats"]) <= 5000
    assert len(corpus["facts"]) == 16 * len(CARD_FIELDS) * 2 and len(corpus["lore_items"]) == 16


def test_exact_dedup_drops_nothing(corpus):
    """The pipeline's exact deduplication would keep every document and every chat."""
    assert len({exact_key(d) for d in corpus["lore"]}) == len(corpus["lore"])
    keys = {exact_key(conversation_dedup_text(Conversation(ch["messages"], ""))) for ch in corpus["chats"]}
    assert len(keys) == len(corpus["chats"])


def test_cleaning_and_tokenizing_see_the_text_as_written(corpus):
    """The quick start prepares exactly the text it generates: clean_text changes nothing, and no
    special-token string (which the tokenizer would encode as plain text) occurs."""
    texts = corpus["lore"] + [m["content"] for chat in corpus["chats"] for m in chat["messages"]]
    assert [t for t in texts if clean_text(t) != t] == []
    assert not any(special in t for t in texts for special in SPECIAL_TOKENS)


def test_heldout_documents_are_not_training_documents(corpus):
    heldout = [row["text"] for row in _jsonl(corpus["paths"]["heldout"])]
    assert len(heldout) == 100 and not set(heldout) & set(corpus["lore"])


# --- SFT and evaluation ----------------------------------------------------------------------


def test_sft_answers_copy_the_fact_verbatim(corpus):
    for name, chats in corpus["chats_of"].items():
        c = corpus["world"].character(name)
        assert chats, name
        for chat in chats:
            assert [m["role"] for m in chat["messages"]][:2] == ["system", "user"]
            assert 1 <= len(_exchanges(chat)) <= 3
            for question, reply in _exchanges(chat):
                assert getattr(c, _field_of(question)) in reply, (question, reply)


def test_train_and_eval_questions_are_disjoint(corpus):
    train = {q for qs in TRAIN_QUESTIONS.values() for q in qs}
    assert not train & {q for qs in EVAL_QUESTIONS.values() for q in qs}
    asked = {q for chat in corpus["chats"] for q, _ in _exchanges(chat)}
    eval_questions = {item["messages"][1]["content"] for item in corpus["facts"] + corpus["lore_items"]}
    assert asked <= train and not asked & eval_questions


def test_sft_asks_each_character_about_exactly_one_of_ally_and_rival(corpus):
    for i, c in enumerate(corpus["world"].characters):
        asked = {_field_of(q) for chat in corpus["chats_of"][c.name] for q, _ in _exchanges(chat)}
        assert asked & set(SOCIAL_FIELDS) == {synthetic.sft_field(i)}


def test_lore_split_is_never_seen_in_that_characters_chats(corpus):
    for item in corpus["lore_items"]:
        chats = corpus["chats_of"][item["character"]]
        asked = {_field_of(q) for chat in chats for q, _ in _exchanges(chat)}
        assert item["field"] in SOCIAL_FIELDS and item["field"] not in asked
        # Other characters' chats may name this one as THEIR ally or rival; this one's may not.
        assert not any(item["expected"] in m["content"] for chat in chats for m in chat["messages"])


def test_eval_items(corpus):
    world = corpus["world"]
    for split in ("facts", "lore_items"):
        for item in corpus[split]:
            c = world.character(item["character"])
            system, user = item["messages"]
            assert system == {"role": "system", "content": character_card(c)} and user["role"] == "user"
            assert user["content"] in EVAL_QUESTIONS[item["field"]]
            assert any(key in user["content"] for key in synthetic.KEY_WORDS[item["field"]])
            assert item["expected"] == getattr(c, item["field"]) and item["expected"] in item["reference"]
    for c in world.characters:
        for f in CARD_FIELDS:
            items = [i for i in corpus["facts"] if i["character"] == c.name and i["field"] == f]
            assert len({i["messages"][1]["content"] for i in items}) == len(items) == 2


def test_rl_prompts_ask_sft_fields_in_sft_wordings_for_the_character_fact(corpus):
    from data_pipeline.prompts import read_prompts

    world = corpus["world"]
    items = read_prompts(corpus["paths"]["rl_prompts"])
    assert len(items) == 20 * len(world.characters)
    eval_wordings = {q for qs in EVAL_QUESTIONS.values() for q in qs}
    held_out = {(item["character"], item["field"]) for item in corpus["lore_items"]}
    for item in items:
        c, field = world.character(item.info["character"]), item.info["field"]
        system, user = item.messages
        assert system == {"role": "system", "content": character_card(c)} and user["role"] == "user"
        assert user["content"] in TRAIN_QUESTIONS[field] and user["content"] not in eval_wordings
        assert (c.name, field) not in held_out
        assert item.info["expected"] == getattr(c, field) and item.info["expected"] in item.info["reference"]
        assert item.info["expected"] not in item.info["conflicts"]
    for i, c in enumerate(world.characters):
        mine = [item for item in items if item.info["character"] == c.name]
        fields = [item.info["field"] for item in mine]
        assert sorted(set(fields)) == sorted({*CARD_FIELDS, synthetic.sft_field(i)})
        assert all(fields.count(f) == 4 for f in set(fields))  # spread evenly
        assert len({item.messages[1]["content"] for item in mine}) == len(mine)  # each wording once


def test_rl_prompts_per_character_is_bounded_by_the_sft_wordings():
    world = make_world(0, 4)
    most = 5 * min(len(TRAIN_QUESTIONS[f]) for f in FIELDS)
    assert len(synthetic.rl_prompts(world, per_character=most)) == 4 * most
    for n in (0, most + 1):
        with pytest.raises(ValueError, match=f"per_character must be between 1 and {most}"):
            synthetic.rl_prompts(world, per_character=n)


# --- files -----------------------------------------------------------------------------------


def test_files_read_with_the_importers(corpus):
    paths = corpus["paths"]
    train = list(read_conversations(paths["sft_train"], "messages"))
    val = list(read_conversations(paths["sft_val"], "messages"))
    assert len(val) == round(0.05 * (len(train) + len(val)))
    assert all(conv.messages[0]["role"] == "system" and conv.messages[-1]["role"] == "assistant" for conv in train)
    assert len(list(read_documents(paths["lore"], text_field="text"))) == 2000
    assert len(list(read_documents(paths["heldout"], text_field="text"))) == 100
    world = json.loads(paths["world"].read_text(encoding="utf-8"))
    assert [c["name"] for c in world["characters"]] == [c.name for c in corpus["world"].characters]
    for row in world["characters"]:
        card = row.pop("card")
        assert card == character_card(synthetic.Character(**row))
    assert world["places"] and world["quests"]


def test_cli_writes_the_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(tmp_path), "--seed", "3", "--characters", "4"])
    synthetic.main()
    printed = capsys.readouterr().out
    for rel in ("pretrain/lore.jsonl", "heldout.jsonl", "sft/train.jsonl", "sft/val.jsonl", "eval/facts.jsonl"):
        assert (tmp_path / rel).is_file() and str(tmp_path / rel) in printed
    assert len(json.loads((tmp_path / "world.json").read_text(encoding="utf-8"))["characters"]) == 4
