"""deepspeed launch/grpo.py --config zero3.json [--config configs/grpo/tiny.yaml] [init_from=DIR] [key=value ...]

Online RL (GRPO) from an SFT export: each step samples grpo.group_size completions per prompt
of data.train (a prompt set: JSON Lines of {"messages": [...], ...info}), scores them with the
reward functions of grpo.rewards, and trains on the group-relative advantages; torchrun and a
plain `python launch/grpo.py` work too, as for launch/sft.py. configs/grpo/tiny.yaml is read
first; every --config and override is layered on top of it.
"""

from __future__ import annotations

import sys

from data_pipeline.records import DataError
from training.config import CONFIG_DIR, ConfigError, parse_cli
from training.engine import RankError, exit_without_teardown
from training.grpo import GRPO
from training.loop import TrainingError, train
from training.preflight import preflight_prompts


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, __doc__, default_config=str(CONFIG_DIR / "grpo" / "tiny.yaml"))
    try:
        preflight_prompts(cfg)  # before the process group: the files every rank will read
        train(cfg, objective=GRPO(cfg))
    except (ConfigError, DataError, TrainingError, RankError) as error:
        print(f"grpo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # no group teardown at exit to abort a finished run
