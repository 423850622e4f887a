"""The user's path from an open model, end to end: a Hugging Face Llama-3-style (scaled RoPE, tied
embeddings) or Qwen2-style (qkv bias) folder with random weights and its own tokenizer and chat
template → `prepare_data.py sft --tokenizer MODEL_DIR` → SFT on two processes (ZeRO-3 through the
deepspeed launcher, FSDP2 through torchrun) → the export, which transformers loads: the same
logits as Crucible's (fp32, 1e-5), and its tokenizer's `apply_chat_template` gives the ids the
run trained on. Also one process, and continued pretraining with the model's own tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards import load_manifest, read_shard
from data_pipeline.tokenizer import load_tokenizer
from model.hf import load_hf
from model.loss import IGNORE_INDEX
from tests.conftest import ROOT
from tests.hf_fixtures import llama3_tokenizer, qwen2_tokenizer

pytestmark = pytest.mark.slow
SEQ = 256


SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
"""The small shape both test models share."""


def _llama3_config(vocab_size: int):
    from transformers import LlamaConfig

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    return LlamaConfig(
        vocab_size=vocab_size,
        rope_theta=500000.0,
        rope_scaling={**scaling, "original_max_position_embeddings": 32},  # scaling shows at T=128
        **SHAPE,
    )


def _qwen2_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, **SHAPE)


MODELS = {"llama3": (llama3_tokenizer, _llama3_config), "qwen2": (qwen2_tokenizer, _qwen2_config)}


def _base_model(arch: str, folder: Path) -> Path:
    """A random-weight HF model folder with the fixture tokenizer's files beside the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tokenizer, make_config = MODELS[arch]
    make_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(vocab + 3))  # a model may have spare rows
    model.save_pretrained(folder)
    return folder


def _chats(shared: Path, out: Path) -> Path:
    """Role-play conversations in the messages format: persona, one or two question/answer turns."""
    rows = [json.loads(line) for line in (shared / "sft" / "rolebench_en_train.jsonl").open()][:60]
    with out.open("w") as f:
        for i in range(0, len(rows), 2):
            a, b = rows[i], rows[i + 1]
            turns = [{"role": "system", "content": f"You are {a['role']}. Stay in character."}]
            for row in (a, b)[: 1 + i % 2]:  # single-turn and two-turn chats alternate
                turns += [
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["generated"][0][:120].strip()},
                ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return out


@pytest.fixture(scope="module")
def open_models(shared_data, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: the base model folder and the SFT data prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("open_models")
    chats = _chats(shared_data, root / "chats.jsonl")
    made = {}
    for arch in MODELS:
        model = _base_model(arch, root / arch)
        data = root / f"{arch}-sft"
        cmd = [sys.executable, "launch/prepare_data.py", "sft", "--format", "messages", "--input", str(chats)]
        cmd += ["--tokenizer", str(model), "--out", str(data), "--max-len", str(SEQ), "--show-masks", "1"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "⟦" in done.stdout  # --show-masks marked the trained tokens
        made[arch] = {"model": model, "data": data, "chats": chats}
    return made


def _sft(engine: str, model: Path, data: Path, run_dir: Path) -> subprocess.CompletedProcess:
    args = [
        f"run_dir={run_dir}",
        f"init_from={model}",
        f"data.train={data}",
        "data.val=null",
        f"data.seq_len={SEQ}",
        "train.max_steps=3",
        "train.micro_batch=2",
        "train.grad_accum=1",
        "train.precision=fp32",
        "train.checkpoint_every=3",
        "train.eval_every=0",
        "train.patience=0",
        "train.lr=1e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    from training.engine import free_port

    if engine == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
        cmd += ["launch/sft.py", "--config", "zero3.json", *args]
    elif engine == "fsdp":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
        ]
        cmd += ["launch/sft.py", "--config", "configs/fsdp.yaml", *args]
    else:
        cmd = [sys.executable, "launch/sft.py", "engine=single", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _first_sample(data: Path):
    manifest = load_manifest(data)
    return next(read_shard(data / manifest["shards"][0]["path"], on_error="raise"))


@pytest.mark.parametrize(
    ("arch", "engine"),
    [("llama3", "deepspeed"), ("llama3", "fsdp"), ("qwen2", "deepspeed"), ("qwen2", "fsdp"), ("qwen2", "single")],
)
def test_finetune_an_open_model_and_load_the_export_in_transformers(arch, engine, open_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = open_models[arch]
    _sft(engine, base["model"], base["data"], tmp_path / "run")
    export = tmp_path / "run" / "hf"
    # the checkpoint carries the tokenizer too, so re-preparing data/ can never orphan it
    copy = tmp_path / "run" / "checkpoints" / "step_00000003" / "tokenizer"
    assert load_tokenizer(copy).sha256 == load_tokenizer(base["model"]).sha256

    # transformers loads the export and computes Crucible's logits
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ours, cfg = load_hf(export)
    assert cfg.arch == ("llama" if arch == "llama3" else "qwen2") and cfg.tie_embeddings
    x = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    before, _ = load_hf(base["model"])
    moved = [n for n, p in ours.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert moved, "three steps of SFT must have changed the weights"

    # its tokenizer is the base model's, chat template included, and renders what training used
    tok = AutoTokenizer.from_pretrained(export)
    base_tok = AutoTokenizer.from_pretrained(base["model"])
    assert tok.chat_template == base_tok.chat_template and tok.get_vocab() == base_tok.get_vocab()
    messages = json.loads(base["chats"].read_text().splitlines()[0])["messages"]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    sample = _first_sample(base["data"])
    np.testing.assert_array_equal(sample.input_ids, ids[:-1])
    trained = sample.labels != IGNORE_INDEX
    np.testing.assert_array_equal(sample.labels[trained], np.asarray(ids[1:])[trained])
    # the trained tokens are the answer and the end of its turn, nothing of the prompt
    answer = tok.decode(sample.labels[trained])
    assert messages[-1]["content"].strip() in answer and messages[1]["content"] not in answer
    generation = json.loads((export / "generation_config.json").read_text())
    assert set(load_tokenizer(base["model"]).stop_ids) <= set(generation["eos_token_id"])
    if engine == "single":  # chat and evaluation take the export and render with its template
        _chat_and_evaluate(base["model"], export, base["chats"], tmp_path)


def _chat_and_evaluate(base: Path, export: Path, chats: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd = [sys.executable, "launch/chat.py", str(export), "--system", "You are Jack Sparrow.", "--prompt", "Hi"]
    done = subprocess.run([*cmd, "--temperature", "0", "--max-tokens", "6"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # the greedy answer is transformers' generate on apply_chat_template's prompt, stopped at a stop id
    tok, hf = AutoTokenizer.from_pretrained(export), AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "You are Jack Sparrow."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1] :]
    assert done.stdout.strip() == tok.decode(out, skip_special_tokens=True).strip()
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(chats.read_text().splitlines()[:2]) + "\n")
    # the base model against the fine-tuned one, judged by the fine-tuned one's likelihood of each answer
    cmd = [sys.executable, "launch/evaluate.py", str(base), str(export), "--items", str(items), "--judge", str(export)]
    done = subprocess.run(
        [*cmd, "--max-new-tokens", "4", "--out", str(tmp_path / "eval.json")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert all(row["rouge_l"] is not None for row in result["checkpoints"])
    assert sum(result["gsb"][k] for k in ("good", "same", "bad")) == 2


def test_continued_pretraining_frames_documents_with_the_models_own_bos_and_eos(open_models, shared_data, tmp_path):
    """pretrain data prepared with the Llama-3-style tokenizer: one <|begin_of_text|> (the tokenizer
    adds it) and the tokenizer's eos around each document, none doubled; the run continues from the
    base weights in one process and refuses data made with another tokenizer, naming both."""
    from training.config import RunConfig
    from training.loop import train

    base = open_models["llama3"]
    text = tmp_path / "lore.txt"
    text.write_text((shared_data / "pretrain" / "tinyshakespeare.txt").read_text()[:20000])
    data = tmp_path / "pretrain"
    cmd = [sys.executable, "launch/prepare_data.py", "pretrain", "--input", str(text), "--split", "\n\n"]
    cmd += ["--tokenizer", str(base["model"]), "--out", str(data)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tok = load_tokenizer(data / "tokenizer")
    sample = _first_sample(data)
    ids = [*sample.input_ids, sample.labels[-1]]
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1

    cfg = RunConfig(run_dir=str(tmp_path / "run"), engine="single", resume="never", init_from=str(base["model"]))
    cfg.data.train, cfg.data.seq_len = str(data), SEQ
    cfg.train.precision, cfg.train.max_steps, cfg.train.micro_batch = "fp32", 2, 2
    cfg.train.checkpoint_every, cfg.train.eval_every, cfg.train.patience = 2, 0, 0
    summary = train(cfg)
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"]))

    cfg.init_from, cfg.run_dir = str(open_models["qwen2"]["model"]), str(tmp_path / "other")
    from training.config import ConfigError

    with pytest.raises(ConfigError, match=f"(?s){open_models['qwen2']['model']}.*{data}"):
        train(cfg)
