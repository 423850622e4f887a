"""make demo   (or: python launch/demo.py [--out runs/demo] [--quick])

The quick start, end to end, on the embedded game-world corpus: generate the world
(data_pipeline/synthetic.py) → prepare shards and train the tokenizer (launch/prepare_data.py,
a Ray Data job) → pretrain the tiny model as a Ray Train job with 2 workers (launch/pretrain.py)
→ fine-tune it on role-play chats under `deepspeed launch/sft.py --config zero3.json` (ZeRO-3,
2 processes) → online RL from the SFT export under `torchrun launch/grpo.py` (FSDP2, 2 processes,
rewarded by the world's ground truth) → evaluate the three exports, GSB of RL against SFT
(launch/evaluate.py) → write report.md, loss.png and
eval.json → print a short dialogue with one character (launch/chat.py). Every stage runs the
real entry point, as a user would type it; the commands are printed. Uses the GPUs when there
are any. --quick runs the same path at a toy size (the CPU end-to-end test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Size(NamedTuple):
    """How big a demo run is (both stages run on two workers, so a step is 2 x micro rows)."""

    characters: int
    lore_docs: int
    chats_per_character: int
    vocab: int
    shard_mb: float
    pretrain_steps: int
    """Measured on the full size: SFT after 100 pretraining steps of 2 x 8 rows answered 37% of
    the card questions, after 150 steps 98-100% (the model learns to read its card only from a
    pretrained model that has learnt to copy from context)."""
    pretrain_micro: int
    sft_steps: int
    sft_micro: int
    rl_steps: int
    rl_prompts: int
    """Prompts per micro-batch of each of the two RL workers (× grpo.group_size completions)."""


SIZES = {
    "full": Size(16, 2000, 160, 1536, 0.25, 150, 8, sft_steps=200, sft_micro=4, rl_steps=40, rl_prompts=4),
    "quick": Size(4, 200, 12, 512, 0.02, 4, 1, sft_steps=4, sft_micro=1, rl_steps=2, rl_prompts=1),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a toy-sized run of the same path")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    size = SIZES["quick" if args.quick else "full"]
    started = time.perf_counter()

    from data_pipeline.synthetic import write_corpus
    from training.engine import free_port

    corpus = out / "corpus"
    paths = write_corpus(
        corpus,
        n_characters=size.characters,
        n_lore_docs=size.lore_docs,
        n_chats_per_character=size.chats_per_character,
    )
    print(f"[demo] wrote the game-world corpus to {corpus}", flush=True)
    data = out / "data"
    _prepare_shards(paths, data, size)

    gpus = _gpus()
    workers = min(gpus, 2) if gpus else 2
    precision = "bf16" if gpus else "fp32"  # bf16 on CPU goes through slow autocast kernels
    pretrain = out / "pretrain"
    _run(
        "pretraining (Ray Train, FSDP2)",
        [
            sys.executable,
            "launch/pretrain.py",
            "--config",
            "configs/pretrain/demo.yaml",
            f"run_dir={pretrain}",
            f"data.train={data / 'pretrain'}",
            f"train.max_steps={size.pretrain_steps}",
            f"train.micro_batch={size.pretrain_micro}",
            f"train.precision={precision}",
            f"ray.num_workers={workers}",
        ],
    )
    sft = out / "sft"
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(workers),
        "--master_port",
        str(free_port()),
    ]
    _run(
        "SFT (deepspeed launcher, ZeRO-3)",
        [
            *launcher,
            "launch/sft.py",
            "--config",
            "zero3.json",
            "--config",
            "configs/sft/demo.yaml",
            f"run_dir={sft}",
            f"init_from={pretrain / 'hf'}",
            f"data.train={data / 'sft'}",
            f"data.val={data / 'sft_val'}",
            f"train.max_steps={size.sft_steps}",
            f"train.micro_batch={size.sft_micro}",
            f"train.precision={precision}",
            f"train.eval_every={max(size.sft_steps // 4, 1)}",
        ],
        env={"DS_ACCELERATOR": "cpu"} if not gpus else {},
    )
    rl = _grpo(out / "grpo", sft, paths, size, workers, precision)
    limit = ["--limit", "8"] if args.quick else []
    _run(
        "evaluation",
        [
            sys.executable,
            "launch/evaluate.py",
            pretrain / "hf",
            sft / "hf",
            rl / "hf",
            "--baseline",
            "2",  # GSB: RL against SFT
            "--corpus",
            corpus,
            "--out",
            out / "eval.json",
            "--max-new-tokens",
            "48",  # the reference answers are under 40 tokens
            *limit,
        ],
    )

    dialogue = _dialogue(rl / "hf", paths)
    from launch.evaluate import table
    from training.report import write_report

    report = write_report(
        out,
        {"pretraining": pretrain, "SFT": sft, "RL (GRPO)": rl},
        table(json.loads((out / "eval.json").read_text())),
        dialogue,
    )
    print(
        f"\n{dialogue}\n\n[demo] done in {time.perf_counter() - started:.0f} s: {report}, {out / 'loss.png'}, "
        f"{out / 'eval.json'}, exports in {pretrain / 'hf'}, {sft / 'hf'} and {rl / 'hf'}"
    )
    return 0


def _grpo(rl: Path, sft: Path, paths: dict[str, Path], size: Size, workers: int, precision: str) -> Path:
    """The RL stage: GRPO from the SFT export under torchrun (FSDP2); returns its run folder."""
    from training.engine import free_port

    _run(
        "online RL (GRPO, torchrun, FSDP2)",
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(workers),
            "--master-port",
            str(free_port()),
            "launch/grpo.py",
            "--config",
            "configs/fsdp.yaml",
            "--config",
            "configs/grpo/demo.yaml",
            f"run_dir={rl}",
            f"init_from={sft / 'hf'}",
            f"data.train={paths['rl_prompts']}",
            f"train.max_steps={size.rl_steps}",
            f"train.checkpoint_every={size.rl_steps}",
            f"train.precision={precision}",
            f"grpo.prompts_per_batch={size.rl_prompts}",
        ],
    )
    return rl


def _prepare_shards(paths: dict[str, Path], data: Path, size: Size) -> None:
    """The three prepare_data runs: the tokenizer and pretraining shards, then SFT train and val."""
    prepare = [sys.executable, "launch/prepare_data.py"]
    _run(
        "tokenizer + pretraining shards",
        [
            *prepare,
            "pretrain",
            "--input",
            paths["lore"],
            "--out",
            data / "pretrain",
            "--vocab-size",
            size.vocab,
            "--shard-mb",
            size.shard_mb,
            "--overwrite",  # a second `make demo` prepares the same corpus again
        ],
    )
    for name, part in (("sft_train", 0.4), ("sft_val", 0.04)):
        folder = data / ("sft" if name == "sft_train" else "sft_val")
        _run(
            f"{name} shards",
            [
                *prepare,
                "sft",
                "--format",
                "messages",
                "--input",
                paths[name],
                "--out",
                folder,
                "--tokenizer",
                data / "pretrain" / "tokenizer",
                "--max-len",
                "256",
                "--shard-mb",
                size.shard_mb * part,
                "--overwrite",
            ],
        )


def _dialogue(model: Path, paths: dict[str, Path]) -> str:
    """Two questions to the first character, answered by the fine-tuned model through chat.py."""
    world = json.loads(paths["world"].read_text())
    name = world["characters"][0]["name"]
    lines = [f"**{name}** (character card from {paths['world'].name})", ""]
    for question in ("Which town is your home?", "What do you carry with you?"):
        done = subprocess.run(
            [
                sys.executable,
                "launch/chat.py",
                str(model),
                "--character",
                name,
                "--world",
                str(paths["world"]),
                "--prompt",
                question,
                "--temperature",
                "0",
                "--max-tokens",
                "48",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        lines += [f"> **user:** {question}", ">", f"> **{name}:** {done.stdout.strip()}", ""]
    return "\n".join(lines)


def _run(what: str, cmd: list, env: dict | None = None) -> None:
    """Run one stage's real command line; stop the demo with its name if it fails."""
    cmd = [str(c) for c in cmd]
    print(f"\n[demo] {what}\n$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}).returncode != 0:
        raise SystemExit(f"[demo] the {what} stage failed (its output is above); the command was:\n  {' '.join(cmd)}")
    print(f"[demo] {what}: {time.perf_counter() - started:.0f} s", flush=True)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
