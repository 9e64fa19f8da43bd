"""Ray Train: the per-worker function and the ``TorchTrainer`` launcher. The only ``ray.train`` import."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pertadapt.config.load import config_from_dict, config_to_dict
from pertadapt.config.schema import RunConfig
from pertadapt.report.wandb import open_logger
from pertadapt.train.run import run

__all__ = ["fit_with_ray_train", "train_fn_per_worker", "train_on_local_ray"]

log = logging.getLogger(__name__)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: rebuild the config, train, report every epoch and the final metrics.

    Parameters
    ----------
    loop_config
        ``{"run": <config dict>, "run_dir": str, "resume": bool, "wandb_name": str}``.
    """
    cfg = config_from_dict(loop_config["run"])
    run_dir = Path(loop_config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    logger = open_logger(mode=cfg.logging.wandb, rank=rank, project=cfg.logging.project, group=cfg.logging.group,
                         name=loop_config["wandb_name"], directory=run_dir, config=loop_config["run"])

    def report(metrics: dict[str, float]) -> None:
        logger.log(metrics, step=int(metrics["epoch"]))
        ray.train.report(metrics)

    final = run(cfg, run_dir, report=report, resume=loop_config.get("resume", False))
    logger.finish(final)
    ray.train.report({**final, "done": 1})


def fit_with_ray_train(cfg: RunConfig, run_dir: Path, *, name: str, storage_path: Path, wandb_name: str,
                       callbacks: list | None = None, resume: bool = False, max_failures: int = 0) -> dict[str, Any]:
    """Run one training job on ``engine.workers`` Ray Train workers (DeepSpeed, gloo on CPU).

    Parameters
    ----------
    cfg
        Run config (``engine.workers``, ``engine.cpus_per_worker``, ``engine.use_gpu`` are read).
    run_dir
        The run directory (on storage every worker can reach).
    name
        Ray Train run name (stable: a retried run resumes under it).
    storage_path
        Ray storage root.
    wandb_name
        Name of the W&B run created by rank 0.
    callbacks
        Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    resume
        Continue from ``run_dir/ckpt/last``.
    max_failures
        Worker-group restarts on failure (they resume from ``ckpt/last``).

    Returns
    -------
    dict
        The final metrics reported by rank 0.
    """
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"run": config_to_dict(cfg), "run_dir": str(run_dir), "resume": resume,
                           "wandb_name": wandb_name},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.engine.workers, use_gpu=cfg.engine.use_gpu,
                                               resources_per_worker={"CPU": cfg.engine.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.engine.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path), callbacks=callbacks or [],
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                                              controller_failure_limit=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def train_on_local_ray(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> dict[str, Any]:
    """Start a local Ray instance sized for ``engine.workers``, run :func:`fit_with_ray_train`, stop Ray."""
    import ray

    ray.init(num_cpus=math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 1, log_to_driver=False)
    try:
        return fit_with_ray_train(cfg, run_dir, name=f"train-{cfg.name}", storage_path=run_dir / "ray",
                                  wandb_name=cfg.name, resume=resume)
    finally:
        ray.shutdown()
