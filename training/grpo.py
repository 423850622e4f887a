"""Online RL with group-relative advantages (GRPO; Shao et al. 2024) on the one loop.

One optimizer step, on each rank (`GRPO.rollout`, then the loop's own step):

    the step's prompts (data_pipeline.prompts.PromptStream: each rank its share)
        │  engine.gathered_model(): the whole policy on every rank once (ZeRO-3 gathers each
        │  parameter once, FSDP2 copies its full state dict), so decoding runs no collective
        ▼
    G completions per prompt (model.generate.generate_group: one KV cache per prompt, sampling
        seeded by (seed, epoch, prompt index), so a prompt gets the same completions on any rank)
        ▼
    rewards (training/rewards.py, weighted) → A = (r − group mean) / (group std + ε)
        ▼
    micro-batches: prompt + completion packed as documents, labels on the completion, A on
        each of its tokens (and the reference's log-probs: the LoRA base, adapters off)
        ▼
    loss = Σ over completion tokens of −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·k3-KL,
        divided by the step's global completion-token count (the loop's count), as SFT's

The rollouts are trained on once, in the step that sampled them, so the policy that sampled
them is the one being trained: ρ = exp(logp − logp.detach()) is 1 with the policy gradient
(−A·∇logp per token), and the clip only matters once rollouts are reused (not done here).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from data_pipeline.chat import encode_prompt
from data_pipeline.prompts import PromptStream, read_prompts
from data_pipeline.records import DataError
from data_pipeline.tokenizer import Tokenizer
from model.generate import generate_group
from model.lora import adapters_disabled
from model.loss import IGNORE_INDEX
from training.config import ConfigError, RunConfig
from training.engine import Dist
from training.loop import Objective
from training.objectives import group_advantages, grpo_token_loss
from training.rewards import resolve_rewards, total_reward


class GRPO(Objective):
    """GRPO's objective (cfg.grpo): see the module docstring."""

    name = "grpo"
    count_name = "completion_tokens"
    perplexity = False

    def __init__(self, cfg: RunConfig):
        self.g = cfg.grpo
        try:
            self.rewards = resolve_rewards(self.g.rewards)
        except ValueError as e:
            raise ConfigError(f"grpo.rewards: {e}") from None
        self.tokenizer: Tokenizer | None = None

    def tokenizer_dir(self, cfg: RunConfig) -> Path:
        if cfg.init_from is None:
            raise ConfigError("GRPO starts from a trained model: set init_from=MODEL_DIR (an SFT export)")
        return Path(cfg.init_from)

    def prepare(self, engine, cfg: RunConfig, where: Dist, tokenizer: Tokenizer) -> RunConfig:
        if cfg.train.eval_every or cfg.data.val is not None:
            raise ConfigError("GRPO has no validation loss: leave data.val unset and train.eval_every=0")
        self.tokenizer = tokenizer
        return cfg

    def open_data(self, cfg: RunConfig, where: Dist, folder: str, tokenizer: Tokenizer, shuffle=True, epochs=None):
        items = read_prompts(folder)
        for item in items:
            item.info["prompt_ids"] = encode_prompt(item.messages, tokenizer)
            if len(item.info["prompt_ids"]) + self.g.max_new_tokens > cfg.data.seq_len:
                raise DataError(
                    f"{item.source}: the prompt's {len(item.info['prompt_ids'])} tokens + grpo.max_new_tokens="
                    f"{self.g.max_new_tokens} exceed data.seq_len={cfg.data.seq_len}"
                )
        return PromptStream(
            items,
            prompts_per_batch=self.g.prompts_per_batch,
            rank=where.rank,
            world_size=where.world_size,
            seed=cfg.train.seed,
        )

    def rollout(self, engine, micro: list, cfg: RunConfig, where: Dist) -> tuple[list[dict], dict[str, float]]:
        """The step's prompt micro-batches → training micro-batches, and the rollout's figures."""
        started = time.perf_counter()
        with engine.gathered_model() as model:
            sampled = [[(item, self._sample(model, item, cfg)) for item in prompts] for prompts in micro]
        figures = defaultdict(float, gen_seconds=time.perf_counter() - started, ranks=1.0)
        batches = []
        for prompts in sampled:
            sequences = []
            for item, completions in prompts:
                rewards = self._score(item, completions, figures)
                advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64), len(rewards), self.g.adv_eps)
                figures["equal_groups"] += float(max(rewards) == min(rewards))
                figures["groups"] += 1
                sequences += [
                    (item.info["prompt_ids"], c, float(a)) for c, a in zip(completions, advantages, strict=True)
                ]
            batches.append(_pack(sequences, cfg.data.seq_len, self.tokenizer.pad_id))
            figures["step_tokens"] += sum(len(p) + len(c) - 1 for p, c, _ in sequences)
        if self.g.beta:
            for batch in batches:
                batch["ref_logps"] = self._reference(engine, batch, where)
        return batches, dict(figures)

    def _sample(self, model, item, cfg: RunConfig) -> list[list[int]]:
        digest = hashlib.sha256(f"{cfg.train.seed}/{item.epoch}/{item.index}".encode()).digest()
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(int.from_bytes(digest[:8]) >> 1)
        return generate_group(
            model,
            item.info["prompt_ids"],
            self.g.group_size,
            max_new_tokens=self.g.max_new_tokens,
            temperature=self.g.temperature,
            top_p=self.g.top_p,
            stop_ids=self.tokenizer.stop_ids,
            generator=generator,
        )

    def _score(self, item, completions: list[list[int]], figures: dict) -> list[float]:
        """Each completion's weighted reward (each function's sum kept in `figures`)."""
        stop = set(self.tokenizer.stop_ids)
        totals = []
        for ids in completions:
            finished = bool(ids) and ids[-1] in stop
            text = self.tokenizer.decode(ids[:-1] if finished else ids)
            info = {**item.info, "finished": finished, "completion_tokens": len(ids), "completion_ids": ids}
            info["max_new_tokens"] = self.g.max_new_tokens
            total, values = total_reward(self.rewards, item.messages, text, info)
            for name, value in values.items():
                figures[f"reward_{name}"] += value
                figures[f"reward_{name}_sq"] += value * value
            totals.append(total)
            figures["reward"] += total
            figures["reward_sq"] += total * total
            figures["completions"] += 1
            figures["gen_tokens"] += len(ids)
        return totals

    @torch.no_grad()
    def _reference(self, engine, batch: dict[str, np.ndarray], where: Dist) -> np.ndarray:
        """The frozen base's log-probs of the batch's labels (the adapters switched off)."""
        on_device = {key: torch.as_tensor(value).to(where.device) for key, value in batch.items()}
        with adapters_disabled(engine.model):
            return engine.token_logprobs(on_device).float().cpu().numpy()

    def loss(self, engine, batch: dict[str, torch.Tensor], cfg: RunConfig, train: bool = True) -> tuple:
        logps = engine.token_logprobs(batch)
        out = grpo_token_loss(
            logps,
            logps.detach(),  # the sampling policy: this step's weights (see the module docstring)
            batch.get("ref_logps") if self.g.beta else None,
            batch["advantages"],
            self.g.eps_low,
            self.g.eps_high,
            self.g.beta,
        )
        targets = batch["labels"] != IGNORE_INDEX
        stats = {"clip_frac": torch.where(targets, out.clipped.double(), 0.0).sum()}
        if out.kl is not None:
            stats["kl"] = torch.where(targets, out.kl.double(), 0.0).sum()
        return torch.where(targets, out.losses, 0.0).sum(), stats

    def metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Token means (loss, KL, clip fraction) over the step's completion tokens; reward means
        and stds per completion (the weighted total's and each function's); the share of groups
        whose rewards were all equal (no signal)."""
        n, groups = sums.pop("completions"), sums.pop("groups")
        out = {key: sums.pop(key) / count for key in ("loss", "kl", "clip_frac") if key in sums}
        for key in [k for k in sums if k.startswith("reward") and k.endswith("_sq")]:  # std per function
            mean = sums[key[: -len("_sq")]] / n
            out[key[: -len("_sq")] + "_std"] = math.sqrt(max(sums.pop(key) / n - mean * mean, 0.0))
        out["equal_groups"] = sums.pop("equal_groups") / groups
        out["completion_len"] = sums["gen_tokens"] / n
        out["step_tokens"] = sums.pop("step_tokens")  # trained on, all ranks: the loop's tokens/s
        out["gen_s"] = sums.pop("gen_seconds") / sums.pop("ranks")  # a rank's mean time sampling
        out["gen_tokens_per_s"] = sums.pop("gen_tokens") / out["gen_s"]  # all ranks' sampled tokens
        out.update({key: value / n for key, value in sums.items()})  # reward and each reward_<name>
        return out


def _pack(sequences: list[tuple[list[int], list[int], float]], T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of T tokens, each (prompt + completion) a document, greedily in order: labels on the
    completion (the pipeline's alignment: labels[t] is the target of position t) and each of
    its tokens carrying the completion's advantage."""
    rows, row = [], []
    for prompt, completion, advantage in sequences:
        seq = [*prompt, *completion]
        if row and sum(len(s) - 1 for s, _, _ in row) + len(seq) - 1 > T:
            rows.append(row)
            row = []
        row.append((seq, len(prompt), advantage))
    rows.append(row)
    batch = {
        "tokens": np.full((len(rows), T), pad_id, np.int64),
        "labels": np.full((len(rows), T), IGNORE_INDEX, np.int64),
        "position_ids": np.zeros((len(rows), T), np.int64),
        "doc_ids": np.zeros((len(rows), T), np.int64),
        "advantages": np.zeros((len(rows), T), np.float32),
    }
    for r, row in enumerate(rows):
        fill = 0
        for doc, (seq, prompt_len, advantage) in enumerate(row):
            n = len(seq) - 1
            end = fill + n
            batch["tokens"][r, fill:end] = seq[:-1]
            batch["labels"][r, fill + prompt_len - 1 : end] = seq[prompt_len:]  # the completion's targets
            batch["position_ids"][r, fill:end] = np.arange(n)
            batch["doc_ids"][r, fill:end] = doc
            batch["advantages"][r, fill + prompt_len - 1 : end] = advantage
            fill = end
        batch["position_ids"][r, fill:] = np.arange(T - fill)  # padding: its own document
        batch["doc_ids"][r, fill:] = len(row)
    return batch
