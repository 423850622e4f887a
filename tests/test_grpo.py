"""GRPO through the one loop: rollouts, packing, learning, and exactness across ranks.

References: the packing is checked against the sequences it was given; a reward paying for one
token must raise that token's share of the completions within a few steps (the test of a policy
gradient that has its sign right); world 1 × 4 prompts per micro-batch is the reference of
world 2 × accumulation 2 × 1 prompt under FSDP2 and ZeRO-3 with LoRA and the KL to the base (fp32, the
same completions, losses to 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.hf import load_hf
from model.loss import IGNORE_INDEX
from tests.dist_helpers import run_processes
from training import loop
from training.checkpoint import write_export
from training.config import RunConfig, find_config_file
from training.grpo import GRPO, _pack

pytestmark = pytest.mark.slow


def pays_for_token(prompt, completion, info) -> float:
    """The share of the completion's tokens that are the prompt row's target token."""
    ids = info["completion_ids"]
    return sum(i == info["target"] for i in ids) / max(len(ids), 1)


def test_pack_puts_labels_and_advantages_on_the_completion():
    batch = _pack([([5, 6, 7], [8, 9], 1.5), ([5, 6], [10, 11, 12], -0.5)], T=12, pad_id=0)
    tokens, labels, adv = batch["tokens"][0], batch["labels"][0], batch["advantages"][0]
    assert tokens[:4].tolist() == [5, 6, 7, 8] and tokens[4:8].tolist() == [5, 6, 10, 11]
    assert labels[:4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9]  # labels[t] is the target of position t
    assert labels[4:8].tolist() == [IGNORE_INDEX, 10, 11, 12]
    assert adv[:8].tolist() == [0, 0, 1.5, 1.5, 0, -0.5, -0.5, -0.5]
    assert batch["doc_ids"][0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch["position_ids"][0][:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.fixture(scope="module")
def rl_setup(training_data, lora_base, tmp_path_factory) -> dict:
    """Prompts, and a base that samples one token ~10% of the time: its output row is moved
    along the mean final hidden state of the prompts."""
    out = tmp_path_factory.mktemp("grpo")
    prompts = out / "prompts.jsonl"
    questions = ["Who are you?", "Where do you live?", "What do you carry?", "Who is your rival?"]
    rows = [{"messages": [{"role": "user", "content": q}], "question": q} for q in questions]
    model, model_cfg = load_hf(lora_base)
    from data_pipeline.chat import encode_prompt
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(lora_base)
    with torch.no_grad():
        h = torch.cat([model.hidden_states(torch.tensor([encode_prompt(r["messages"], tok)]))[0] for r in rows])
        mean = h.mean(0)
        target = int(torch.randint(100, 900, (), generator=torch.Generator().manual_seed(0)))
        weight = model.output_weight
        weight[target] += 2.7 * mean / mean.square().sum()  # its logit ~ +2.7 on average: p ~ 8%
        probs = torch.softmax(model(torch.tensor([encode_prompt(rows[0]["messages"], tok)]))[0, -1], -1)
    base = write_export(model.state_dict(), model_cfg, out / "base", lora_base)
    prompts.write_text("".join(json.dumps({**r, "target": target}) + "\n" for r in rows))
    return {"prompts": prompts, "base": base, "target": target, "p0": float(probs[target])}


def make_cfg(run_dir: Path, setup: dict, engine: str = "single", **grpo) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir), engine=engine, resume="never", init_from=str(setup["base"]), export_hf=False)
    cfg.data.train, cfg.data.seq_len = str(setup["prompts"]), 256
    t = cfg.train
    t.precision, t.lr, t.warmup_steps, t.weight_decay, t.schedule, t.max_steps = "fp32", 1e-2, 1, 0.0, "constant", 6
    t.micro_batch, t.checkpoint_every = 1, 100
    cfg.grpo.rewards = {"tests.test_grpo:pays_for_token": 1.0}
    cfg.grpo.group_size, cfg.grpo.prompts_per_batch, cfg.grpo.max_new_tokens = 8, 4, 12
    for key, value in grpo.items():
        setattr(cfg.grpo, key, value)
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_reward_for_one_token_raises_its_frequency(rl_setup, tmp_path):
    assert 0.03 < rl_setup["p0"] < 0.3, rl_setup["p0"]
    cfg = make_cfg(tmp_path / "run", rl_setup)
    loop.train(cfg, objective=GRPO(cfg))
    share = [r["reward_tests.test_grpo:pays_for_token"] for r in _records(tmp_path / "run")]
    assert np.mean(share[-2:]) > 2 * np.mean(share[:2]), share
    record = _records(tmp_path / "run")[-1]
    for key in ("reward", "reward_std", "equal_groups", "completion_len", "gen_tokens_per_s", "clip_frac"):
        assert key in record, key


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_world2_accum2_equals_world1_with_lora_and_kl(engine, rl_setup, tmp_path):
    ref_cfg = make_cfg(tmp_path / "ref", rl_setup, engine, beta=0.1, prompts_per_batch=4)
    ref_cfg.train.lora.rank, ref_cfg.train.max_steps = 4, 3
    (ref,) = run_processes(ref_cfg, 1, tmp_path / "ref_out", objective=GRPO(ref_cfg))
    cfg = make_cfg(tmp_path / "dist", rl_setup, engine, beta=0.1, prompts_per_batch=1)
    cfg.train.lora.rank, cfg.train.max_steps, cfg.train.grad_accum = 4, 3, 2
    dist = run_processes(cfg, 2, tmp_path / "dist_out", objective=GRPO(cfg))
    for rank in dist:
        np.testing.assert_allclose(rank["losses"], ref["losses"], rtol=0, atol=1e-5)
    a, b = _records(tmp_path / "ref"), _records(tmp_path / "dist")
    for x, y in zip(a, b, strict=True):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)  # the same completions
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6)
    assert a[-1]["kl"] > 0  # the adapters moved away from the base


def test_resume_is_exact(rl_setup, tmp_path):
    full = make_cfg(tmp_path / "full", rl_setup)
    full.train.max_steps = 4
    want = loop.train(full, objective=GRPO(full))["losses"]
    cfg = make_cfg(tmp_path / "run", rl_setup)
    cfg.train.max_steps, cfg.train.exit_at_step = 4, 2
    first = loop.train(cfg, objective=GRPO(cfg))["losses"]
    cfg.resume, cfg.train.exit_at_step = "auto", 0
    rest = loop.train(cfg, objective=GRPO(cfg))["losses"]
    np.testing.assert_allclose(first + rest, want, rtol=0, atol=1e-6)  # the same prompts and completions
    rewards = [r["reward"] for r in _records(tmp_path / "run")]
    assert rewards == pytest.approx([r["reward"] for r in _records(tmp_path / "full")], abs=1e-12)
