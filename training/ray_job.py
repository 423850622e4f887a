"""Pretraining as a Ray Train job: a TorchTrainer whose workers each run training.loop.train.

Ray starts the workers (one per GPU where the cluster has GPUs, else CPU processes), joins them
in a torch process group (NCCL or gloo) and, through FailureConfig, restarts the whole group when
a worker dies; the restarted loop resumes from the newest complete checkpoint in run_dir
(`resume=auto`), so run_dir must be on storage every node sees. Each checkpoint is also reported
to Ray with the step's metrics.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from training.checkpoint import find_latest, read_meta
from training.config import RunConfig, deepspeed_config, merge


def run(cfg: RunConfig) -> dict:
    """Run the job on the cluster (cfg.ray.address, $RAY_ADDRESS under `ray job submit`) or on a
    local Ray started here; returns the counters of the final checkpoint (step, tokens, ...)."""
    from launch.ray_cluster import init_ray

    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=cfg.ray.num_workers)  # batch fields checked before any worker starts

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Ray Train's state API needs the dashboard; it listens on 127.0.0.1 only.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    init_ray(address, log_to_driver=True, **local)
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    run_dir = Path(cfg.run_dir).resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": asdict(cfg) | {"run_dir": str(run_dir)}},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if address is None:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    latest = find_latest(run_dir)
    return read_meta(latest)["state"] if latest else {}


def _worker(config: dict) -> None:
    """One Ray Train worker: rebuild the config and run the loop, reporting each checkpoint."""
    import logging

    import ray.train

    from training.loop import train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    cfg = RunConfig()
    merge(cfg, config["cfg"], source="ray job config")
    train(cfg, on_checkpoint=lambda folder, record: ray.train.report({**record, "checkpoint": str(folder)}))
