"""The chat template and loss mask: id-for-id parity with transformers' apply_chat_template on the
exported folder, exact per-turn masks in the aligned frame, the over-length policy, documents."""

import json
from pathlib import Path

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

    return AutoTokenizer.from_pretrained(str(tok.save(tmp_path_factory.mktemp("hf"))))


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


# --- the exported model in transformers, and launch/export_hf.py, launch/chat.py -------------


def stop_at_once_model(tok):
    """A tiny decoder whose greedy answer is always <|im_end|>: attention and MLP write nothing,
    so the final hidden state is the (all-ones) embedding, which only <|im_end|>'s row scores."""
    import torch

    from model.config import preset
    from model.decoder import Decoder

    cfg = preset("tiny", vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    cfg.tie_embeddings, cfg.max_seq_len = False, 256
    model = Decoder(cfg)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith("norm.weight") or name == "tok_embeddings.weight":
            state[name].fill_(1.0)
    state["output.weight"][tok.im_end_id] = 1.0
    return state, cfg


@pytest.fixture(scope="module")
def export(tok, tmp_path_factory):
    """The model above exported as training writes it: weights plus the save_hf tokenizer folder."""
    from training.checkpoint import write_export

    root = tmp_path_factory.mktemp("export")
    state, cfg = stop_at_once_model(tok)
    write_export(state, cfg, root / "hf", tok.save(root / "tokenizer"))
    return root / "hf"


def test_transformers_generate_stops_at_the_end_of_a_turn(tok, export, shared_data):
    """config.json names no eos (transformers' Llama default is </s>): generation_config.json
    must, or `generate` talks past <|im_end|> until max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(export)
    messages = rolebench_chat(shared_data, "zh")[:-1]
    prompt = encode_prompt(messages, tok)
    assert template_ids(hf_tok, messages, add_generation_prompt=True) == prompt
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == [*prompt, tok.im_end_id]
    assert model.generation_config.pad_token_id == tok.pad_id


def test_export_hf_writes_the_tokenizer_files_of_its_tokenizer_model(tok, shared_data, tmp_path):
    """`--tokenizer DIR` needs only tokenizer.model (what train_tokenizer writes): the export
    still gets the HF tokenizer, its chat template and the stop ids, all of that tokenizer."""

    from transformers import AutoTokenizer, GenerationConfig

    from launch.export_hf import main as export_hf

    folder = single_checkpoint(tok, tmp_path / "run")
    assert sorted(p.name for p in tok.path.parent.iterdir()) == ["tokenizer.model"]

    assert export_hf([str(folder), "--out", str(tmp_path / "out")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = rolebench_chat(shared_data, "zh")[:-1]
    assert template_ids(hf_tok, messages, add_generation_prompt=True) == encode_prompt(messages, tok)
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [tok.im_end_id, tok.eos_id]


def single_checkpoint(tok, run_dir: Path) -> Path:
    """run_dir/checkpoints/step_00000001 of a one-process run of stop_at_once_model, with its meta.json
    naming the tokenizer's folder (no copy of its own, as checkpoints before they carried one)."""
    from dataclasses import asdict

    import torch.distributed.checkpoint as dcp

    from training.engine import single_process_dcp

    state, cfg = stop_at_once_model(tok)
    folder = run_dir / "checkpoints" / "step_00000001"
    with single_process_dcp():
        dcp.save({"model": state}, checkpoint_id=str(folder / "engine"))
    meta = {"engine": "single", "model": asdict(cfg), "tokenizer_sha256": tok.sha256, "state": {"step": 1}}
    (folder / "meta.json").write_text(json.dumps({**meta, "tokenizer_dir": str(tok.path.parent)}))
    return folder


def one_error_line(capsys, *args) -> str:
    """launch/chat.py's stderr for `args`, checked to be one line after exit code 2."""
    from launch import chat

    assert chat.main([*map(str, args), "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_chat_unreadable_card_or_world_is_one_error_line(export, tmp_path, capsys):
    latin1 = tmp_path / "card_latin1.txt"
    latin1.write_bytes("Tu es Zoë, une sorcière.".encode("latin-1"))
    assert str(latin1) in one_error_line(capsys, export, "--card", latin1)
    assert str(latin1) in one_error_line(capsys, export, "--character", "Zoë", "--world", latin1)
    world = tmp_path / "world.json"
    world.write_text(json.dumps({"characters": [{"name": "Ada", "card": ["You are Ada."]}]}))
    assert str(world) in one_error_line(capsys, export, "--character", "Ada", "--world", world)
    long = tmp_path / "long_card.txt"
    long.write_text("You are Ada. " * 400)  # more tokens than the context
    assert "the character card is" in one_error_line(capsys, export, "--card", long)


def test_chat_damaged_export_is_one_error_line(export, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(export, damaged)
    (damaged / "model.safetensors").write_bytes(b"not safetensors at all")
    assert str(damaged) in one_error_line(capsys, damaged)
    (damaged / "config.json").write_text('{"model_type": "llama",')
    assert str(damaged) in one_error_line(capsys, damaged)


def test_chat_refuses_a_checkpoint_unless_trusted(tok, tmp_path, capsys):
    """A checkpoint is code (loading it unpickles): only --trust-checkpoint loads one."""
    from launch import chat

    folder = single_checkpoint(tok, tmp_path / "run")
    for path in (folder, tmp_path / "run"):  # a checkpoint, and a run directory without an export
        error = one_error_line(capsys, path)
        assert "a checkpoint is code" in error and "--trust-checkpoint" in error
    args = ["--prompt", "hi", "--max-tokens", "2", "--temperature", "0", "--trust-checkpoint"]
    assert chat.main([str(tmp_path / "run"), *args]) == 0
    assert capsys.readouterr().out == "\n"  # this model ends its turn at once
