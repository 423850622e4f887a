"""Preference training (DPO) through the one loop: the packed objective, the reference, exactness.

References: each pair's sequences run alone through the model (no packing, full logits and
log_softmax) and the DPO formula written out are the reference of the packed objective (fp32,
1e-5); world 1 × micro-batch 8 is the reference of world 2 × accumulation 2 × micro-batch 2
under FSDP2 and ZeRO-3 (fp32, losses 1e-5); an uninterrupted run is the reference of a
resumed one (1e-6), which reuses the reference log-probs rather than recompute them.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.chat import encode_conversation
from data_pipeline.formats import read_conversations
from data_pipeline.records import DropReport, Sample
from data_pipeline.shards import ShardWriter, load_manifest, write_manifest
from data_pipeline.stream import PackedStream
from data_pipeline.tokenizer import load_tokenizer
from model.hf import load_hf
from model.loss import IGNORE_INDEX
from tests.dist_helpers import global_batches, run_processes
from tests.training_data import SFT_LEN
from training import loop
from training.config import ConfigError, RunConfig, find_config_file
from training.preference import Preference

pytestmark = pytest.mark.slow
SEQ = 512


@pytest.fixture(scope="module")
def pairs(training_data, shared_data, tmp_path_factory) -> Path:
    """Preference shards from RoleBench (no persona prompt, answers cut to 120 characters, so
    that a window packs several pairs): a question with the character's answer chosen and the
    answer to another question rejected."""
    folder = tmp_path_factory.mktemp("pref") / "pairs"
    tok = load_tokenizer(training_data["sft"] / "tokenizer")
    rows = itertools.islice(read_conversations(shared_data / "sft" / "rolebench_en_train.jsonl", "rolebench"), 120)
    convs = [[c.messages[1], {**c.messages[2], "content": c.messages[2]["content"][:120]}] for c in rows]
    with ShardWriter(folder, target_bytes=16 << 10) as writer:
        for i, messages in enumerate(convs):
            rejected = [*messages[:-1], convs[(i + 7) % len(convs)][-1]]
            a, _ = encode_conversation(messages, tok, max_len=SFT_LEN)
            b, _ = encode_conversation(rejected, tok, max_len=SFT_LEN)
            if a is None or b is None or a.input_ids.tolist() == b.input_ids.tolist():
                continue
            writer.write(
                Sample(
                    np.concatenate([a.input_ids, b.input_ids]), np.concatenate([a.labels, b.labels]), (len(a), len(b))
                )
            )
    sha = load_manifest(training_data["sft"])["tokenizer_sha256"]
    write_manifest(folder, kind="preference", shards=writer.shards, tokenizer_sha256=sha, report=DropReport())
    shutil.copytree(training_data["sft"] / "tokenizer", folder / "tokenizer")
    return folder


def make_cfg(run_dir: Path, data: Path, base: Path, engine: str = "single", **train) -> RunConfig:
    cfg = RunConfig(run_dir=str(run_dir), engine=engine, resume="never", init_from=str(base), export_hf=False)
    cfg.data.train, cfg.data.seq_len = str(data), SEQ
    t = cfg.train
    t.precision, t.lr, t.warmup_steps, t.weight_decay, t.schedule = "fp32", 1e-3, 1, 0.0, "constant"
    for key, value in train.items():
        setattr(t, key, value)
    if engine == "deepspeed":
        cfg.deepspeed = json.loads(find_config_file("zero3.json").read_text())
    return cfg


class _Engine:
    """The single engine's token_logprobs on a bare model (all Preference.loss calls)."""

    def __init__(self, model):
        self.model = model

    def token_logprobs(self, b):
        return self.model.token_logprobs(b["tokens"], b["labels"], b["position_ids"], b["doc_ids"])


def _alone(model, ids: np.ndarray, labels: np.ndarray) -> float:
    """A sequence's summed log-probability of its labels, run alone with full logits."""
    logp = torch.log_softmax(model(torch.as_tensor(ids[None], dtype=torch.long)).double(), -1)[0]
    y = torch.as_tensor(labels, dtype=torch.long)
    keep = y != IGNORE_INDEX
    return float(logp[keep].gather(1, y[keep][:, None]).sum().detach())


def test_packed_objective_equals_each_sequence_alone(pairs, lora_base, tmp_path):
    model, _ = load_hf(lora_base)
    model.eval()
    cfg = make_cfg(tmp_path, pairs, lora_base)
    cfg.dpo.beta, cfg.dpo.label_smoothing = 0.3, 0.1
    stream = PackedStream(pairs, seq_len=SEQ, batch_size=4, shuffle_buffer=0)
    batch = next(stream)
    objective = Preference(cfg)
    # The reference log-probs: arbitrary per-token values, summed per sequence like the model's.
    rng = np.random.default_rng(0)
    batch["ref_logps"] = np.where(batch["labels"] != IGNORE_INDEX, -rng.random(batch["labels"].shape), 0).astype(
        np.float32
    )

    want, rows = [], []
    for r in range(4):
        docs = batch["doc_ids"][r]
        for k in range(0, int(docs.max()) + 1, 2):
            c, j = docs == k, docs == k + 1
            if not (batch["labels"][r][c] != IGNORE_INDEX).any() or not j.any():
                continue  # the row's padding
            pc = _alone(model, batch["tokens"][r][c], batch["labels"][r][c])
            pr = _alone(model, batch["tokens"][r][j], batch["labels"][r][j])
            rc, rr = float(batch["ref_logps"][r][c].sum()), float(batch["ref_logps"][r][j].sum())
            h = 0.3 * ((pc - rc) - (pr - rr))
            want.append(-0.9 * math.log(1 / (1 + math.exp(-h))) - 0.1 * math.log(1 / (1 + math.exp(h))))
        rows.append(r)
    assert objective.count(batch) == len(want) > 4  # a row holds two pairs or more

    with torch.no_grad():
        loss_sum, stats = objective.loss(_Engine(model), {k: torch.as_tensor(v) for k, v in batch.items()}, cfg)
    assert float(loss_sum) == pytest.approx(sum(want), rel=1e-5, abs=1e-5)
    assert set(stats) == {
        "rewards_chosen",
        "rewards_rejected",
        "reward_accuracy",
        "reward_margin",
        "logps_chosen",
        "logps_rejected",
    }
    assert float(stats["reward_margin"]) == pytest.approx(
        float(stats["rewards_chosen"] - stats["rewards_rejected"]), rel=1e-6
    )


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_world2_accum2_mb2_equals_world1_mb8(engine, pairs, lora_base, tmp_path):
    steps = 3
    # The reference once, by a one-step run; then fixed global batches of the reference set.
    first = make_cfg(tmp_path / "first", pairs, lora_base, max_steps=1, micro_batch=2)
    loop.train(first, objective=Preference(first))
    scored = tmp_path / "first" / "reference" / "train"
    assert load_manifest(scored)["extra"]["reference"]["source"] == str(pairs.resolve())
    batches = global_batches(PackedStream(scored, seq_len=SEQ, batch_size=8, seed=0), steps)
    assert all("ref_logps" in b and np.abs(b["ref_logps"]).sum() > 0 for b in batches)

    ref_cfg = make_cfg(tmp_path / "ref", scored, lora_base, engine, max_steps=steps, micro_batch=8)
    (ref,) = run_processes(ref_cfg, 1, tmp_path / "ref_out", batches, objective=Preference(ref_cfg))
    cfg = make_cfg(tmp_path / "dist", scored, lora_base, engine, max_steps=steps, micro_batch=2, grad_accum=2)
    dist = run_processes(cfg, 2, tmp_path / "dist_out", batches, objective=Preference(cfg))
    for rank in dist:
        np.testing.assert_allclose(rank["losses"], ref["losses"], rtol=0, atol=1e-5)
    assert ref["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as its reference
    records = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["pairs"] > 0 and 0 <= records[-1]["reward_accuracy"] <= 1
    assert records[-1]["rewards_chosen"] != 0 and records[-1]["reward_margin"] == pytest.approx(
        records[-1]["rewards_chosen"] - records[-1]["rewards_rejected"], abs=1e-6
    )


def test_resume_is_exact_and_reuses_the_reference(pairs, lora_base, tmp_path):
    full = make_cfg(tmp_path / "full", pairs, lora_base, max_steps=4, micro_batch=2)
    want = loop.train(full, objective=Preference(full))["losses"]
    cfg = make_cfg(tmp_path / "run", pairs, lora_base, max_steps=4, micro_batch=2, exit_at_step=2)
    first = loop.train(cfg, objective=Preference(cfg))["losses"]
    manifest = tmp_path / "run" / "reference" / "train" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert f"train: {pairs}" in (tmp_path / "run" / "config.yaml").read_text()  # the user's data, recorded
    cfg.resume, cfg.train.exit_at_step = "auto", 0
    rest = loop.train(cfg, objective=Preference(cfg))["losses"]
    np.testing.assert_allclose(first + rest, want, rtol=0, atol=1e-6)
    assert manifest.stat().st_mtime_ns == stamp  # reused, not scored again by trained weights


def test_each_objective_refuses_the_others_data(pairs, training_data, lora_base, tmp_path):
    cfg = make_cfg(tmp_path / "sft", pairs, lora_base, max_steps=1, micro_batch=2)
    with pytest.raises(ConfigError, match=r"holds preference pairs: train on them with launch/dpo.py"):
        loop.train(cfg)
    cfg = make_cfg(tmp_path / "dpo", training_data["sft"], lora_base, max_steps=1, micro_batch=2)
    with pytest.raises(ConfigError, match=r"is a sft set; preference training needs pairs"):
        loop.train(cfg, objective=Preference(cfg))


def test_lora_dpo_scores_against_its_base_and_writes_an_adapter(pairs, lora_base, tmp_path):
    cfg = make_cfg(tmp_path / "run", pairs, lora_base, max_steps=3, micro_batch=2)
    cfg.train.lora.rank, cfg.train.lora.alpha, cfg.train.lr = 4, 8.0, 1e-2
    summary = loop.train(cfg, objective=Preference(cfg))
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # adapters start at zero: the base
    assert summary["losses"][-1] != pytest.approx(math.log(2), abs=1e-3)
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").is_file()
    record = load_manifest(tmp_path / "run" / "reference" / "train")["extra"]["reference"]
    assert record["lora"]["rank"] == 4 and record["init_from_sha256"]
