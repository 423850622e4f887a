"""python launch/evaluate.py MODEL [MODEL ...] --corpus DIR [--items F [--items-format FMT]]
    [--judge rules|DIR] [--out eval.json] [--trust-checkpoint] [--adapter DIR]

Evaluate trained models (HF exports, or run directories with one): perplexity on held-out
text, ROUGE-L against reference answers, persona-fact accuracy (split a) and lore accuracy
(split b) on a corpus written by data_pipeline/synthetic.py (DIR/eval/facts.jsonl,
DIR/eval/lore.jsonl, DIR/heldout.jsonl), and, with two or more checkpoints, a good/same/bad
comparison of the last one against the first (or the --baseline'th) by a judge (the built-in rules, or a model given
as an HF folder). --items adds evaluation items or chats for ROUGE-L and voice consistency:
item files, messages-format chats, or with --items-format any format prepare_data reads
(RoleBench's test split: --items-format rolebench --profiles profiles.yaml). Prints a table
and writes eval.json, and every item's question, reference and answers (with the GSB verdict)
to eval_answers.jsonl beside it, for reading them side by side.

A MODEL may be a peft LoRA adapter folder (a LoRA run's RUN/adapter, or launch/export_hf.py's
export of its checkpoint): it is evaluated on its base, the local folder its adapter_config.json
names, with the adapter's tokenizer. With one MODEL, --adapter DIR applies that adapter to it.

A training checkpoint, or a run directory without an export, as a MODEL or the --judge needs
--trust-checkpoint: a checkpoint is code (loading it unpickles files, which can run code), so
load only your own runs' checkpoints. HF exports (safetensors and JSON) are data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipeline.formats import CONVERSATION_FORMATS, load_profiles
from training.checkpoint import inference_sources
from training.evaluation import (
    answer_rows,
    evaluate_checkpoint,
    gsb_verdicts,
    model_judge,
    read_chat_items,
    read_items,
    rule_judge,
    tally,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        help="HF exports or LoRA adapter folders (or, with --trust-checkpoint, checkpoints)",
    )
    parser.add_argument("--adapter", type=Path, help="a peft LoRA adapter folder to apply to the one MODEL, its base")
    parser.add_argument("--corpus", type=Path, help="a synthetic corpus folder (eval/ splits and heldout.jsonl)")
    parser.add_argument("--items", type=Path, action="append", default=[], help="more evaluation items or chats")
    parser.add_argument(
        "--items-format",
        choices=("items", *CONVERSATION_FORMATS),
        default="items",
        help="the --items files' format: evaluation items or messages chats (default), or a chat format",
    )
    parser.add_argument(
        "--profiles", type=Path, help="role -> character card (.json/.yaml) for --items-format rolebench"
    )
    parser.add_argument("--judge", default="rules", help="'rules' or an HF folder of a judge model (GSB)")
    parser.add_argument(
        "--baseline", type=int, default=1, help="GSB compares the last MODEL against this one (1: the first)"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="the models and judge may be checkpoints or run directories of your own (a checkpoint is code)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="at most this many items per split")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("eval.json"))
    parser.add_argument("--answers", type=Path, help="where the answers go (default: OUT's folder, eval_answers.jsonl)")
    args = parser.parse_args(argv)
    if args.profiles and args.items_format != "rolebench":
        parser.error(f"--profiles is for --items-format rolebench, not {args.items_format}")
    if not 1 <= args.baseline < max(len(args.checkpoints), 2):
        parser.error(
            f"--baseline {args.baseline}: give the number of a MODEL before the last (1..{len(args.checkpoints) - 1})"
        )
    if args.adapter and len(args.checkpoints) > 1:
        parser.error("--adapter goes with one MODEL; to compare adapters, give their folders as MODELs")
    trust = args.trust_checkpoint
    judged = len(args.checkpoints) > 1 and args.judge != "rules"
    try:
        for path in args.checkpoints:  # every model refused now, not after evaluating the first ones
            inference_sources(path, trust, args.adapter)
        if judged:
            inference_sources(args.judge, trust)
        splits, heldout = _splits(args)
        runs = [
            evaluate_checkpoint(c, splits, heldout, args.max_new_tokens, args.device, trust, args.adapter)
            for c in args.checkpoints
        ]
        judge = model_judge(args.judge, args.device, trust_checkpoint=trust) if judged else rule_judge
    except (OSError, ValueError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    rows, answers = [row for row, _ in runs], [ans for _, ans in runs]
    result, verdicts = {"checkpoints": rows}, None
    if len(rows) > 1:
        items = [i for name in splits for i in splits[name]]
        flat = [[a for name in splits for a in ans[name]] for ans in answers]
        base = args.baseline - 1
        verdicts = gsb_verdicts(items, flat[base], flat[-1], judge)
        result["gsb"] = {"baseline": rows[base]["checkpoint"], "candidate": rows[-1]["checkpoint"], "judge": args.judge}
        result["gsb"] |= tally(verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    by_checkpoint = {row["checkpoint"]: ans for row, ans in zip(rows, answers, strict=True)}
    lines = [json.dumps(r, ensure_ascii=False) for r in answer_rows(splits, by_checkpoint, verdicts)]
    (args.answers or args.out.with_name("eval_answers.jsonl")).write_text("".join(f"{line}\n" for line in lines))
    print(table(result))
    return 0


def _splits(args) -> tuple[dict[str, list[dict]], list[str]]:
    splits, heldout = {}, []
    if args.corpus is not None:
        for name in ("facts", "lore"):
            splits[name] = read_items(args.corpus / "eval" / f"{name}.jsonl")
        lines = (args.corpus / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
        heldout = [json.loads(line)["text"] for line in lines if line.strip()]
    profiles = load_profiles(args.profiles) if args.profiles else None
    for path in args.items:
        fmt = args.items_format
        splits[path.stem] = read_items(path) if fmt == "items" else read_chat_items(path, fmt, profiles)
    if not splits:
        raise ValueError("nothing to evaluate: give --corpus DIR and/or --items FILE")
    return {k: v[: args.limit] for k, v in splits.items()}, heldout[: args.limit]


def table(result: dict) -> str:
    """The evaluation as a markdown table (also what the demo's report shows)."""
    keys = [k for k in result["checkpoints"][0] if k not in ("checkpoint", "adapter")]
    lines = ["| checkpoint | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for row in result["checkpoints"]:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        name = row["checkpoint"] + (f" + adapter {row['adapter']}" if "adapter" in row else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "gsb" in result:
        g = result["gsb"]
        lines.append(f"\nGSB ({g['judge']} judge), {g['candidate']} vs {g['baseline']}: ")
        lines[-1] += f"good {g['good']}, same {g['same']}, bad {g['bad']}"
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
