"""Pretraining as a Ray Train job: a TorchTrainer whose workers each run training.loop.train.

Ray starts the workers (one per GPU where the cluster has GPUs, else CPU processes), joins them
in a torch process group (NCCL or gloo) and, through FailureConfig, restarts the whole group when
a worker dies; the restarted loop resumes from the newest complete checkpoint in run_dir
(`resume=auto`), so run_dir must be on storage every node sees. Each checkpoint is also reported
to Ray with the step's metrics.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

from training.checkpoint import find_latest, read_meta
from training.config import ConfigError, RunConfig, deepspeed_config, merge


def run(cfg: RunConfig) -> dict:
    """Run the job on the cluster (cfg.ray.address, $RAY_ADDRESS under `ray job submit`) or on a
    local Ray started here; returns the counters of the final checkpoint (step, tokens, ...)."""
    from launch.ray_cluster import init_ray

    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=cfg.ray.num_workers)  # batch fields checked before any worker starts
    if cfg.engine == "single" and cfg.ray.num_workers > 1:
        raise ConfigError(
            f"engine=single with ray.num_workers={cfg.ray.num_workers}: use engine=fsdp or a DeepSpeed JSON"
        )
    cfg = _absolute_paths(cfg)  # Ray Train runs each worker in its own working directory

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Ray Train's state API needs the dashboard; it listens on 127.0.0.1 only.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    init_ray(address, log_to_driver=True, **local)
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else gpus > 0
    if use_gpu and gpus < cfg.ray.num_workers:
        raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} GPU workers, but the cluster has {gpus:g} GPU(s)")
    run_dir = Path(cfg.run_dir)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": asdict(cfg)},
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


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    cfg = replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    cfg.data = replace(cfg.data, train=str(Path(cfg.data.train).resolve()))
    if cfg.data.val is not None:
        cfg.data.val = str(Path(cfg.data.val).resolve())
    if cfg.init_from is not None:
        cfg.init_from = str(Path(cfg.init_from).resolve())
    if cfg.resume not in ("auto", "never"):
        cfg.resume = str(Path(cfg.resume).resolve())
    return cfg


def _worker(config: dict) -> None:
    """One Ray Train worker: rebuild the config and run the loop, reporting each checkpoint."""
    import logging

    import ray.train

    from training.loop import train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    cfg = RunConfig()
    merge(cfg, config["cfg"], source="ray job config")
    if find_latest(cfg.run_dir) is not None:
        cfg.resume = "auto"  # a restart (or a continued run) goes on from the newest checkpoint
    train(cfg, on_checkpoint=lambda folder, record: ray.train.report({**record, "checkpoint": str(folder)}))
