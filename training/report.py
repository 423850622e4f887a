"""The run report: loss curves as a PNG and a markdown summary of configs, speed and evaluation."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics.jsonl lines of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    """Training (and validation, where evaluated) loss per step, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], runs.items(), strict=True):
        rows = read_metrics(run_dir)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.legend(loc="upper left")
        if any("reward" in r for r in rows):  # RL: its loss hovers near 0; the reward tells
            twin = ax.twinx()
            twin.plot([r["step"] for r in rows], [r["reward"] for r in rows], "g-", label="reward")
            twin.set_ylabel("mean reward")
            twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def speed(run_dir: Path) -> str:
    """Mean tokens/s and the data-wait share over the second half of a run."""
    rows = read_metrics(run_dir)
    tail = rows[len(rows) // 2 :] or rows
    tokens = sum(r["tokens_per_s"] for r in tail) / len(tail)
    wait = sum(r["data_wait_frac"] for r in tail) / len(tail)
    if "gen_tokens_per_s" in tail[0]:  # RL: what it sampled, and how fast
        generated = sum(r["gen_tokens_per_s"] for r in tail) / len(tail)
        return f"generation {generated:,.0f} tokens/s (all ranks), {rows[-1]['step']} steps"
    return f"{tokens:,.0f} tokens/s, data wait {wait:.1%}, {rows[-1]['tokens']:,} tokens in {rows[-1]['step']} steps"


def write_report(out: Path, runs: dict[str, Path], eval_table: str, dialogue: str) -> Path:
    """report.md beside loss.png: what ran, how fast, how well, and a sample dialogue."""
    plot_losses(runs, out / "loss.png")
    lines = ["# Crucible demo report", "", "![loss curves](loss.png)", "", "## Runs", ""]
    for name, run_dir in runs.items():
        lines += [f"### {name}: `{run_dir}`", "", f"- speed: {speed(run_dir)}", "", "```yaml"]
        lines += [(Path(run_dir) / "config.yaml").read_text().rstrip(), "```", ""]
    lines += ["## Evaluation", "", eval_table, "", "## A sample dialogue", "", dialogue, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
