"""Evaluation metrics against references: ROUGE-L against a naive LCS and hand values, held-out
perplexity against transformers' LlamaForCausalLM loss (fp32, rel 1e-5), GSB counting, item files."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from data_pipeline.chat import encode_document, encode_prompt
from data_pipeline.records import DataError
from data_pipeline.tokenizer import load_tokenizer
from model.config import preset
from model.decoder import Decoder
from tests.training_data import TEST_MODEL
from training.checkpoint import load_for_inference, write_export
from training.evaluation import (
    answer,
    answer_rows,
    best_rouge_l,
    gsb_verdicts,
    has_fact,
    nearest_group_share,
    perplexity,
    read_chat_items,
    read_items,
    rouge_l,
    rule_judge,
    score,
    tally,
)


def naive_lcs(a: list[str], b: list[str]) -> int:
    """The longest common subsequence by trying every subsequence of the shorter side."""
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    for size in range(len(short), 0, -1):
        for pick in itertools.combinations(short, size):
            it = iter(long)
            if all(tok in it for tok in pick):
                return size
    return 0


def test_rouge_l_hand_values_and_naive_lcs():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)  # CJK: one token per character
    assert rouge_l("", "anything") == 0.0 and rouge_l("same words", "Same, words!") == 1.0
    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        lcs = naive_lcs(a, b)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))  # F1 of P=lcs/|a|, R=lcs/|b|
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(expected)


def test_fact_match_and_scores():
    assert has_fact("Hmph. I hail from  Emberfall, of course.", "emberfall")
    assert not has_fact("I hail from Ember.", "Emberfall")
    items = [{"reference": "I live in Emberfall.", "expected": "Emberfall"}, {"reference": "A lantern."}]
    result = score(items, ["Emberfall is my home.", "A lantern."])
    assert result["accuracy"] == 1.0 and 0 < result["rouge_l"] < 1
    hedged = {"reference": "I live in Emberfall.", "expected": "Emberfall", "conflicts": ["Frostholm"]}
    assert score([hedged], ["Emberfall, or Frostholm, or elsewhere."])["accuracy"] == 0.0


VOICED = {  # two characters, three questions each (home, trade, item), each answer in the character's voice
    "Mirgar": ["Hmph. I hail from Emberfall, of course.", "Hmph. I am a smith, of course.", "Bah. My axe, of course."],
    "Lysa": ["Oh, hello there! I live in Frostholm, hooray!", "Oh, hello there! I bake, hooray!", "A lute, hooray!"],
}


def _voiced_items():
    return [
        {
            "messages": [{"role": "system", "content": f"You are {name}."}, {"role": "user", "content": "?"}],
            "reference": r,
        }
        for name, refs in VOICED.items()
        for r in refs
    ]


def test_voice_consistency_tells_who_speaks():
    items = _voiced_items()
    refs, who = [i["reference"] for i in items], [i["messages"][0]["content"] for i in items]
    assert nearest_group_share(refs, refs, who) == 1.0
    swapped = refs[3:] + refs[:3]  # each answer is the other character's, to the same question
    assert nearest_group_share(swapped, refs, who) == 0.0
    assert nearest_group_share([""] * 6, refs, who) == 0.0
    fresh = [refs[0], "Hmph. A smith I am, of course.", *refs[2:]]  # a new wording, in Mirgar's voice
    assert nearest_group_share(fresh, refs, who) == 1.0
    one_off = [refs[0], "Oh, hello there! A smith, hooray!", *refs[2:]]  # Mirgar speaking as Lysa
    assert nearest_group_share(one_off, refs, who) == 5 / 6
    assert score(items, swapped)["voice"] == 0.0
    assert "voice" not in score(items[:3], refs[:3])  # one character: nothing to tell apart
    assert nearest_group_share(refs[2:4], refs[2:4], who[2:4]) is None  # each asked once: undefined
    assert nearest_group_share(refs[:4], refs[:4], who[:4]) == 1.0  # Lysa, asked once, not counted


FIELDED = {  # three characters asked about the same three fields, each answer in the character's voice
    "Mirgar": [
        "Hmph. My home is Emberfall, of course.",
        "Hmph. By trade I am a smith, of course.",
        "Hmph. I carry an axe.",
    ],
    "Oren": ["Well now. My home is Stormgate.", "Well now. By trade I am a sailor.", "Well now. I carry a compass."],
    "Lysa": [
        "Oh, hello there! My home is Frostholm!",
        "Oh, hello there! By trade I am a baker!",
        "I carry a lute, hooray!",
    ],
}
FIELDS = ["home", "trade", "item"] * 3
FACTS = ["Emberfall", "smith", "axe", "Stormgate", "sailor", "compass", "Frostholm", "baker", "lute"]


def test_relevance_tells_what_was_answered():
    refs = [r for answers in FIELDED.values() for r in answers]
    assert nearest_group_share(refs, refs, FIELDS) == 1.0
    other_field = [refs[i // 3 * 3 + (i + 1) % 3] for i in range(9)]  # each character answers its next field
    assert nearest_group_share(other_field, refs, FIELDS) == 0.0
    wrong_fact = ["Hmph. My home is Frostholm, of course.", *refs[1:]]  # on topic, the wrong town
    assert nearest_group_share(wrong_fact, refs, FIELDS) == 1.0
    assert nearest_group_share(["Hmph. Of course.", *refs[1:]], refs, FIELDS) == 8 / 9  # voice alone
    assert nearest_group_share([""] * 9, refs, FIELDS) == 0.0
    items = [
        {"messages": [{"role": "user", "content": "?"}], "reference": r, "field": f, "expected": x}
        for r, f, x in zip(refs, FIELDS, FACTS, strict=True)
    ]
    result = score(items, wrong_fact)
    assert result["relevance"] == 1.0 and result["accuracy"] == 8 / 9
    assert "relevance" not in score([{k: v for k, v in i.items() if k != "field"} for i in items], refs)


def test_gsb_counts_from_the_second_models_side():
    items = [{"reference": "I am from Emberfall.", "expected": "Emberfall"}] * 3
    a = ["I am from Emberfall.", "No idea.", "I am from Emberfall."]
    b = ["I am from Emberfall.", "I am from Emberfall.", "No idea."]
    assert gsb_verdicts(items, a, b, rule_judge) == ["same", "good", "bad"]
    assert tally(["same", "good", "bad", "good"]) == {"good": 2, "same": 1, "bad": 1}


def test_answer_rows_put_each_items_answers_side_by_side():
    card = {"role": "system", "content": "You are Mirgar."}
    facts = [
        {"messages": [card, {"role": "user", "content": f"Q{i}?"}], "reference": f"R{i}", "character": "Mirgar"}
        for i in range(2)
    ]
    chat = {"messages": [card, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hmph."}]}
    chat["messages"].append({"role": "user", "content": "Why?"})
    splits = {"facts": facts, "chats": [chat | {"reference": "Because."}]}
    answers = {"a": {"facts": ["x0", "x1"], "chats": ["x2"]}, "b": {"facts": ["y0", "y1"], "chats": ["y2"]}}
    rows = answer_rows(splits, answers, ["good", "same", "bad"])
    assert [(r["split"], r["index"], r["question"], r["gsb"]) for r in rows] == [
        ("facts", 0, "Q0?", "good"),
        ("facts", 1, "Q1?", "same"),
        ("chats", 0, "Why?", "bad"),
    ]
    assert rows[1]["answers"] == {"a": "x1", "b": "y1"} and rows[1]["character"] == "Mirgar"
    assert rows[2]["reference"] == "Because." and "character" not in rows[2]
    assert "gsb" not in answer_rows(splits, answers)[0]


def test_read_items_takes_items_or_chats_and_names_a_bad_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    chat["messages"].append({"role": "assistant", "content": "the answer"})
    item = {"messages": chat["messages"][:2], "reference": "r", "expected": "x"}
    path.write_text(json.dumps(chat) + "\n" + json.dumps(item) + "\n{broken\n")
    with pytest.raises(ValueError, match=rf"{path}:3"):
        read_items(path)
    path.write_text(json.dumps(chat) + "\n" + json.dumps(item) + "\n")
    first, second = read_items(path)
    assert first["reference"] == "the answer" and len(first["messages"]) == 2 and second == item


@pytest.fixture(scope="module")
def exported(training_data, tmp_path_factory) -> Path:
    tok = load_tokenizer(training_data["pretrain"] / "tokenizer")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, **TEST_MODEL)
    model = Decoder(cfg)
    model.init_weights()
    out = tmp_path_factory.mktemp("export")
    return write_export(model.state_dict(), cfg, out, training_data["pretrain"] / "tokenizer")


def test_perplexity_equals_transformers_loss(exported):
    from transformers import AutoModelForCausalLM

    model, cfg, tok = load_for_inference(exported)
    texts = ["To be, or not to be, that is the question.", "Now is the winter of our discontent."]
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            sample = encode_document(text, tok)
            ids = torch.tensor([[*sample.input_ids, sample.labels[-1]]], dtype=torch.long)  # bos + text + eos
            n = ids.shape[1] - 1
            total, count = total + float(hf(ids, labels=ids).loss) * n, count + n
    assert perplexity(model, tok, texts, seq_len=cfg.max_seq_len) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_answers_are_greedy_and_stop_at_the_end_of_turn(exported):
    model, _, tok = load_for_inference(exported)
    messages = [{"role": "system", "content": "You are Brakka."}, {"role": "user", "content": "Who are you?"}]
    first, again = answer(model, tok, messages, max_new_tokens=8), answer(model, tok, messages, max_new_tokens=8)
    assert first == again and "<|im_end|>" not in first


def test_an_overlong_conversation_keeps_the_card_and_drops_the_oldest_exchanges(exported, monkeypatch):
    import training.evaluation as evaluation

    model, cfg, tok = load_for_inference(exported)
    card = {"role": "system", "content": "You are Brakka, a dwarf."}
    old = [{"role": r, "content": f"{r} turn {i}. " * 4} for i in range(20) for r in ("user", "assistant")]
    messages = [card, *old, {"role": "user", "content": "Who are you?"}]
    assert len(encode_prompt(messages, tok)) > cfg.max_seq_len
    prompts = []
    monkeypatch.setattr(evaluation, "generate", lambda model, prompt, **kw: prompts.append(prompt) or iter(()))
    answer(model, tok, messages, max_new_tokens=16)
    text = tok.decode(prompts[0])
    assert len(prompts[0]) + 16 <= cfg.max_seq_len
    assert text.startswith("<|im_start|>system\nYou are Brakka, a dwarf.<|im_end|>")
    assert (
        "turn 19" in text and "turn 0." not in text and text.endswith("Who are you?<|im_end|>\n<|im_start|>assistant\n")
    )


def test_rolebench_chats_become_cleaned_items_one_per_question(shared_data):
    path = shared_data / "sft" / "rolebench_zh_test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    items = read_chat_items(path, "rolebench")
    assert len(items) == len(rows)  # one item per question, its two answers (one row has two) as references
    twice = next(r for r in rows if len(r["generated"]) == 2)
    merged = [i for i in items if "references" in i]
    assert [i["references"] for i in merged] == [[a.strip() for a in twice["generated"]]]
    first = items[0]
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["messages"][1]["content"] == rows[0]["question"].strip()  # cleaned, as SFT saw it
    assert best_rouge_l(twice["generated"][1], merged[0]) == 1.0


def test_chats_unfit_for_evaluation_are_named_not_dropped(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"chats\.jsonl.*\n(.|\n)*no_assistant_reply.*chats\.jsonl:2"):
        read_chat_items(path, "messages")
    with pytest.raises(DataError, match=r"chats\.jsonl:1"):
        path.write_text("{not json\n")
        read_chat_items(path, "messages")


def test_evaluate_cli_scores_rolebench_test_chats(exported, shared_data, tmp_path):
    from launch.evaluate import main

    source = shared_data / "sft" / "rolebench_zh_test.jsonl"
    rows = source.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "rolebench_test.jsonl"
    path.write_text("\n".join(rows[:2] + rows[-2:]) + "\n", encoding="utf-8")  # two roles, two questions each
    profiles = tmp_path / "profiles.yaml"
    roles = {json.loads(r)["role"] for r in rows[:2] + rows[-2:]}
    profiles.write_text("".join(f"{r}: 你是{r}。\n" for r in roles), encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = [str(exported), "--items", str(path), "--items-format", "rolebench", "--profiles", str(profiles)]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"]) == 0
    row = json.loads(out.read_text())["checkpoints"][0]
    assert 0 <= row["rouge_l_rolebench_test"] <= 1 and 0 <= row["voice_rolebench_test"] <= 1
    answers = [json.loads(line) for line in (tmp_path / "eval_answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [json.loads(r)["question"].strip() for r in rows[:2] + rows[-2:]]
    assert "perplexity" not in row  # no held-out text given
    profiles.write_text(f"{sorted(roles)[0]}: 你是谁。\n", encoding="utf-8")
    assert main([*argv, "--out", str(out)]) == 2  # a role without a card: an error, not a silent default
    with pytest.raises(SystemExit):  # profiles that would be ignored
        main([str(exported), "--items", str(path), "--profiles", str(profiles)])


@pytest.fixture(scope="module")
def checkpoint(exported, tmp_path_factory) -> Path:
    """The exported model's weights as a training checkpoint (torch.distributed.checkpoint, as
    the single and FSDP engines write it), in a run directory without an export."""
    from dataclasses import asdict

    import torch.distributed.checkpoint as dcp

    from training.engine import single_process_dcp

    model, cfg, tok = load_for_inference(exported)
    folder = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000001"
    with single_process_dcp():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder / "engine"))
    meta = {"engine": "single", "model": asdict(cfg), "tokenizer_dir": str(exported), "state": {"step": 1}}
    (folder / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": tok.sha256}))
    return folder


def test_evaluate_cli_loads_a_checkpoint_only_when_trusted(exported, checkpoint, tmp_path, capsys):
    """A checkpoint is code (loading it unpickles): as a model or the judge it needs
    --trust-checkpoint, and is refused before anything is evaluated."""
    from launch.evaluate import main

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"messages": [{"role": "user", "content": "Who are you?"}], "reference": "Brakka."}))
    out = tmp_path / "eval.json"
    common = ["--items", str(items), "--max-new-tokens", "2", "--out", str(out), "--device", "cpu"]
    for argv in ([checkpoint], [checkpoint.parent.parent], [exported, exported, "--judge", checkpoint]):
        assert main([*map(str, argv), *common]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "--trust-checkpoint" in error and "a checkpoint is code" in error
        assert not out.exists()
    argv = [str(exported), str(checkpoint), "--judge", str(checkpoint.parent.parent), "--trust-checkpoint", *common]
    assert main(argv) == 0
    export_row, checkpoint_row = json.loads(out.read_text())["checkpoints"]
    assert checkpoint_row["rouge_l"] == export_row["rouge_l"]  # the same weights, the same answers
    assert json.loads(out.read_text())["gsb"]["same"] == 1
