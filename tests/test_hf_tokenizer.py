"""HFTokenizer against transformers: ids equal apply_chat_template's and masks equal the reference
masks of a {% generation %}-marked copy of each published template (Llama 3, Qwen 2.5, Mistral,
Qwen3), for single and multi-turn chats, system messages, content that merges with its header,
Chinese; refusals; bos/eos/stop ids; the id hash; save and the --chat-template override."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_pipeline.hf_tokenizer import HFTokenizer
from data_pipeline.records import DataError
from tests.hf_fixtures import (
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    llama3_tokenizer,
    mistral_tokenizer,
    qwen2_tokenizer,
    with_generation_marks,
)

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "qwen25": QWEN25_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "qwen3": QWEN3_TEMPLATE}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One trained fixture folder per template (Qwen 2.5 and Qwen3 share Qwen2's tokenizer)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {
        "llama3": llama3_tokenizer(root / "llama3"),
        "qwen25": qwen2_tokenizer(root / "qwen25"),
        "mistral": mistral_tokenizer(root / "mistral"),
        "qwen3": qwen2_tokenizer(root / "qwen3", template=QWEN3_TEMPLATE),
    }


@pytest.fixture(scope="module")
def toks(folders) -> dict[str, HFTokenizer]:
    return {name: HFTokenizer.load(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def refs(folders) -> dict:
    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}


def rolebench_zh(data: Path, n: int) -> list[dict[str, str]]:
    """n real Chinese question/answer exchanges of one character."""
    rows = [json.loads(line) for line in (data / "sft" / "rolebench_zh_train.jsonl").open(encoding="utf-8")][:n]
    chat = []
    for row in rows:
        chat += [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["generated"][0]}]
    return chat


def chats(data: Path) -> dict[str, list[dict[str, str]]]:
    """The conversations every template is checked on."""
    return {
        "single": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Good morrow, sir."}],
        "system_multi": [
            {"role": "system", "content": "You are Hamlet. Stay in character."},
            {"role": "user", "content": "How now?"},
            {"role": "assistant", "content": "Words, words, words."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "The rest is silence."},
        ],
        # A leading space or newline merges with the header's last character in byte-level BPE.
        "leading_space_newline": [
            {"role": "user", "content": "Speak."},
            {"role": "assistant", "content": " I will."},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "\n\nAnd so I do.\n"},
        ],
        "empty_answer": [
            {"role": "user", "content": "Say nothing."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Now speak."},
            {"role": "assistant", "content": "Well."},
        ],
        "chinese": rolebench_zh(data, 3),
    }


def template_ids(ref, messages, **kwargs) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def reference_mask(ref, messages, template: str, **kwargs) -> list[bool]:
    """transformers' assistant mask from a template with {% generation %} marks."""
    out = ref.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("chat", ["single", "system_multi", "leading_space_newline", "empty_answer", "chinese"])
def test_ids_and_masks_match_transformers(toks, refs, shared_data, name, chat):
    messages = chats(shared_data)[chat]
    tok, ref = toks[name], refs[name]
    rendered = tok.encode_chat(messages)
    assert rendered.ids == template_ids(ref, messages)
    assert rendered.trained == reference_mask(ref, messages, with_generation_marks(TEMPLATES[name]))
    assert len(rendered.turn_tokens) == sum(m["role"] == "assistant" for m in messages)
    assert sum(rendered.turn_tokens) == sum(rendered.trained)
    assert all(n >= 1 for n in rendered.turn_tokens)  # even an empty answer trains its closing token


@pytest.mark.parametrize("name", TEMPLATES)
def test_marked_copies_render_the_same_text(refs, shared_data, name):
    for messages in chats(shared_data).values():
        for prompt in (False, True):
            plain = refs[name].apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            marked = refs[name].apply_chat_template(
                messages,
                chat_template=with_generation_marks(TEMPLATES[name]),
                tokenize=False,
                add_generation_prompt=prompt,
            )
            assert marked == plain


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_matches_transformers(toks, refs, shared_data, name):
    messages = chats(shared_data)["system_multi"][:-1]
    rendered = toks[name].encode_chat(messages, add_generation_prompt=True)
    ids = template_ids(refs[name], messages, add_generation_prompt=True)
    assert rendered.ids == ids
    marked = with_generation_marks(TEMPLATES[name])
    assert rendered.trained == reference_mask(refs[name], messages, marked, add_generation_prompt=True)


def test_trained_tokens_are_content_and_closing_token(toks, refs):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fare well."}]
    for name, close in [("llama3", "<|eot_id|>"), ("qwen25", "<|im_end|>"), ("mistral", "</s>")]:
        rendered = toks[name].encode_chat(messages)
        trained = [i for i, t in zip(rendered.ids, rendered.trained, strict=True) if t]
        assert refs[name].decode(trained).strip() == "Fare well." + close
        assert refs[name].convert_ids_to_tokens(trained[-1]) == close  # the newline after it is not trained


def test_header_merging_token_is_trained_as_transformers_does(toks, refs):
    # "assistant\n" + "\n\nAnd..." : the newlines merge into one token across the boundary; the
    # overlap rule trains it, as transformers' marked reference does.
    messages = [{"role": "user", "content": "Again."}, {"role": "assistant", "content": "\n\nAnd so I do."}]
    tok, ref = toks["qwen25"], refs["qwen25"]
    text = ref.apply_chat_template(messages, tokenize=False)
    offsets = ref(text, add_special_tokens=False).encodings[0].offsets
    boundary = text.index("assistant\n") + len("assistant\n")
    assert any(s < boundary < e for s, e in offsets), "the fixture no longer merges across the boundary"
    rendered = tok.encode_chat(messages)
    assert rendered.trained == reference_mask(ref, messages, with_generation_marks(QWEN25_TEMPLATE))


def test_qwen3_rewrites_history_and_turns_are_located(toks, refs, shared_data):
    messages = chats(shared_data)["system_multi"]
    ref = refs["qwen3"]
    # The first answer renders with an empty <think> block while it is the last, without one after.
    first = ref.apply_chat_template(messages[:3], tokenize=False)
    assert not ref.apply_chat_template(messages, tokenize=False).startswith(first)
    rendered = toks["qwen3"].encode_chat(messages)
    assert rendered.trained == reference_mask(ref, messages, with_generation_marks(QWEN3_TEMPLATE))
    trained_text = ref.decode([i for i, t in zip(rendered.ids, rendered.trained, strict=True) if t])
    assert trained_text == "Words, words, words.<|im_end|><think>\n\n</think>\n\nThe rest is silence.<|im_end|>"


def test_qwen3_reasoning_in_content_is_located(toks, refs):
    messages = [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>Because.</think>Because."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "<think>\nYes.\n</think>\n\nYes."},
    ]
    rendered = toks["qwen3"].encode_chat(messages)
    assert rendered.ids == template_ids(refs["qwen3"], messages)
    assert rendered.trained == reference_mask(refs["qwen3"], messages, with_generation_marks(QWEN3_TEMPLATE))


CHATML_WITHOUT_ANSWERS = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_ANSWERS_LAST = (
    "{% for m in messages if m.role != 'assistant' %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{% endfor %}{% for m in messages if m.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Closes an assistant turn only while it is the last message: located in the whole chat, the next
# <|im_end|> after an earlier answer is the following user turn's.
CHATML_UNCLOSED_HISTORY = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{% if m.role != 'assistant' or loop.last %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "turn", "why"),
    [
        (CHATML_WITHOUT_ANSWERS, "assistant turn 1 (message 2)", "content is not in the rendering"),
        (CHATML_ANSWERS_LAST, "assistant turn 1 (message 2)", "renders differently inside the whole chat"),
        (CHATML_UNCLOSED_HISTORY, "assistant turn 1 (message 2)", "another turn begins between its header"),
    ],
)
def test_underivable_masks_are_refused(folders, tmp_path, template, turn, why):
    file = tmp_path / "bad.jinja"
    file.write_text(template)
    tok = HFTokenizer.load(folders["qwen25"], chat_template=file)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    with pytest.raises(DataError) as err:
        tok.encode_chat(messages)
    message = str(err.value)
    assert f"--chat-template {file}" in message and turn in message and why in message
    assert "pass --chat-template FILE" in message


def test_generation_marks_are_used_when_present(folders, refs, tmp_path):
    # Marks around the content only: the closing token is then untrained, which the derived mask
    # would never give, so equality with the reference shows the marks were used.
    marked = QWEN25_TEMPLATE.replace(
        '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
        '(message.role == "assistant" and not message.tool_calls) %}',
        '{%- if message.role == "assistant" and not message.tool_calls %}'
        "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message.content }}{%- endgeneration %}"
        "{{- '<|im_end|>\\n' }}"
        '{%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}',
    )
    assert marked != QWEN25_TEMPLATE
    file = tmp_path / "marked.jinja"
    file.write_text(marked)
    tok = HFTokenizer.load(folders["qwen25"], chat_template=file)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fare well."}]
    rendered = tok.encode_chat(messages)
    assert rendered.trained == reference_mask(refs["qwen25"], messages, marked)
    im_end = refs["qwen25"].convert_tokens_to_ids("<|im_end|>")
    assert not any(t for i, t in zip(rendered.ids, rendered.trained, strict=True) if i == im_end)


def test_marks_that_miss_a_turn_are_refused(folders, tmp_path):
    file = tmp_path / "last_only.jinja"
    file.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{% if loop.last %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    tok = HFTokenizer.load(folders["qwen25"], chat_template=file)
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
    ]
    with pytest.raises(DataError, match=r"assistant turn 2 \(message 3\).*1 \{% generation %\} blocks for 2"):
        tok.encode_chat(messages)


def test_bos_eos_pad_and_stop_ids(toks, refs):
    llama, qwen, mistral = toks["llama3"], toks["qwen25"], toks["mistral"]
    ids = refs["llama3"].convert_tokens_to_ids
    assert llama.bos_id == ids("<|begin_of_text|>") and llama.eos_id == ids("<|eot_id|>")
    assert llama.pad_id == llama.eos_id  # no pad token: the eos fills padding
    assert set(llama.stop_ids) == {ids("<|eot_id|>"), ids("<|end_of_text|>")}  # + generation_config.json
    qids = refs["qwen25"].convert_tokens_to_ids
    assert qwen.bos_id is None and qwen.eos_id == qids("<|endoftext|>") == qwen.pad_id
    assert qwen.stop_ids == (qids("<|endoftext|>"), qids("<|im_end|>"))
    assert toks["qwen3"].stop_ids == qwen.stop_ids
    assert mistral.bos_id == refs["mistral"].convert_tokens_to_ids("<s>")
    assert mistral.stop_ids == (refs["mistral"].convert_tokens_to_ids("</s>"),)
    for name, tok in toks.items():
        assert tok.vocab_size == len(refs[name]) and max(refs[name].get_vocab().values()) < tok.vocab_size


def test_bos_is_not_doubled(toks, refs):
    # Llama 3's template writes bos_token and the tokenizer adds one to plain text: a chat has one.
    llama = toks["llama3"]
    rendered = llama.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}])
    assert rendered.ids[0] == llama.bos_id and rendered.ids.count(llama.bos_id) == 1
    assert llama.bos_id not in llama.encode("Hello there")  # documents get it from the pipeline, once
    mistral = toks["mistral"]
    rendered = mistral.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}])
    assert rendered.ids[0] == mistral.bos_id and rendered.ids.count(mistral.bos_id) == 1


def test_encode_keeps_special_strings_as_text(toks, refs):
    text = "A play <|im_end|><|eot_id|><|begin_of_text|> <s></s>[INST] ends <|endoftext|>"
    for name, tok in toks.items():
        ids = tok.encode(text)
        controls = set(refs[name].all_special_ids) - {refs[name].unk_token_id}
        assert not set(ids) & controls, name
        if name != "mistral":  # Mistral's fixture has no byte fallback: unknown characters become <unk>
            assert tok.decode(ids) == text
    qwen = toks["qwen25"]
    assert qwen.decode([qwen.stop_ids[1]]) == "<|im_end|>"  # special tokens are written out
    # encode does not leave the shared backend splitting specials: chats still get control tokens.
    rendered = qwen.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert qwen.stop_ids[1] in rendered.ids


def test_chinese_round_trip(toks, shared_data):
    text = rolebench_zh(shared_data, 1)[1]["content"]
    for name in ("llama3", "qwen25"):
        assert toks[name].decode(toks[name].encode(text)) == text


def test_sha256_stable_across_save_and_load(toks, tmp_path):
    for name, tok in toks.items():
        saved = tok.save(tmp_path / name)
        assert HFTokenizer.load(saved).sha256 == tok.sha256, name
        assert HFTokenizer.load(saved).stop_ids == tok.stop_ids, name  # generation_config.json copied


def test_sha256_ignores_the_template_and_sees_tokenizer_json(folders, toks, tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(QWEN3_TEMPLATE)
    assert HFTokenizer.load(folders["qwen25"], chat_template=file).sha256 == toks["qwen25"].sha256
    assert toks["qwen3"].sha256 == toks["qwen25"].sha256  # same tokenizer, another template
    other = tmp_path / "other"
    shutil.copytree(folders["qwen25"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert HFTokenizer.load(other).sha256 != toks["qwen25"].sha256
    assert toks["llama3"].sha256 != toks["qwen25"].sha256


def test_chat_template_override_and_save(folders, refs, shared_data, tmp_path):
    file = tmp_path / "qwen3.jinja"
    file.write_text(QWEN3_TEMPLATE)
    tok = HFTokenizer.load(folders["qwen25"], chat_template=file)
    assert tok.chat_template_name == f"--chat-template {file}"
    messages = chats(shared_data)["system_multi"]
    rendered = tok.encode_chat(messages)
    assert rendered.ids == template_ids(refs["qwen25"], messages, chat_template=QWEN3_TEMPLATE)
    # A folder that already holds another template: save replaces it whichever file transformers reads.
    out = tmp_path / "export"
    shutil.copytree(folders["qwen25"], out)
    (out / "model.safetensors").write_bytes(b"weights")
    assert tok.save(out) == out
    assert (out / "model.safetensors").read_bytes() == b"weights"  # other files are left alone
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == QWEN3_TEMPLATE
    reread = AutoTokenizer.from_pretrained(out)
    assert reread.chat_template == QWEN3_TEMPLATE
    assert template_ids(reread, messages) == rendered.ids
    again = HFTokenizer.load(out)
    assert again.chat_template == QWEN3_TEMPLATE and again.sha256 == tok.sha256
    assert again.chat_template_name == str(out / "chat_template.jinja")


def test_no_template_is_refused_until_one_is_given(tmp_path, refs):
    folder = qwen2_tokenizer(tmp_path / "bare", template=None)
    tok = HFTokenizer.load(folder)
    assert tok.chat_template is None and tok.stop_ids == (tok.eos_id,)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]
    with pytest.raises(DataError, match=f"{folder} has no chat_template: prepare the data with --chat-template FILE"):
        tok.encode_chat(messages)
    assert tok.encode("plain text") == refs["qwen25"].encode("plain text", add_special_tokens=False)
    file = tmp_path / "chatml.jinja"
    file.write_text(QWEN25_TEMPLATE)
    given = HFTokenizer.load(folder, chat_template=file)
    assert given.encode_chat(messages).ids == template_ids(refs["qwen25"], messages)
    assert given.stop_ids == (given.eos_id, refs["qwen25"].convert_tokens_to_ids("<|im_end|>"))


def test_slow_only_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (folder / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    with pytest.raises(DataError, match=r"slow.*LlamaTokenizer.*save_pretrained"):
        HFTokenizer.load(folder)


def test_bad_inputs_are_refused(folders, toks, tmp_path):
    with pytest.raises(DataError, match="cannot read it"):
        HFTokenizer.load(folders["qwen25"], chat_template=tmp_path / "missing.jinja")
    with pytest.raises(DataError, match="empty conversation"):
        toks["qwen25"].encode_chat([])
    # Mistral's template raises on roles that do not alternate; the message names the template.
    with pytest.raises(DataError, match=r"chat_template.jinja cannot render.*alternate"):
        toks["mistral"].encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    no_eos = tmp_path / "no_eos"
    shutil.copytree(folders["qwen25"], no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"tokenizer_config.json: no eos_token"):
        HFTokenizer.load(no_eos)


@pytest.mark.parametrize("name", ["llama3", "qwen25", "qwen3"])
def test_a_character_who_speaks_first(toks, refs, name):
    """An NPC opens the conversation: an opening assistant turn (nothing before it to render)
    is masked as transformers' marked template masks it."""
    messages = [
        {"role": "assistant", "content": "Halt! Who approaches the gate?"},
        {"role": "user", "content": "A friend."},
        {"role": "assistant", "content": "Then pass, friend."},
    ]
    tok, ref = toks[name], refs[name]
    rendered = tok.encode_chat(messages)
    assert rendered.ids == template_ids(ref, messages)
    assert rendered.trained == reference_mask(ref, messages, with_generation_marks(TEMPLATES[name]))


def test_a_folder_without_tokenizer_config_hashes_as_its_copy(folders, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folders["qwen25"] / "tokenizer.json", bare / "tokenizer.json")
    (bare / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}')
    tok = HFTokenizer.load(bare)
    assert HFTokenizer.load(tok.save(tmp_path / "copy")).sha256 == tok.sha256
