"""deepspeed launch/sft.py --config zero3.json [--config configs/sft/tiny.yaml] [init_from=DIR] [key=value ...]

Supervised fine-tuning (chat / role-play) under the deepspeed launcher; torchrun works too
(`torchrun --nproc-per-node 2 launch/sft.py --config configs/fsdp.yaml ...`), and a plain
`python launch/sft.py` runs one process. Starts from a pretraining export (init_from), trains on
SFT shards whose labels cover only the assistant turns, evaluates data.val every
train.eval_every steps (loss, perplexity) and stops early after train.patience evaluations
without improvement. configs/sft/tiny.yaml is read first; every --config and override is
layered on top of it.
"""

from __future__ import annotations

import sys

from data_pipeline.records import DataError
from training.config import CONFIG_DIR, ConfigError, parse_cli
from training.engine import RankError, exit_without_teardown
from training.loop import TrainingError, train
from training.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, __doc__, default_config=str(CONFIG_DIR / "sft" / "tiny.yaml"))
    try:
        preflight(cfg)  # before the process group: the files every rank will read
        train(cfg)
    except (ConfigError, DataError, TrainingError, RankError) as error:
        print(f"sft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # no group teardown at exit to abort a finished run
