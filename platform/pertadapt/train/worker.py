"""Where a run executes: in this process, or on Ray Train workers (DeepSpeed). The only ``ray.train`` import.

:func:`launch` is the one dispatch every caller uses (``pertadapt train``, a Tune trial): a config that
``uses_ray_train`` runs on ``engine.workers`` Ray Train workers (:func:`train_fn_per_worker` on each),
anything else runs :func:`pertadapt.train.run.run` right here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pertadapt.config.load import config_from_dict, config_to_dict
from pertadapt.config.schema import RunConfig
from pertadapt.train.run import open_run_logger, run

__all__ = ["launch", "train_fn_per_worker"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: rebuild the config, run, report every epoch and the final metrics.

    Parameters
    ----------
    loop_config
        ``{"run": <config dict>, "run_dir": str, "resume": bool, "wandb_name": str}``.
    """
    cfg = config_from_dict(loop_config["run"])
    run_dir = Path(loop_config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    logger = open_run_logger(cfg, run_dir, rank=rank, name=loop_config["wandb_name"])
    run(cfg, run_dir, logger=logger, report=ray.train.report, resume=loop_config.get("resume", False))


def _fit_on_ray_train(cfg: RunConfig, run_dir: Path, *, name: str, storage_path: Path, wandb_name: str,
                      callbacks: Sequence[Any], resume: bool, max_failures: int) -> dict[str, Any]:
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"run": config_to_dict(cfg), "run_dir": str(run_dir), "resume": resume,
                           "wandb_name": wandb_name},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.engine.workers, use_gpu=cfg.engine.use_gpu,
                                               resources_per_worker={"CPU": cfg.engine.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.engine.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage_path), callbacks=list(callbacks),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                                              controller_failure_limit=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def launch(cfg: RunConfig, run_dir: Path, *, name: str | None = None, storage_path: Path | None = None,
           report: Report | None = None, train_callbacks: Sequence[Any] = (), resume: bool = False,
           max_failures: int = 0) -> dict[str, Any]:
    """Run one config where it belongs and return its final metrics.

    Parameters
    ----------
    cfg
        The validated run config (``uses_ray_train`` decides where it runs).
    run_dir
        The run directory (on storage every worker can reach).
    name
        Stable run name: the Ray Train run name (a retried run resumes under it) and the W&B run name
        (default ``cfg.name``).
    storage_path
        Ray storage root (default ``run_dir/ray``).
    report
        In-process runs: called with each epoch's row and the final metrics (e.g. ``ray.tune.report``).
    train_callbacks
        Ray Train runs: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    resume
        Continue from ``run_dir/ckpt/last``.
    max_failures
        Ray Train worker-group restarts on failure.

    Returns
    -------
    dict
        Final metrics.
    """
    name = name or cfg.name
    if not cfg.uses_ray_train:
        return run(cfg, run_dir, logger=open_run_logger(cfg, run_dir, name=name), report=report, resume=resume)
    started_here = not ray.is_initialized()
    if started_here:  # `pertadapt train --workers N`: a local Ray sized for this one run
        ray.init(num_cpus=math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 1, log_to_driver=False)
    try:
        return _fit_on_ray_train(cfg, run_dir, name=f"train-{name}", storage_path=storage_path or run_dir / "ray",
                                 wandb_name=name, callbacks=train_callbacks, resume=resume,
                                 max_failures=max_failures)
    finally:
        if started_here:
            ray.shutdown()
