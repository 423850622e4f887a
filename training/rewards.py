"""Rewards for online RL (GRPO, issue 20): Python functions named in the config with weights.

    reward(prompt: list[dict], completion: str, info: dict) -> float

    prompt      the messages the completion answers (system card, user turn, ...)
    completion  the decoded reply, without its end-of-turn token
    info        the prompt row's other keys (data_pipeline/prompts.py), and what the RL loop adds:
                finished (bool: the completion ended with the end-of-turn token),
                completion_tokens (int), max_new_tokens (int)

Built in, over the synthetic world's ground truth (data_pipeline/synthetic.py rl_prompts rows):

    fact_stated     1 if info["expected"] appears in the completion, else 0
    no_other_fact   1 if none of info["conflicts"] (the field's other values in the world) appears
    closes_turn     1 if info["finished"], else 0
    length_penalty  -completion_tokens / max_new_tokens, in [-1, 0]
    in_voice        ROUGE-L against the row's in-character reference answer(s), in [0, 1]: keeps
                    the character's openers and phrasing while the fact rewards pull
    judge:FOLDER    p(yes) of a judge model (an HF folder) asked about the reply: JudgeReward

"Appears" is the evaluation's own test (training/evaluation.py has_fact: case-insensitive, spaces
normalised), so fact_stated · no_other_fact is 1 exactly where the evaluation counts the answer
correct. Any other function is named `package.module:function`. `resolve_rewards` turns the
config's {name: weight} into functions, and `total_reward` adds them up: Σ weight · reward.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import torch

from training.evaluation import best_rouge_l, has_fact

Reward = Callable[[list[dict], str, dict], float]


def _need(info: dict, key: str, reward: str):
    """info[key], or a ValueError naming the reward and the key it needs."""
    if key not in info:
        raise ValueError(f"reward {reward!r} needs info[{key!r}] (the prompt row's keys: {sorted(info)})")
    return info[key]


def fact_stated(prompt: list[dict], completion: str, info: dict) -> float:
    """1.0 if the expected fact appears in the completion (evaluation.has_fact), else 0.0.

    Args:
        prompt: the messages answered (unused).
        completion: the reply.
        info: holds "expected", the fact string.

    Returns:
        1.0 or 0.0.
    """
    expected = _need(info, "expected", "fact_stated")
    if not isinstance(expected, str) or not expected.strip():
        raise ValueError(f"reward 'fact_stated': info['expected'] must be a non-blank string, got {expected!r}")
    return float(has_fact(completion, expected))


def no_other_fact(prompt: list[dict], completion: str, info: dict) -> float:
    """1.0 if none of the conflicting values appears in the completion (evaluation.has_fact), else 0.0:
    an answer that lists every town has not answered.

    Args:
        prompt: the messages answered (unused).
        completion: the reply.
        info: holds "conflicts", the asked field's values of other characters.

    Returns:
        1.0 or 0.0.
    """
    conflicts = _need(info, "conflicts", "no_other_fact")
    if not isinstance(conflicts, list) or not all(isinstance(v, str) and v.strip() for v in conflicts):
        raise ValueError(
            f"reward 'no_other_fact': info['conflicts'] must be a list of non-blank strings, got {conflicts!r}"
        )
    return float(not any(has_fact(completion, v) for v in conflicts))


def closes_turn(prompt: list[dict], completion: str, info: dict) -> float:
    """1.0 if the completion ended with the end-of-turn token (info["finished"]), else 0.0: a reply
    cut by max_new_tokens never closes its turn.

    Args:
        prompt: the messages answered (unused).
        completion: the reply (unused).
        info: holds "finished", from the RL loop.

    Returns:
        1.0 or 0.0.
    """
    return float(bool(_need(info, "finished", "closes_turn")))


def length_penalty(prompt: list[dict], completion: str, info: dict) -> float:
    """-completion_tokens / max_new_tokens, in [-1, 0].

    An empty completion (no token) scores 0, the best there is: alone, this reward teaches a policy
    to say nothing, so weight it well below the rewards that pay for content.

    Args:
        prompt: the messages answered (unused).
        completion: the reply (unused: its tokens are counted by the loop).
        info: holds "completion_tokens" and "max_new_tokens", from the RL loop.

    Returns:
        The penalty.
    """
    tokens = _need(info, "completion_tokens", "length_penalty")
    budget = _need(info, "max_new_tokens", "length_penalty")
    if budget < 1:
        raise ValueError(f"reward 'length_penalty': info['max_new_tokens'] must be at least 1, got {budget}")
    return -tokens / budget


def in_voice(prompt: list[dict], completion: str, info: dict) -> float:
    """ROUGE-L of the completion against info["reference"] (or the best of info["references"]),
    the evaluation's own measure (training/evaluation.py best_rouge_l), in [0, 1].

    Args:
        prompt: the messages answered (unused).
        completion: the reply.
        info: holds "reference" (an in-character answer) or "references".

    Returns:
        The ROUGE-L F-measure.
    """
    if "references" not in info:
        _need(info, "reference", "in_voice")
    return float(best_rouge_l(completion, info))


BUILTINS: dict[str, Reward] = {
    "fact_stated": fact_stated,
    "no_other_fact": no_other_fact,
    "closes_turn": closes_turn,
    "length_penalty": length_penalty,
    "in_voice": in_voice,
}


# --- a judge model --------------------------------------------------------------------------------

DEFAULT_QUESTION = "Does the reply stay in character as {character} and answer the question?"
JUDGE_PROMPT = "Here is a role-play conversation.\n\n{transcript}\n\n{question} Answer {yes} or {no}."


@functools.cache
def _load_judge(folder: str, device: str, dtype: torch.dtype):
    """(model in eval mode, tokenizer) of an HF folder, loaded once per process and arguments."""
    from data_pipeline.tokenizer import load_tokenizer
    from model.hf import load_hf

    model, _ = load_hf(folder, device=device, dtype=dtype)
    return model.eval(), load_tokenizer(folder)


class JudgeReward:
    """A reward from a judge model: the probability that it answers yes to a question about the reply.

    The judge sees one user message (JUDGE_PROMPT: the conversation as a transcript, the reply, the
    question, then "Answer Yes or No."), rendered with its own chat template, and
    p(yes) = P(yes) / (P(yes) + P(no)), where P(a) is the probability that the judge's answer opens
    with the answer word `a`: the tokens its template renders for an assistant turn `a`, up to the
    end-of-turn token. Normalising over the two answers keeps the score in [0, 1] and independent of
    how much probability a small judge puts elsewhere. The model is loaded once per process (and
    device and dtype), however many JudgeRewards name it.

    Args:
        model_dir: the judge's Hugging Face folder (weights, config.json and tokenizer files).
        question: the question, formatted with the prompt row's info ("{character}" needs
            info["character"]).
        answers: the (yes, no) answer words.
        device: where the judge runs.
        dtype: the judge's weights' dtype.
    """

    def __init__(
        self,
        model_dir: str | Path,
        question: str = DEFAULT_QUESTION,
        *,
        answers: tuple[str, str] = ("Yes", "No"),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ValueError(f"judge {model_dir}: no such folder (expected a Hugging Face model folder)")
        self.model, self.tok = _load_judge(str(folder.resolve()), str(device), dtype)
        self.question = question
        self.answers = answers

    def judge_messages(self, prompt: list[dict], completion: str, info: dict) -> list[dict]:
        """The messages the judge answers: one user turn asking the question about the reply.

        Args:
            prompt, completion, info: as for any reward.

        Returns:
            [{"role": "user", "content": ...}].
        """
        try:
            question = self.question.format(**info)
        except KeyError as e:
            raise ValueError(
                f"judge question {self.question!r} needs info[{e.args[0]!r}] (info: {sorted(info)})"
            ) from e
        transcript = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
        transcript += f"\nReply: {completion}"
        yes, no = self.answers
        text = JUDGE_PROMPT.format(transcript=transcript, question=question, yes=yes, no=no)
        return [{"role": "user", "content": text}]

    @torch.no_grad()
    def __call__(self, prompt: list[dict], completion: str, info: dict) -> float:
        from data_pipeline.chat import encode_prompt

        messages = self.judge_messages(prompt, completion, info)
        head = encode_prompt(messages, self.tok)
        yes, no = (self._logprob(head, self._answer_ids(messages, head, a)) for a in self.answers)
        return float(torch.sigmoid(yes - no))  # P(yes) / (P(yes) + P(no)), without exp overflow

    def _answer_ids(self, messages: list[dict], head: list[int], answer: str) -> list[int]:
        """The ids the judge would generate after `head` to answer `answer`: the template's
        rendering of that assistant turn, up to its end-of-turn token."""
        ids = self.tok.encode_chat([*messages, {"role": "assistant", "content": answer}]).ids
        if ids[: len(head)] != head:
            raise ValueError(
                f"judge: the chat template {self.tok.chat_template_name} renders an answer that does not follow "
                "its own generation prompt; the judge cannot be scored by it"
            )
        rest = ids[len(head) :]
        end = next((i for i, t in enumerate(rest) if t in self.tok.stop_ids), len(rest))
        if end == 0:
            raise ValueError(f"judge: the chat template gives the answer {answer!r} no token")
        return rest[:end]

    def _logprob(self, head: list[int], answer: list[int]) -> torch.Tensor:
        """log P(answer | head) under the judge: its token log-probs summed, by the chunked loss."""
        from model.loss import IGNORE_INDEX

        context = self.model.cfg.context_len
        if len(head) + len(answer) > context:
            raise ValueError(
                f"judge: the question is {len(head) + len(answer)} tokens, past the judge's context of {context}; "
                "use a judge with a longer context, or fewer max_new_tokens"
            )
        device = self.model.output_weight.device
        ids = torch.tensor([*head, *answer], device=device)
        labels = ids[1:].clone()
        labels[: len(head) - 1] = IGNORE_INDEX  # only the answer's tokens are scored
        return self.model.token_logprobs(ids[None, :-1], labels[None]).sum().float().cpu()


# --- from the config ------------------------------------------------------------------------------


def _import(name: str) -> Reward:
    """The function `package.module:function` names."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({e}); {_KNOWN}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {module_name} has no function {attr!r}; {_KNOWN}")
    return fn


_KNOWN = f"a reward is a built-in ({', '.join(BUILTINS)}), judge:/path/to/hf_folder, or package.module:function"


def resolve_rewards(spec: dict[str, float], *, device: str | torch.device = "cpu") -> list[tuple[str, Reward, float]]:
    """The reward functions a config names, with their weights.

    Args:
        spec: name → weight; a name is a built-in (BUILTINS), `judge:/path/to/hf_folder`
            (JudgeReward with its default question) or `package.module:function`.
        device: where judge models run.

    Returns:
        [(name, function, weight)] in the spec's order.

    Raises:
        ValueError: an empty spec, a weight that is not a finite number, an unknown name or a
            function that does not import (naming it and listing the built-ins).
    """
    if not spec:
        raise ValueError(f"no rewards given: {_KNOWN}")
    rewards = []
    for name, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"reward {name!r}: the weight must be a finite number, got {weight!r}")
        if name in BUILTINS:
            fn = BUILTINS[name]
        elif name.startswith("judge:"):
            fn = JudgeReward(name.removeprefix("judge:"), device=device)
        elif ":" in name:
            fn = _import(name)
        else:
            raise ValueError(f"unknown reward {name!r}: {_KNOWN}")
        rewards.append((name, fn, float(weight)))
    return rewards


def total_reward(
    rewards: list[tuple[str, Reward, float]], prompt: list[dict], completion: str, info: dict
) -> tuple[float, dict[str, float]]:
    """Σ weight · reward of one completion, and each reward's own value (for its metrics).

    Args:
        rewards: what resolve_rewards returned.
        prompt, completion, info: as for any reward.

    Returns:
        (total, {name: unweighted value}).

    Raises:
        ValueError: a reward that returns no finite number (naming it): a NaN would poison the
            group's advantages.
    """
    values = {}
    for name, fn, _ in rewards:
        value = fn(prompt, completion, info)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # a bool counts as 0 or 1
            raise ValueError(f"reward {name!r} returned {value!r}, not a finite number")
        values[name] = float(value)
    return sum(weight * values[name] for name, _, weight in rewards), values
