"""Generation: the KV cache against the full forward, sampling, greedy parity with transformers'
`generate`, and launch/chat.py end to end on a tiny exported model."""

import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_pipeline.sp_tokenizer import train_tokenizer
from launch import chat
from model import generate as generate_module
from model.config import preset
from model.decoder import Decoder
from model.generate import generate, generate_group, sample_next, sample_tokens
from model.hf import save_hf
from tests.conftest import ROOT

SMALL = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, ffn_dim=96)
CONFIGS = {
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa-qkv-bias-untied": dict(n_kv_heads=1, qkv_bias=True, tie_embeddings=False),
    "qwen3-qk-norm-head-dim": dict(n_kv_heads=2, arch="qwen3", qk_norm=True, head_dim=32),
    "llama3-rope": dict(n_kv_heads=2, rope_type="llama3", rope_theta=500000.0, rope_original_max_len=8),
    "mistral-window": dict(n_kv_heads=2, arch="mistral", sliding_window=20),
}


def small_model(seed=0, **kw) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(preset("tiny", **{**SMALL, **kw}))
    model.init_weights()
    return model.eval()


# --- the KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CONFIGS))
def test_incremental_decoding_with_cache_matches_full_forward(case):
    model = small_model(**CONFIGS[case])
    if model.cfg.qkv_bias:  # zero-initialised; make it count
        for layer in model.layers:
            torch.nn.init.normal_(layer.attn.wqkv.bias, std=0.1)
    tokens = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(batch=2, max_len=24)
    # A prompt chunk, single tokens, then chunks of several new tokens after cached ones.
    cuts = [0, 7, 8, 9, 10, 15, 20]
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)  # fp32


def test_cache_overflow_and_doc_ids_are_refused():
    model = small_model(n_kv_heads=2)
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions; 5 requested"):
            model(torch.tensor([[4, 5]]), cache=cache)
        with pytest.raises(ValueError, match="doc_ids"):
            model(torch.tensor([[1, 2]]), doc_ids=torch.tensor([[0, 0]]), cache=model.new_cache(1, 4))


# --- sampling -------------------------------------------------------------------------------


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0, 0.5])
    assert sample_next(logits, temperature=0.0) == 1
    g = torch.Generator().manual_seed(0)
    # A tiny top_p keeps only the most likely token, whatever the temperature.
    assert {sample_next(logits, temperature=5.0, top_p=1e-6, generator=g) for _ in range(50)} == {1}
    # top_p = 0.5 over probabilities (0.4, 0.35, 0.25): the mass before the third is 0.75, so it is cut.
    probs = torch.tensor([0.4, 0.35, 0.25]).log()
    assert {sample_next(probs, temperature=1.0, top_p=0.5, generator=g) for _ in range(200)} == {0, 1}
    assert {sample_next(probs, temperature=1.0, top_p=1.0, generator=g) for _ in range(200)} == {0, 1, 2}
    # The same seed, the same draws.
    draws = [[sample_next(probs, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(20)] for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_top_p_one_samples_from_the_whole_vocabulary(monkeypatch):
    """At 128k tokens the fp32 running sum of sorted probabilities reaches 1 before the tail; with
    top_p = 1 (no nucleus) no token may be cut."""
    logits = torch.randn(128256, generator=torch.Generator().manual_seed(3)) * 3
    weights = []
    real = torch.multinomial
    monkeypatch.setattr(
        torch, "multinomial", lambda p, n, generator=None: weights.append(p) or real(p, n, generator=generator)
    )
    sample_next(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(weights[0]) == torch.count_nonzero(torch.softmax(logits, -1)) == 128256


def test_sampled_generation_is_reproducible_with_a_generator():
    model = small_model(n_kv_heads=2)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(generate(model, [5, 6, 7], max_new_tokens=12, temperature=1.0, top_p=0.9, generator=gen))

    assert run(0) == run(0)
    assert run(0) != run(1)


# --- greedy parity with transformers --------------------------------------------------------


@pytest.mark.parametrize("case", ["mha", "gqa"])
def test_greedy_generate_matches_transformers(case, tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=96, **CONFIGS[case])
    model = Decoder(cfg)
    model.init_weights()
    save_hf(model, cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 9:].tolist()
    got = generate(model, prompt[0].tolist(), max_new_tokens=24)
    assert isinstance(got, Iterator)  # streamed: ids come one at a time
    assert list(got) == ref


def test_generation_stops_at_a_stop_id_without_yielding_it():
    model = small_model(n_kv_heads=2)
    free = list(generate(model, [3, 1, 4, 1, 5], max_new_tokens=20))
    assert len(free) == 20
    stop = free[6]
    first = free.index(stop)
    assert list(generate(model, [3, 1, 4, 1, 5], max_new_tokens=20, stop_ids=(stop, 100))) == free[:first]
    assert list(generate(model, [3, 1, 4, 1, 5], max_new_tokens=0)) == []


# --- launch/chat.py -------------------------------------------------------------------------

WORDS = "the a red small old quick cat dog bird tree house river sees finds likes eats runs to from over".split()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random model exported with a freshly trained tokenizer, as training writes it."""
    from training.checkpoint import write_export

    root = tmp_path_factory.mktemp("chat")
    lines = [" ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 8)) + "." for i in range(400)]
    tok = train_tokenizer(lines + ["你好，世界。"] * 20, 320, root / "tokenizer")
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    cfg.max_seq_len = 96
    model = Decoder(cfg)
    model.init_weights()
    write_export(model.state_dict(), cfg, root / "hf", root / "tokenizer")
    return {"root": root, "hf": root / "hf", "tok": tok, "model": model, "cfg": cfg}


def run_chat(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "chat.py"), *map(str, args)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # fp32 on CPU, like the reference below
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_chat_answers_one_prompt_as_a_script(exported):
    args = (exported["hf"], "--system", "You are X.", "--prompt", "hi", "--max-tokens", "5", "--temperature", "0")
    result = run_chat(*args)
    assert result.returncode == 0, result.stderr
    # The same answer as generate() on the prompt that the chat template builds.
    from data_pipeline.chat import encode_prompt

    tok = exported["tok"]
    prompt = encode_prompt([{"role": "system", "content": "You are X."}, {"role": "user", "content": "hi"}], tok)
    ids = list(generate(exported["model"], prompt, max_new_tokens=5, stop_ids=(tok.im_end_id, tok.eos_id)))
    assert len(ids) == 5 and result.stdout == tok.decode(ids) + "\n"  # (a random model's text)


def test_chat_missing_model_folder_is_one_error_line(tmp_path):
    missing = tmp_path / "no_such_model"
    result = run_chat(missing, "--prompt", "hi")
    assert result.returncode == 2
    assert str(missing) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_picks_a_character_from_a_world_file(exported, tmp_path, capsys):
    world = tmp_path / "world.json"
    characters = [{"name": "Ada", "card": "You are Ada."}, {"name": "Bram", "card": "You are Bram."}]
    world.write_text(json.dumps({"characters": characters}))
    base = [str(exported["hf"]), "--world", str(world), "--prompt", "hi", "--max-tokens", "4", "--temperature", "0"]
    assert chat.main([*base, "--character", "bram"]) == 0
    by_name = capsys.readouterr().out
    assert chat.main([str(exported["hf"]), "--system", "You are Bram.", *base[3:]]) == 0
    assert capsys.readouterr().out == by_name

    assert chat.main([*base, "--character", "Cleo"]) == 2
    err = capsys.readouterr().err
    assert "'Cleo'" in err and "Ada, Bram" in err and str(world) in err


def test_chat_loads_a_training_run_directory(exported, tmp_path, capsys):
    """A checkpoint (torch.distributed.checkpoint, as the single and FSDP engines write it) and
    the HF export of the same weights answer alike."""
    import torch.distributed.checkpoint as dcp

    from training.engine import single_process_dcp

    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    with single_process_dcp():
        dcp.save({"model": exported["model"].state_dict()}, checkpoint_id=str(folder / "engine"))
    meta = {
        "engine": "single",
        "model": asdict(exported["cfg"]),
        "tokenizer_dir": str(exported["root"] / "tokenizer"),
        "tokenizer_sha256": exported["tok"].sha256,
        "state": {"step": 10},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    args = ["--prompt", "hi", "--max-tokens", "6", "--temperature", "0"]
    assert chat.main([str(exported["hf"]), *args]) == 0
    from_export = capsys.readouterr().out
    assert chat.main([str(tmp_path / "run"), *args]) == 2  # a checkpoint is code: loaded only when trusted
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert chat.main([str(tmp_path / "run"), *args, "--trust-checkpoint"]) == 0
    assert capsys.readouterr().out == from_export


def test_chat_loop_keeps_history_and_drops_the_oldest_when_full(exported, monkeypatch, capsys):
    tok, max_seq_len = exported["tok"], exported["cfg"].max_seq_len
    history = [("cat " * 8, "dog " * 8), ("tree " * 8, "house " * 8), ("red", "old")]
    ids, dropped = chat.build_prompt("You are X.", history, "hi", tok, max_seq_len, max_tokens=20)
    assert dropped > 0 and len(ids) + 20 <= max_seq_len
    ids_all, none_dropped = chat.build_prompt("You are X.", history, "hi", tok, 10_000, max_tokens=20)
    assert none_dropped == 0 and len(ids_all) > len(ids)
    with pytest.raises(chat.ChatError, match="context is 96"):
        chat.build_prompt(None, [], "cat " * 200, tok, max_seq_len, max_tokens=20)

    # The loop, with generation stubbed to answer "ok <猫>" so the prompts can be read back.
    prompts = []

    def fake_generate(model, prompt, **kw):
        prompts.append(prompt)
        yield from tok.encode("ok 猫")

    monkeypatch.setattr(chat, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain\n"))
    assert chat.main([str(exported["hf"]), "--system", "You are X.", "--max-tokens", "20"]) == 0
    assert capsys.readouterr().out == "you> assistant> ok 猫\nyou> you> assistant> ok 猫\nyou> \n"
    assert len(prompts) == 2
    assert tok.decode(prompts[1]).startswith(tok.decode(prompts[0]) + "ok 猫<|im_end|>\n<|im_start|>user\nagain")


def test_streamed_text_waits_for_whole_characters(exported, monkeypatch, capsys):
    tok = exported["tok"]
    text = "cat 猫 dog 鸟"  # characters absent from the tokenizer: three byte tokens each
    ids = tok.encode(text)
    assert len(ids) > len(text)
    monkeypatch.setattr(chat, "generate", lambda model, prompt, **kw: iter(ids))
    writes = []
    monkeypatch.setattr("builtins.print", lambda *a, end="\n", **kw: writes.append("".join(a) + end))
    args = chat.argparse.Namespace(max_tokens=50, temperature=0.0, top_p=1.0)
    assert chat.stream_answer(exported["model"], tok, [1, 2], args, None) == text
    assert "".join(writes) == text + "\n" and not any("\ufffd" in w for w in writes)
    assert len(writes) > 3  # streamed in pieces, not printed once at the end


def test_a_card_the_models_template_refuses_is_one_chat_error(tmp_path):
    """A template that takes no system message (as Mistral v0.1's and Gemma's): a --card is one
    ChatError line naming the template, no traceback."""
    from data_pipeline.tokenizer import load_tokenizer
    from launch.chat import ChatError, check_card
    from tests.hf_fixtures import MISTRAL_TEMPLATE, mistral_tokenizer

    no_system = tmp_path / "no_system.jinja"
    no_system.write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + MISTRAL_TEMPLATE
    )
    tok = load_tokenizer(mistral_tokenizer(tmp_path / "mistral"), chat_template=no_system)
    with pytest.raises(ChatError, match=f"--chat-template {no_system} cannot render.*System role not supported"):
        check_card("You are a guard.", tok, 512)


# --- a group of completions per prompt (GRPO) -----------------------------------------------


def first_stop_cut(row: list[int], stops) -> list[int]:
    """The row up to and including its first stop id."""
    ends = [i for i, t in enumerate(row) if t in stops]
    return row[: ends[0] + 1] if ends else row


@pytest.mark.parametrize("case", ["gqa", "qwen3-qk-norm-head-dim"])
def test_greedy_group_rows_equal_generate(case):
    model = small_model(**CONFIGS[case])
    prompt = [3, 1, 4, 1, 5, 9]
    ref = list(generate(model, prompt, max_new_tokens=16))
    assert generate_group(model, prompt, 1, max_new_tokens=16, temperature=0.0) == [ref]
    assert generate_group(model, prompt, 3, max_new_tokens=16, temperature=0.0) == [ref] * 3


def test_sampled_group_is_reproducible_and_its_rows_differ():
    model = small_model(n_kv_heads=2)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate_group(model, [5, 6, 7], 4, max_new_tokens=12, temperature=1.0, top_p=0.9, generator=gen)

    rows = run(0)
    assert len(rows) == 4 and all(len(r) == 12 for r in rows)
    assert run(0) == rows and run(1) != rows
    assert len({tuple(r) for r in rows}) == 4


def test_group_rows_end_at_their_first_stop_id_and_decoding_stops_when_all_have(monkeypatch):
    model = small_model(n_kv_heads=2)

    def run(stop_ids):
        gen = torch.Generator().manual_seed(0)
        return generate_group(model, [2, 7, 1, 8], 6, max_new_tokens=20, stop_ids=stop_ids, generator=gen)

    free = run(())
    # A stop id that some rows sample and some do not: those run on to max_new_tokens.
    counts = Counter(t for row in free for t in set(row))
    stop = next(t for t, c in counts.most_common() if c < len(free))
    rows = run((stop,))
    assert rows == [first_stop_cut(row, {stop}) for row in free]
    assert any(row[-1] == stop for row in rows) and any(len(row) == 20 and stop not in row for row in rows)

    # Every row ends within its first three ids: decoding stops there (the prefill and one
    # forward per later step), and the ids other rows sampled after their stop are dropped.
    stops = {row[2] for row in free}
    calls = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rows = run(tuple(stops))
    assert rows == [first_stop_cut(row, stops) for row in free]
    assert len(calls) == max(map(len, rows)) <= 3


@pytest.mark.parametrize("case", ["gqa", "mqa-qkv-bias-untied", "mistral-window"])
def test_group_decoding_logits_equal_the_full_forward(case, monkeypatch):
    """The batch-n KV-cache path is exact: the logits each sampled id was drawn from equal the
    full-sequence forward's at that position, for every row."""
    model = small_model(**CONFIGS[case])
    if model.cfg.qkv_bias:  # zero-initialised; make it count
        for layer in model.layers:
            torch.nn.init.normal_(layer.attn.wqkv.bias, std=0.1)
    seen = []  # (n, V) logits of each decoding step
    real = generate_module.sample_tokens
    monkeypatch.setattr(
        generate_module, "sample_tokens", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a)
    )
    prompt = [11, 22, 33, 44, 55]
    gen = torch.Generator().manual_seed(4)
    rows = generate_group(model, prompt, 3, max_new_tokens=12, temperature=1.0, generator=gen)
    assert len(seen) == 12 and len({tuple(r) for r in rows}) == 3
    for i, row in enumerate(rows):
        with torch.no_grad():
            full = model(torch.tensor([prompt + row]))[0, len(prompt) - 1 : -1]  # (12, V): predicting row
        cached = torch.stack([step[i] for step in seen])  # (12, V)
        torch.testing.assert_close(cached.log_softmax(-1), full.log_softmax(-1), rtol=1e-5, atol=1e-5)  # fp32


def test_group_refuses_a_sequence_past_the_context_and_restores_train_modes():
    model = small_model(**CONFIGS["mistral-window"])  # context_len = the window, 20
    with pytest.raises(ValueError, match=r"prompt \(10\) \+ max_new_tokens \(11\) = 21 exceeds model.context_len=20"):
        generate_group(model, list(range(10)), 2, max_new_tokens=11)
    assert [len(r) for r in generate_group(model, list(range(10)), 2, max_new_tokens=10)] == [10, 10]
    assert generate_group(model, [1], 2, max_new_tokens=0) == [[], []]
    model.train()
    model.layers[0].eval()  # a caller's own mix of modes comes back as it was
    generate_group(model, [1, 2], 2, max_new_tokens=3)
    assert model.training and not model.layers[0].training and model.layers[1].training


# --- sample_tokens --------------------------------------------------------------------------


def test_sample_tokens_keeps_each_rows_nucleus_and_greedy_is_each_rows_argmax():
    logits = torch.tensor([[0.4, 0.35, 0.25], [0.1, 0.6, 0.3], [0.2, 0.25, 0.55]]).log()  # (3, 3)
    assert sample_tokens(logits, temperature=0.0).tolist() == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.repeat(300, 1), temperature=1.0, top_p=0.5, generator=g).view(300, 3)
    # Sorted masses before each token: row 0 (0, 0.4, 0.75) keeps {0, 1}; row 1 (0, 0.6, 0.9)
    # keeps only its most likely; row 2 (0, 0.55, 0.8) keeps {2}.
    assert [set(draws[:, r].tolist()) for r in range(3)] == [{0, 1}, {1}, {2}]
    draws = sample_tokens(logits.repeat(300, 1), temperature=1.0, top_p=0.7, generator=g).view(300, 3)
    assert [set(draws[:, r].tolist()) for r in range(3)] == [{0, 1}, {1, 2}, {2, 1}]
    draws = sample_tokens(logits.repeat(300, 1), temperature=1.0, top_p=1.0, generator=g).view(300, 3)
    assert [set(draws[:, r].tolist()) for r in range(3)] == [{0, 1, 2}] * 3
    # sample_next is sample_tokens on one row, draw for draw.
    for seed in range(10):
        one = sample_next(logits[1], 2.0, 0.95, torch.Generator().manual_seed(seed))
        assert one == int(sample_tokens(logits[1:2], 2.0, 0.95, torch.Generator().manual_seed(seed))[0])
