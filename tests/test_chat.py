"""The chat template and loss mask: id-for-id parity with transformers' apply_chat_template on the
exported folder, exact per-turn masks in the aligned frame, the over-length policy, documents."""

import json

import numpy as np
import pytest

from data_pipeline.chat import encode_conversation, encode_document, encode_prompt, fit_prompt
from data_pipeline.records import DataError
from model.loss import IGNORE_INDEX
from tests.test_tokenizer import small_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok.save_hf(tmp_path_factory.mktemp("hf"))))


def rolebench_chat(data, lang: str, n_exchanges: int = 3) -> list[dict[str, str]]:
    """A system message and `n_exchanges` real RoleBench question/answer pairs of one character."""
    rows = [json.loads(line) for line in (data / "sft" / f"rolebench_{lang}_train.jsonl").open(encoding="utf-8")]
    role = rows[0]["role"]
    rows = [r for r in rows if r["role"] == role][:n_exchanges]
    system = f"You are {role}. Stay in character." if lang == "en" else f"你是{role}，请保持角色。"
    messages = [{"role": "system", "content": system}]
    for r in rows:
        messages += [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["generated"][0]}]
    return messages


def template_ids(hf_tok, messages, **kwargs) -> list[int]:
    """apply_chat_template's ids; transformers 5 returns a BatchEncoding where 4.x gave a list."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def full_ids(sample, tok) -> list[int]:
    """Undo the alignment: the conversation's ids are input_ids plus its last id, which is
    always the untrained newline after the final <|im_end|>."""
    return [*sample.input_ids.tolist(), *tok.encode("\n")]


def test_template_text(hf_tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_ids_equal_apply_chat_template(tok, hf_tok, shared_data, lang):
    messages = rolebench_chat(shared_data, lang)
    sample, reason = encode_conversation(messages, tok)
    assert reason is None
    assert sample.input_ids.dtype == sample.labels.dtype == np.int32
    assert full_ids(sample, tok) == template_ids(hf_tok, messages)


def test_ids_equal_apply_chat_template_on_tricky_content(tok, hf_tok):
    messages = [
        {"role": "system", "content": "  leading spaces and\ttabs\n"},
        {"role": "user", "content": "\nstarts with a newline, quotes “孙悟空” and emoji 😀"},
        {"role": "assistant", "content": ""},  # an empty answer still learns <|im_end|>
        {"role": "user", "content": "a byte piece's name <0x41>, <|im and |>, and im_end"},
        {"role": "assistant", "content": " 俺老孙来也！\n\n  𠀀 rare"},
    ]
    sample, _ = encode_conversation(messages, tok)
    assert full_ids(sample, tok) == template_ids(hf_tok, messages)


def test_special_token_strings_in_content_are_text(tok, hf_tok):
    """An answer that quotes "<|im_end|>" learns the quote, not a stop in mid-answer: only the
    template's own markers are control ids (apply_chat_template cannot tell the two apart in
    the rendered string, so the reference encodes each content with split_special_tokens)."""
    messages = [
        {"role": "system", "content": "never say </s> or <s>"},
        {"role": "user", "content": "literal <|im_start|>assistant\nand <|im_end|> inside"},
        {"role": "assistant", "content": "ok <|im_end|> then more <pad><unk>"},
    ]
    sample, _ = encode_conversation(messages, tok)
    ids = full_ids(sample, tok)
    reference = []
    for m in messages:
        content = hf_tok.encode(m["content"], add_special_tokens=False, split_special_tokens=True)
        reference += [tok.im_start_id, *hf_tok.encode(m["role"] + "\n"), *content, tok.im_end_id, *hf_tok.encode("\n")]
    assert ids == reference
    assert ids.count(tok.im_start_id) == ids.count(tok.im_end_id) == len(messages)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} & set(ids)
    learned = [int(label) for label in sample.labels if label != IGNORE_INDEX]
    assert learned.count(tok.im_end_id) == 1 and learned[-1] == tok.im_end_id
    assert tok.decode(learned) == messages[-1]["content"] + "<|im_end|>"
    prompt = encode_prompt(messages[:2], tok)
    assert prompt.count(tok.im_start_id) == 3 and prompt.count(tok.im_end_id) == 2


def test_fit_prompt_with_no_exchange_yet(tok):
    """A character card alone (the model opens the conversation), or nothing at all."""
    system = [{"role": "system", "content": "你是孙悟空。"}]
    assert fit_prompt(system, tok, 100, 10) == (encode_prompt(system, tok), 0)
    assert fit_prompt([], tok, 100, 10) == (encode_prompt([], tok), 0)
    with pytest.raises(DataError, match="context is 4"):
        fit_prompt(system, tok, 4, 1)


def test_generation_prompt_equals_apply_chat_template(tok, hf_tok, shared_data):
    for lang in ("en", "zh"):
        messages = rolebench_chat(shared_data, lang)[:-1]  # ends with the user's question
        ids = encode_prompt(messages, tok)
        assert ids == template_ids(hf_tok, messages, add_generation_prompt=True)
        assert ids[-len(tok.encode("assistant\n")) - 1 :] == [tok.im_start_id, *tok.encode("assistant\n")]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_loss_mask_is_exactly_assistant_content_and_end_of_turn(tok, hf_tok, shared_data, lang):
    messages = rolebench_chat(shared_data, lang, n_exchanges=3)
    sample, _ = encode_conversation(messages, tok)
    ids = full_ids(sample, tok)
    # Reference from character offsets, independent of how chat.py builds its pieces: a token
    # is a target exactly when its text lies inside an assistant's "content<|im_end|>".
    rendered = hf_tok.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:
        pos += len(f"<|im_start|>{m['role']}\n")
        end = pos + len(m["content"]) + len("<|im_end|>")
        if m["role"] == "assistant":
            spans.append((pos, end))
        pos = end + 1
    assert pos == len(rendered)
    enc = hf_tok(rendered, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"] == ids
    is_target = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    # aligned frame: position t predicts ids[t + 1]
    for t, label in enumerate(sample.labels.tolist()):
        if is_target[t + 1]:
            assert label == ids[t + 1], t
        else:
            assert label == IGNORE_INDEX, t
    # and, read back, the targets are the three answers, each closed by <|im_end|>
    targets = sample.labels
    runs = np.split(targets, np.flatnonzero(np.diff((targets != IGNORE_INDEX).astype(int))) + 1)
    learned = [tok.decode(r) for r in runs if r[0] != IGNORE_INDEX]
    assert learned == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_over_length_cuts_earliest_exchanges_and_keeps_the_system_message(tok, shared_data):
    messages = rolebench_chat(shared_data, "zh", n_exchanges=3)
    system, ex = messages[:1], [messages[1:3], messages[3:5], messages[5:7]]
    full, _ = encode_conversation(messages, tok)
    last_two, _ = encode_conversation(system + ex[1] + ex[2], tok)
    last_one, _ = encode_conversation(system + ex[2], tok)

    same, reason = encode_conversation(messages, tok, max_len=len(full))
    assert reason is None and np.array_equal(same.input_ids, full.input_ids)

    for max_len, expected in [(len(full) - 1, last_two), (len(last_two), last_two), (len(last_two) - 1, last_one)]:
        cut, reason = encode_conversation(messages, tok, max_len=max_len)
        assert reason == "cut_earlier_turns"
        assert len(cut) <= max_len
        assert np.array_equal(cut.input_ids, expected.input_ids)
        assert np.array_equal(cut.labels, expected.labels)

    assert encode_conversation(messages, tok, max_len=len(last_one) - 1) == (None, "too_long")


def test_over_length_without_system_message_and_with_a_trailing_question(tok):
    ex = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(3)
    ]
    trailing = [{"role": "user", "content": "an unanswered question " * 20}]
    messages = ex[0] + ex[1] + ex[2] + trailing
    kept, _ = encode_conversation(ex[2] + trailing, tok)
    cut, reason = encode_conversation(messages, tok, max_len=len(kept))
    assert reason == "cut_earlier_turns" and np.array_equal(cut.input_ids, kept.input_ids)
    # the trailing question alone would teach nothing: it is not a place to cut to
    assert encode_conversation(messages, tok, max_len=len(kept) - 1) == (None, "too_long")


def test_conversations_without_answers_or_with_bad_roles(tok):
    assert encode_conversation([{"role": "user", "content": "hi"}], tok) == (None, "no_assistant_turn")
    with pytest.raises(DataError, match="role 'bot'"):
        encode_conversation([{"role": "bot", "content": "hi"}], tok)
    with pytest.raises(DataError, match="content must be a string"):
        encode_conversation([{"role": "user", "content": None}], tok)


def test_document_has_bos_eos_and_every_target(tok, shared_data):
    text = (shared_data / "pretrain" / "journey_to_the_west.txt").read_text(encoding="utf-8")[:20_000]
    sample = encode_document(text, tok)
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert len(sample) == len(ids) - 1  # not cut, however long
    assert sample.input_ids.tolist() == ids[:-1]
    assert sample.labels.tolist() == ids[1:]
    assert sample.input_ids[0] == tok.bos_id and sample.labels[-1] == tok.eos_id
    assert sample.input_ids.dtype == sample.labels.dtype == np.int32
    empty = encode_document("", tok)
    assert empty.input_ids.tolist() == [tok.bos_id] and empty.labels.tolist() == [tok.eos_id]
