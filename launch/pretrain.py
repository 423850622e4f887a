"""ray job submit -- python launch/pretrain.py [--config configs/pretrain/tiny.yaml] [--config zero2.json] [k=v ...]

Pretrain the decoder as a Ray Train job: Ray starts ray.num_workers workers (GPUs where the
cluster has them, else CPU processes), each runs the training loop on the shards the stream
assigns its rank, and a dead worker restarts the group from the newest checkpoint. Run plainly
(`python launch/pretrain.py ...`) it starts a local Ray on 127.0.0.1. With no arguments it
pretrains configs/pretrain/tiny.yaml, which is read first: every --config
and override is layered on top of it. The engine is fsdp unless a DeepSpeed JSON is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_pipeline.records import DataError
from training.config import CONFIG_DIR, ConfigError, parse_cli
from training.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, __doc__, default_config=str(CONFIG_DIR / "pretrain" / "tiny.yaml"))
    from training.engine import RankError
    from training.loop import TrainingError
    from training.ray_job import run

    try:
        preflight(cfg)  # before Ray starts: the files the workers will read
        state = run(cfg)
    except (ConfigError, DataError, TrainingError, RankError) as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 2
    export = Path(cfg.run_dir) / "hf"
    where = f"export in {export}" if (export / "config.json").is_file() else f"checkpoints in {cfg.run_dir}"
    print(f"pretrain: stopped at step {state.get('step')}, {state.get('tokens', 0):,} tokens; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
