"""Pretraining as a Ray Train job: a TorchTrainer whose workers each run training.loop.train.

Ray starts the workers (one per GPU where the cluster has GPUs, else CPU processes), joins them
in a torch process group (NCCL or gloo) and, through FailureConfig, restarts the whole group when
a worker dies; the restarted loop resumes from the newest complete checkpoint in run_dir
(`resume=auto`), so run_dir must be on storage every node sees. Each checkpoint is also reported
to Ray with the step's metrics.

An error that a restart would only meet again (a bad config, an `init_from` whose weights do not
load, bad data, a run that diverged) is written to run_dir/fatal_error.json by the worker that
meets it; restarted workers then fail at once instead of training up to it again, and `run`
raises that error, not Ray's wrapper of it. The process group's timeout is collective_timeout_s.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from data_pipeline.files import write_atomically
from data_pipeline.records import DataError
from training.checkpoint import find_latest, read_meta
from training.config import ConfigError, RunConfig, merge
from training.deepspeed_config import deepspeed_config
from training.loop import TrainingError, resume_folder, train
from training.ray_cluster import init_ray

FATAL = "fatal_error.json"
FATAL_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError, TrainingError)}


def run(cfg: RunConfig) -> dict:
    """Run the job on the cluster (cfg.ray.address, $RAY_ADDRESS under `ray job submit`) or on a
    local Ray started here; returns the counters of the final checkpoint (step, tokens, ...)."""
    if cfg.deepspeed is not None:
        deepspeed_config(cfg, world_size=cfg.ray.num_workers)  # batch fields checked before any worker starts
    if cfg.engine == "single" and cfg.ray.num_workers > 1:
        raise ConfigError(
            f"engine=single with ray.num_workers={cfg.ray.num_workers}: use engine=fsdp or a DeepSpeed JSON"
        )
    cfg = _absolute_paths(cfg)  # Ray Train runs each worker in its own working directory
    start = resume_folder(cfg)  # resume=never beside existing checkpoints fails here, not in a worker
    start_step = read_meta(start)["state"]["step"] if start else 0
    run_dir = Path(cfg.run_dir)
    (run_dir / FATAL).unlink(missing_ok=True)

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Ray Train's state API needs the dashboard; it listens on 127.0.0.1 only.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    init_ray(address, log_to_driver=True, **local)
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else gpus > 0
    if use_gpu and gpus < cfg.ray.num_workers:
        raise ConfigError(f"ray.num_workers={cfg.ray.num_workers} GPU workers, but the cluster has {gpus:g} GPU(s)")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": asdict(cfg), "start_step": start_step},
        # Ray Train makes the process group before the loop runs, so the loop's timeout is set here
        torch_config=TorchConfig(timeout_s=cfg.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name=run_dir.name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # Ray's wrapper of the workers' errors
        fatal = _recorded_fatal(run_dir)
        if fatal is None:
            raise
        raise fatal from error
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

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report
    cfg = RunConfig()
    merge(cfg, config["cfg"], source="ray job config")
    recorded = _recorded_fatal(Path(cfg.run_dir))
    if recorded is not None:  # an earlier attempt of this job met it: a restart would meet it again
        raise recorded
    latest = find_latest(cfg.run_dir)
    if latest is not None and read_meta(latest)["state"]["step"] > config["start_step"]:
        cfg.resume = "auto"  # a restart goes on from the newest checkpoint this job wrote
    try:
        train(cfg, on_checkpoint=lambda folder, record: ray.train.report({**record, "checkpoint": str(folder)}))
    except tuple(FATAL_ERRORS.values()) as error:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        record = json.dumps({"type": type(error).__name__, "message": str(error)})
        write_atomically(Path(cfg.run_dir) / FATAL, record)  # whole, whichever rank writes last
        raise


def _recorded_fatal(run_dir: Path) -> Exception | None:
    """The error a worker of this job recorded in run_dir/fatal_error.json, rebuilt; or None."""
    path = run_dir / FATAL
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    return FATAL_ERRORS[recorded["type"]](recorded["message"])
