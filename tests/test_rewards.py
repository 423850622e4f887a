"""RL rewards: the built-ins on hand-written cases (matching as the evaluation matches), the judge's
p(yes) against transformers on the exported folder, and resolving a config's {name: weight}."""

import math

import pytest
import torch

from training import rewards
from training.evaluation import fact_correct
from training.rewards import (
    BUILTINS,
    JudgeReward,
    closes_turn,
    fact_stated,
    length_penalty,
    no_other_fact,
    resolve_rewards,
    total_reward,
)

PROMPT = [
    {"role": "system", "content": "You are Halka, a goblin baker from Emberfall."},
    {"role": "user", "content": "Where are you from?"},
]
INFO = {
    "character": "Halka",
    "field": "home",
    "expected": "Emberfall",
    "conflicts": ["Frostholm", "Stone Gate"],
    "finished": True,
    "completion_tokens": 12,
    "max_new_tokens": 48,
}


# --- built-ins -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, stated, no_other",
    [
        ("Hmph. I hail from Emberfall, of course.", 1.0, 1.0),
        ("I LIVE IN EMBERFALL!", 1.0, 1.0),  # case-insensitive
        ("Emberfall or Frostholm, who knows.", 1.0, 0.0),  # listing the towns is no answer
        ("My home is  stone\ngate.", 0.0, 0.0),  # spaces normalised, as the evaluation does
        ("I am a goblin.", 0.0, 1.0),
        ("", 0.0, 1.0),
    ],
)
def test_fact_rewards_match_as_the_evaluation_does(completion, stated, no_other):
    assert fact_stated(PROMPT, completion, INFO) == stated
    assert no_other_fact(PROMPT, completion, INFO) == no_other
    assert (stated * no_other == 1.0) == fact_correct(INFO, completion)


def test_closes_turn_and_length_penalty():
    assert closes_turn(PROMPT, "x", INFO) == 1.0
    assert closes_turn(PROMPT, "x", {**INFO, "finished": False}) == 0.0
    assert length_penalty(PROMPT, "x", INFO) == -0.25
    assert length_penalty(PROMPT, "x" * 99, {**INFO, "completion_tokens": 48}) == -1.0
    assert length_penalty(PROMPT, "", {**INFO, "completion_tokens": 0}) == 0.0  # empty: no penalty
    with pytest.raises(ValueError, match="max_new_tokens'] must be at least 1"):
        length_penalty(PROMPT, "x", {**INFO, "max_new_tokens": 0})


@pytest.mark.parametrize(
    "reward, key",
    [
        (fact_stated, "expected"),
        (no_other_fact, "conflicts"),
        (closes_turn, "finished"),
        (length_penalty, "max_new_tokens"),
    ],
)
def test_a_missing_info_key_is_named(reward, key):
    info = {k: v for k, v in INFO.items() if k != key}
    with pytest.raises(ValueError, match=rf"reward '{reward.__name__}' needs info\['{key}'\]"):
        reward(PROMPT, "Emberfall", info)


def test_bad_ground_truth_is_refused():
    with pytest.raises(ValueError, match="non-blank string"):
        fact_stated(PROMPT, "x", {"expected": ""})
    with pytest.raises(ValueError, match="list of non-blank strings"):
        no_other_fact(PROMPT, "x", {"conflicts": "Frostholm"})


# --- resolve and total ---------------------------------------------------------------------------


def paid_for_brevity(prompt, completion, info):
    """An importable reward for the tests: 1 for a reply of at most three words."""
    return float(len(completion.split()) <= 3)


def test_resolve_builtins_and_import_paths_and_total_is_the_weighted_sum():
    spec = {"fact_stated": 1.0, "no_other_fact": 0.5, "length_penalty": 0.2, "tests.test_rewards:paid_for_brevity": 2}
    resolved = resolve_rewards(spec)
    assert [(name, weight) for name, _, weight in resolved] == [(k, float(v)) for k, v in spec.items()]
    assert resolved[0][1] is fact_stated and resolved[3][1] is paid_for_brevity
    total, values = total_reward(resolved, PROMPT, "Emberfall, friend.", INFO)
    assert values == {
        "fact_stated": 1.0,
        "no_other_fact": 1.0,
        "length_penalty": -0.25,
        "tests.test_rewards:paid_for_brevity": 1.0,
    }
    assert total == pytest.approx(1.0 + 0.5 - 0.05 + 2.0)


@pytest.mark.parametrize(
    "name, message",
    [
        ("fact_stateed", "unknown reward 'fact_stateed'"),
        ("no_such_module_x:f", "cannot import 'no_such_module_x'"),
        ("tests.test_rewards:no_such_function", "has no function 'no_such_function'"),
        ("tests.test_rewards:INFO", "has no function 'INFO'"),  # not callable
    ],
)
def test_unknown_or_unimportable_names_are_refused_listing_the_builtins(name, message):
    with pytest.raises(ValueError, match=message) as caught:
        resolve_rewards({name: 1.0})
    assert all(b in str(caught.value) for b in BUILTINS) and "judge:" in str(caught.value)


@pytest.mark.parametrize("weight", [float("nan"), math.inf, "1", True, None])
def test_weights_must_be_finite_numbers(weight):
    with pytest.raises(ValueError, match="reward 'fact_stated': the weight must be a finite number"):
        resolve_rewards({"fact_stated": weight})


def test_an_empty_spec_and_a_missing_judge_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no rewards given"):
        resolve_rewards({})
    with pytest.raises(ValueError, match="no such folder"):
        resolve_rewards({f"judge:{tmp_path / 'nowhere'}": 1.0})


def test_a_reward_that_returns_nan_is_named():
    resolved = [("bad", lambda p, c, i: math.nan, 1.0)]
    with pytest.raises(ValueError, match="reward 'bad' returned nan"):
        total_reward(resolved, PROMPT, "x", INFO)


# --- the judge -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny random model exported to an HF folder with a tokenizer trained on the judge's words."""
    from data_pipeline import synthetic
    from data_pipeline.sp_tokenizer import train_tokenizer
    from model.config import preset
    from model.decoder import Decoder
    from training.checkpoint import write_export

    root = tmp_path_factory.mktemp("judge")
    world = synthetic.make_world(0, 4)
    lines = synthetic.lore_documents(world, n_docs=40) + [rewards.JUDGE_PROMPT, rewards.DEFAULT_QUESTION, "Yes No"]
    tok = train_tokenizer(lines, 400, root / "tokenizer", num_threads=1)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    model = Decoder(cfg)
    model.init_weights()
    return write_export(model.state_dict(), cfg, root / "hf", tok)


def _direct_p_yes(folder, messages) -> float:
    """p(yes) from transformers' model and tokenizer on the same folder: log P of each answer's
    tokens (its rendering after the generation prompt, up to the end of turn), normalised over both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    logps = []
    for answer in ("Yes", "No"):
        full = hf_tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
        )
        assert full[: len(head)] == head
        answer_ids = full[len(head) : full.index(hf_tok.convert_tokens_to_ids("<|im_end|>"), len(head))]
        ids = torch.tensor([head + answer_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        logps.append(sum(float(logprobs[len(head) - 1 + k, t]) for k, t in enumerate(answer_ids)))
    return math.exp(logps[0]) / (math.exp(logps[0]) + math.exp(logps[1]))


def test_judge_gives_a_deterministic_probability_equal_to_a_direct_computation(judge_dir):
    judge = JudgeReward(judge_dir)
    reply = "Hmph. I hail from Emberfall."
    p = judge(PROMPT, reply, INFO)
    assert 0.0 <= p <= 1.0 and p == judge(PROMPT, reply, INFO)
    messages = judge.judge_messages(PROMPT, reply, INFO)
    assert "stay in character as Halka" in messages[0]["content"] and reply in messages[0]["content"]
    assert p == pytest.approx(_direct_p_yes(judge_dir, messages), abs=1e-5)
    assert judge(PROMPT, "I am a goblin.", INFO) != p  # the reply matters


def test_judge_is_loaded_once_per_process_and_resolved_by_name(judge_dir):
    a = JudgeReward(judge_dir)
    ((name, b, weight),) = resolve_rewards({f"judge:{judge_dir}": 0.5})
    assert a.model is b.model and name == f"judge:{judge_dir}" and weight == 0.5
    assert b(PROMPT, "Emberfall.", INFO) == a(PROMPT, "Emberfall.", INFO)


def test_judge_names_a_missing_question_key_and_an_overflowing_prompt(judge_dir):
    judge = JudgeReward(judge_dir)
    with pytest.raises(ValueError, match=r"needs info\['character'\]"):
        judge(PROMPT, "x", {"expected": "Emberfall"})
    with pytest.raises(ValueError, match="past the judge's context"):
        judge(PROMPT, "Emberfall " * 2000, INFO)


def test_in_voice_is_the_evaluations_rouge_against_the_reference():
    from training.evaluation import rouge_l
    from training.rewards import in_voice

    info = {"reference": "Hmph. I hail from Emberfall, of course. Steel remembers."}
    assert in_voice(PROMPT, info["reference"], info) == pytest.approx(1.0)
    assert in_voice(PROMPT, "I hail from Emberfall.", info) == pytest.approx(
        rouge_l("I hail from Emberfall.", info["reference"])
    )
    assert 0 < in_voice(PROMPT, "I hail from Emberfall.", info) < 1
    assert in_voice(PROMPT, "x", {"references": ["x", "y"]}) == pytest.approx(1.0)  # the best of several
    with pytest.raises(ValueError, match="in_voice.*reference"):
        in_voice(PROMPT, "x", {})
