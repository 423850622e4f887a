"""deepspeed launch/dpo.py --config zero3.json [--config configs/dpo/tiny.yaml] [init_from=DIR] [key=value ...]

Preference training (DPO and its relatives: dpo.loss=sigmoid|ipo|sigmoid_norm|simpo) from an SFT
export, on pairs prepared by `launch/prepare_data.py pref`; torchrun and a plain `python
launch/dpo.py` work too, as for launch/sft.py. Before the first step the initial model scores
every pair once (the reference log-probs, kept in run_dir/reference/); with train.lora.rank > 0
the adapters train on the frozen base, which is then the reference. configs/dpo/tiny.yaml is
read first; every --config and override is layered on top of it.
"""

from __future__ import annotations

import sys

from data_pipeline.records import DataError
from training.config import CONFIG_DIR, ConfigError, parse_cli
from training.engine import RankError, exit_without_teardown
from training.loop import TrainingError, train
from training.preference import Preference
from training.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, __doc__, default_config=str(CONFIG_DIR / "dpo" / "tiny.yaml"))
    try:
        preflight(cfg)  # before the process group: the files every rank will read
        train(cfg, objective=Preference(cfg))
    except (ConfigError, DataError, TrainingError, RankError) as error:
        print(f"dpo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # no group teardown at exit to abort a finished run
