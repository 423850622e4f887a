"""Judging a trained model: held-out perplexity, role-play scores and good/same/bad comparisons.

    perplexity       exp(mean next-token loss) over held-out documents (the training loss, on text
                     the model never saw)
    rouge_l          ROUGE-L F1 of the model's answer against the reference answer, over words
                     (CJK text over characters), the metric RoleBench reports
    persona_accuracy share of persona-fact questions (split a: facts in the character card, asked in
                     wordings SFT never used) whose answer states the expected fact and none of the
                     field's other values (an answer listing every town has not answered)
    lore_accuracy    the same on split b: facts only the pretraining lore stated, never an SFT answer
                     of that character, so the answer must come from what pretraining learned
    voice            voice consistency: share of answers that, by their words, read as their own
                     character's and not another's (each answer is matched by TF-IDF cosine to every
                     character's reference answers, its own left out; the nearest must be its own)
    relevance        share of answers that read as answers to the field asked about and not another
                     (the same match, with the references grouped by the items' "field")
    gsb              a pairwise comparison of two checkpoints' answers to the same prompts by a
                     judge, counted as good (the second is better), same, or bad

An evaluation item is `{"messages": [system card, user question], "reference": str}` with an
optional `"expected"` fact string, `"conflicts"` (wrong values of the same field) and `"field"`, as
data_pipeline/synthetic.py writes them; a chat becomes one by taking its last assistant turn as
the reference (read_items for messages-format lines, read_chat_items for every format
data_pipeline.formats reads, RoleBench's included). Answers are greedy, so scores are
reproducible.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from data_pipeline.chat import encode_document, fit_prompt
from data_pipeline.clean import CleanOptions, clean_conversations
from data_pipeline.formats import read_conversations
from data_pipeline.records import DataError, DropReport
from data_pipeline.tokenizer import Tokenizer
from model.decoder import Decoder
from model.generate import generate

Judge = Callable[[dict, str], float]
"""Scores one answer to one item; higher is better."""

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


# --- metrics on text ------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased words; each CJK character is a token of its own (as RoleBench scores Chinese)."""
    return _WORD.findall(text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) between two texts: from the longest common subsequence of tokens.

    Args:
        candidate: the model's answer.
        reference: the reference answer.
    Returns:
        F1 in [0, 1]; 0 when either side has no tokens.
    """
    a, b = rouge_tokens(candidate), rouge_tokens(reference)
    if not a or not b:
        return 0.0
    lcs = _lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(candidate: str, item: dict) -> float:
    """ROUGE-L against the item's reference, or the best of its `references` where it has several
    (RoleBench gives some questions more than one answer)."""
    return max(rouge_l(candidate, r) for r in item.get("references") or [item["reference"]])


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def has_fact(answer: str, expected: str) -> bool:
    """The expected fact appears in the answer (case-insensitive, spaces normalised)."""
    squeeze = lambda s: " ".join(s.lower().split())  # noqa: E731
    return squeeze(expected) in squeeze(answer)


def fact_correct(item: dict, reply: str) -> bool:
    """The reply states the item's expected fact and none of its conflicting values."""
    return has_fact(reply, item["expected"]) and not any(has_fact(reply, v) for v in item.get("conflicts", ()))


# --- the model's side -----------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: Decoder, tok: Tokenizer, texts: Iterable[str], seq_len: int) -> float:
    """exp of the mean next-token loss over documents, each cut into windows of seq_len.

    Args:
        model: the decoder (eval mode).
        tok: its tokenizer.
        texts: held-out documents.
        seq_len: the longest window (the model's training length).
    Returns:
        the perplexity (nan without any token).
    """
    device = next(model.parameters()).device
    loss_sum, count = 0.0, 0
    for text in texts:
        sample = encode_document(text, tok)
        for start in range(0, len(sample.input_ids), seq_len):
            ids = torch.as_tensor(sample.input_ids[start : start + seq_len], dtype=torch.long, device=device)
            labels = torch.as_tensor(sample.labels[start : start + seq_len], dtype=torch.long, device=device)
            s, n = model.loss(ids[None], labels[None])
            loss_sum, count = loss_sum + float(s), count + int(n)
    return math.exp(loss_sum / count) if count else math.nan


def answer(model: Decoder, tok: Tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """The model's greedy answer to a conversation that ends with a user turn (the oldest
    exchanges dropped, the card kept, where the conversation and the answer overflow the context)."""
    prompt, _ = fit_prompt(messages, tok, model.cfg.context_len, max_new_tokens)
    max_new_tokens = min(max_new_tokens, model.cfg.context_len - len(prompt))
    ids = list(generate(model, prompt, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids))
    return tok.decode(ids).strip()


def score(items: list[dict], answers: list[str]) -> dict[str, float]:
    """Mean ROUGE-L against the references; where items carry one, fact accuracy; where two
    characters or more are asked two questions or more, voice consistency; where items name the
    field they ask about, relevance."""
    references = [i["reference"] for i in items]
    result = {"rouge_l": sum(best_rouge_l(a, i) for i, a in zip(items, answers, strict=True)) / len(items)}
    facts = [(i, a) for i, a in zip(items, answers, strict=True) if i.get("expected")]
    if facts:
        result["accuracy"] = sum(fact_correct(i, a) for i, a in facts) / len(facts)
    measured = nearest_group_share(answers, references, [_card(i) for i in items])
    if measured is not None:
        result["voice"] = measured
    if all(i.get("field") for i in items):
        measured = nearest_group_share(answers, references, [i["field"] for i in items])
        if measured is not None:
            result["relevance"] = measured
    return result


def nearest_group_share(answers: list[str], references: list[str], groups: list[str]) -> float | None:
    """Share of answers whose words are nearest to their own group's reference answers.

    Grouped by character, this is voice consistency: an answer counts when it reads as its own
    character's and no other's. Grouped by the field an item asks about, it is relevance: an
    answer counts when it reads as an answer to what was asked (the field's references of every
    character pooled, so voices and catchphrases weigh alike in every group and cancel out);
    a wrong fact in the right words still counts here, and not in accuracy.

    Texts are TF-IDF vectors of their words and word pairs (IDF over the references). An answer
    counts when its cosine to its own group's summed references (its own reference left out) is
    higher than to any other group's. Ties count against it, so an empty answer does not count.
    Only the items of groups with two items or more are counted: for the others there is nothing
    to compare with.

    Args:
        answers, references: the model's and the reference answers, in item order.
        groups: each item's group (any key: the card, a name, a field).
    Returns:
        the share in [0, 1]; None with fewer than two groups or no group of two items.
    """
    docs = [_terms(r) for r in references]
    frequency = Counter(t for d in docs for t in d)  # how many references hold each term
    idf = {t: math.log((1 + len(docs)) / (1 + n)) + 1 for t, n in frequency.items()}
    refs = [_tfidf(d, idf) for d in docs]
    pools: dict[str, Counter] = {}
    for g, r in zip(groups, refs, strict=True):
        pools.setdefault(g, Counter()).update(r)
    size = Counter(groups)
    counted = [i for i, g in enumerate(groups) if size[g] > 1]
    if len(pools) < 2 or not counted:
        return None
    hits = 0
    for i in counted:
        vec, g = _tfidf(_terms(answers[i]), idf), groups[i]
        own = {t: w - refs[i].get(t, 0.0) for t, w in pools[g].items()}  # its own reference left out
        hits += _cosine(vec, own) > max(_cosine(vec, pool) for name, pool in pools.items() if name != g)
    return hits / len(counted)


def _card(item: dict) -> str:
    return next((m["content"] for m in item.get("messages", ()) if m["role"] == "system"), "")


def _terms(text: str) -> Counter:
    """Counts of a text's words (lower-cased; CJK characters one by one) and word pairs."""
    words = [w.lower() for w in rouge_tokens(text)]
    return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)])


def _tfidf(counts: Counter, idf: dict[str, float]) -> dict[str, float]:
    return {t: n * idf[t] for t, n in counts.items() if t in idf}  # words no reference uses carry no signal


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    dot = sum(w * b.get(t, 0.0) for t, w in a.items())
    norm = math.sqrt(sum(w * w for w in a.values()) * sum(w * w for w in b.values()))
    return dot / norm if norm > 0 else 0.0


# --- judges and GSB -------------------------------------------------------------------------------


def rule_judge(item: dict, reply: str) -> float:
    """The default judge: the fact right counts most, then closeness to the reference answer."""
    fact = fact_correct(item, reply) if item.get("expected") else 0.0
    return 2.0 * fact + best_rouge_l(reply, item)


def model_judge(path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False) -> Judge:
    """A judge model given as a Hugging Face folder (or, with trust_checkpoint, a checkpoint of
    your own): the mean log-probability it assigns to the answer's tokens after the prompt (a
    likelihood judge; a stronger model judges better)."""
    from training.checkpoint import load_for_inference

    judge, _, tok = load_for_inference(path, device, trust_checkpoint=trust_checkpoint)

    @torch.no_grad()
    def scored(item: dict, reply: str) -> float:
        # The answer's tokens as the judge's template renders and trains them (its content and
        # the token that closes the turn), scored where they stand in the whole rendering.
        chat = tok.encode_chat([*item["messages"], {"role": "assistant", "content": reply}])
        trained_at = [t for t, trained in enumerate(chat.trained) if trained]
        answer_at = trained_at[len(trained_at) - chat.turn_tokens[-1] :]  # the last turn's (never [-0:], all)
        if not answer_at:
            return -math.inf
        ids = torch.tensor(chat.ids, device=device)
        at = torch.tensor(answer_at, device=device)
        logprobs = torch.log_softmax(judge(ids[None, :-1]).float(), dim=-1)[0]
        return float(logprobs[at - 1].gather(-1, ids[at, None]).mean())

    return scored


def gsb_verdicts(
    items: list[dict], answers_a: list[str], answers_b: list[str], judge: Judge, tie: float = 1e-6
) -> list[str]:
    """Good / same / bad of B's answer against A's on each item, by `judge`.

    Args:
        items: the evaluation items.
        answers_a, answers_b: the baseline's and the candidate's answers, in item order.
        judge: scores one answer.
        tie: score differences up to this count as "same".
    Returns:
        "good" (B is better), "same" or "bad", in item order.
    """
    verdicts = []
    for item, a, b in zip(items, answers_a, answers_b, strict=True):
        diff = judge(item, b) - judge(item, a)
        verdicts.append("good" if diff > tie else "bad" if diff < -tie else "same")
    return verdicts


def tally(verdicts: list[str]) -> dict[str, int]:
    """The GSB counts of a list of verdicts: {"good": n, "same": n, "bad": n}."""
    counts = Counter(verdicts)
    return {k: counts[k] for k in ("good", "same", "bad")}


def answer_rows(
    splits: dict[str, list[dict]], answers: dict[str, dict[str, list[str]]], verdicts: list[str] | None = None
) -> list[dict]:
    """One row per item for reading the answers side by side: split, character and field where
    the item names them, the question (the last user turn), the reference, the expected fact, each
    checkpoint's answer and, with `verdicts` (in split order), the GSB verdict.

    Args:
        splits: evaluation items by split name.
        answers: checkpoint -> split -> answers in item order.
        verdicts: gsb_verdicts over the items of every split, in order, or None.
    """
    rows = []
    for name, items in splits.items():
        for index, item in enumerate(items):
            row = {"split": name, "index": index}
            row |= {k: item[k] for k in ("character", "field") if k in item}
            row["question"] = next(m["content"] for m in reversed(item["messages"]) if m["role"] == "user")
            row |= {k: item[k] for k in ("reference", "references", "expected") if k in item}
            row["answers"] = {checkpoint: by_split[name][index] for checkpoint, by_split in answers.items()}
            rows.append(row)
    if verdicts is not None:
        for row, verdict in zip(rows, verdicts, strict=True):
            row["gsb"] = verdict
    return rows


def read_items(path: str | Path) -> list[dict]:
    """Evaluation items from a .jsonl of items, or of messages-format chats (last assistant turn is
    the reference, the turns before it the prompt)."""
    items = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "reference" not in row:
                last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
                row = {"messages": row["messages"][:last], "reference": row["messages"][last]["content"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: not an evaluation item or a messages chat ({e})") from None
        items.append(row)
    return items


def read_chat_items(path: str | Path, fmt: str, profiles: dict[str, str] | None = None) -> list[dict]:
    """Evaluation items from chat data in a format prepare_data reads (data_pipeline.formats:
    messages, sharegpt, alpaca, rolebench), cleaned as for SFT so the prompts are the ones
    training saw: the last assistant turn is the reference, the turns before it the prompt.
    Chats with the same prompt (RoleBench's several answers to one question) are one item, with
    every answer in `references`.

    Args:
        path: a file or folder.
        fmt: one of data_pipeline.formats.CONVERSATION_FORMATS.
        profiles: for rolebench, role -> character card (data_pipeline.formats.load_profiles).
    Raises:
        DataError: a bad record (naming path:line), or chats that SFT would drop (with the
            drop table): nothing is left out of an evaluation unnoticed.
    """
    report = DropReport()
    chats = list(clean_conversations(read_conversations(path, fmt, profiles=profiles), CleanOptions(), report))
    if report.dropped:
        raise DataError(f"{path}: chats that cannot be evaluation items (fix or remove them):\n{report.table()}")
    items: dict[str, dict] = {}
    for chat in chats:
        prompt, reference = chat.messages[:-1], chat.messages[-1]["content"]
        item = items.setdefault(json.dumps(prompt), {"messages": prompt, "reference": reference, "references": []})
        item["references"].append(reference)
    for item in items.values():
        if len(item["references"]) == 1:
            del item["references"]
    return list(items.values())


# --- one checkpoint on a corpus's splits ------------------------------------------------------------


def evaluate_checkpoint(
    path: str | Path,
    splits: dict[str, list[dict]],
    heldout: list[str],
    max_new_tokens: int = 64,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    adapter: str | Path | None = None,
) -> tuple[dict, dict[str, list[str]]]:
    """Perplexity and role-play scores of one checkpoint.

    Args:
        path: an HF export, LoRA adapter folder, checkpoint or run directory.
        splits: evaluation items by split name; "facts" gives persona_accuracy, "lore"
            lore_accuracy, every split a ROUGE-L (rouge_l is the "facts" one when present).
        heldout: documents for perplexity (none: no perplexity).
        max_new_tokens: the longest answer.
        device: where to run.
        trust_checkpoint: `path` may be a checkpoint (a checkpoint is code: see load_for_inference).
        adapter: a LoRA adapter folder applied to `path` (its base); named in the row's "adapter".
    Returns:
        (the eval.json row, the answers by split for GSB).
    """
    model, model_cfg, tok = _load(path, device, trust_checkpoint, adapter)
    row: dict = {"checkpoint": str(path), **({"adapter": str(adapter)} if adapter is not None else {})}
    if heldout:
        row["perplexity"] = perplexity(model, tok, heldout, model_cfg.context_len)
    answers = {}
    for name, items in splits.items():
        answers[name] = [answer(model, tok, item["messages"], max_new_tokens) for item in items]
        scores = score(items, answers[name])
        row[f"rouge_l_{name}"] = scores["rouge_l"]
        if "accuracy" in scores:
            row["persona_accuracy" if name == "facts" else f"{name}_accuracy"] = scores["accuracy"]
        for key in ("voice", "relevance"):
            if key in scores:
                row[f"{key}_{name}"] = scores[key]
    row["rouge_l"] = row.get("rouge_l_facts", next((v for k, v in row.items() if k.startswith("rouge_l_")), None))
    return row, answers


def _load(path, device, trust_checkpoint: bool, adapter=None):
    from training.checkpoint import load_for_inference

    return load_for_inference(path, device, trust_checkpoint=trust_checkpoint, adapter=adapter)
