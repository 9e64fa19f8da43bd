"""Where a run executes: in this process, or on Ray Train workers (DeepSpeed). The only ``ray.train`` import.

:func:`launch` is the one dispatch every caller uses (``pertadapt train``, a Tune trial): a config that
``uses_ray_train`` runs on ``engine.workers`` Ray Train workers (:func:`train_fn_per_worker` on each),
anything else runs :func:`pertadapt.train.run.run` right here.

On Ray Train every epoch's checkpoint (each rank's files, merged by Ray) is reported with the epoch's
metrics into Ray storage as ``<storage>/train-<name>/epoch_<n>``; Ray keeps the best (``eval.select_metric``)
and the latest. When a worker or node fails, Ray restarts the worker group (``engine.max_failures``
times) and each worker restores the latest checkpoint (model, optimiser, epoch, RNG states) from
``ray.train.get_checkpoint()``; the world-size-invariant step order makes the resumed run end with the
metrics of an uninterrupted one. A non-finite loss is not retried (the run directory records it). At the
end, the selected epoch's checkpoint is also copied to the run directory's best checkpoint.

A run directory on an object store (:class:`~pertadapt.rundir.RunDir`) travels to the workers as its URI:
rank 0 pulls it into its node's copy and commits it before every report and at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pertadapt.config.load import config_from_dict, config_to_dict
from pertadapt.config.pretrain import PretrainConfig, pretrain_config_from_dict
from pertadapt.config.schema import RunConfig
from pertadapt.remote import delete, exists, is_uri, join, list_dir, pull_tree, under
from pertadapt.report.logger import NullLogger
from pertadapt.rundir import RunDir
from pertadapt.train.checkpoint import (
    STATE_FILE,
    CheckpointEngine,
    CheckpointError,
    has_checkpoint,
    read_checkpoint,
    replace_dir,
    require_checkpoint,
)
from pertadapt.train.fm_weights import resolve_pretrain
from pertadapt.train.pretrain import pretrain, read_model_card, summary_of
from pertadapt.train.run import NODE_ID_ENV, NODE_IP_ENV, open_run_logger, run
from pertadapt.train.setup import ensure_data_file
from pertadapt.train.timeline import mark

__all__ = ["RayCheckpoints", "has_resumable_checkpoint", "launch", "launch_pretrain", "pretrain_fn_per_worker",
           "record_ray_node", "scaling_config", "train_fn_per_worker"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]


class RayCheckpoints:
    """Checkpoints in Ray Train storage (see the module docstring); also the worker's report hook.

    Parameters
    ----------
    run
        The run directory (the selected epoch's checkpoint is copied to its best checkpoint).
    commit
        Commit the run directory before every report (rank 0), so that a store holds the epoch's files by
        the time Ray counts the epoch.
    """

    def __init__(self, run: RunDir, *, commit: bool) -> None:
        self.run, self.commit = run, commit
        self._pending: tuple[Path, int] | None = None

    def restore(self, engine: CheckpointEngine) -> dict[str, Any] | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return engine.load(Path(d))

    def save(self, engine: CheckpointEngine, client_state: dict[str, Any], is_best: bool) -> None:
        directory = Path(tempfile.mkdtemp(prefix="pertadapt-ckpt-"))
        engine.save(directory, client_state)
        self._pending = (directory, int(client_state["epoch"]))

    def report(self, metrics: dict[str, Any]) -> None:
        """``ray.train.report`` of an epoch's row with that epoch's checkpoint (or of the final metrics)."""
        if self.commit:
            self.run.commit()
        if self._pending is None:
            ray.train.report(metrics)
            return
        directory, epoch = self._pending
        self._pending = None
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def load_best(self, engine: CheckpointEngine, epoch: int) -> dict[str, Any]:
        found = [r.checkpoint for r in ray.train.get_all_reported_checkpoints() if r.metrics.get("epoch") == epoch]
        if not found:
            raise CheckpointError(f"Ray storage holds no checkpoint of the selected epoch {epoch}")
        with found[-1].as_directory() as d:
            state = engine.load(Path(d))
            if engine.rank == 0:
                copy = self.run.checkpoints / ".best.new"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(d, copy)
                replace_dir(copy, self.run.best_checkpoint)
        return state


def record_ray_node() -> None:
    """Tell :func:`~pertadapt.train.run.run` the Ray node this process runs on (the provenance's ``ranks``)."""
    os.environ[NODE_ID_ENV] = ray.get_runtime_context().get_node_id()
    os.environ[NODE_IP_ENV] = ray.util.get_node_ip_address()


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: rebuild the config, restore the latest checkpoint, run, report.

    Parameters
    ----------
    loop_config
        ``{"run": <config dict>, "run_dir": str, "wandb_name": str | None}`` (``run_dir``: the run
        directory's :attr:`~pertadapt.rundir.RunDir.location`, a path or a URI; ``wandb_name`` ``None``: no
        W&B run in the workers, e.g. when the sweep driver keeps the trial's run).

    Raises
    ------
    FloatingPointError
        At once, when an earlier attempt recorded a non-finite loss (a retry would fail again).
    """
    cfg = config_from_dict(loop_config["run"])
    rank = ray.train.get_context().get_world_rank()
    run_dir = RunDir.at(loop_config["run_dir"])
    if rank == 0:
        run_dir.pull()
    if not run_dir.is_remote or rank == 0:  # other ranks' node-local copies are not pulled
        run_dir.check_not_nonfinite()
    if rank == 0:
        mark(run_dir, "worker_start")
    record_ray_node()
    name = loop_config["wandb_name"]
    logger = NullLogger() if name is None else open_run_logger(cfg, run_dir, rank=rank, name=name)
    store = RayCheckpoints(run_dir, commit=rank == 0)
    run(cfg, run_dir, logger=logger, report=store.report, checkpoints=store)
    if rank == 0:
        run_dir.commit()


def pretrain_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker of a multi-worker pretraining (:func:`launch_pretrain`).

    Parameters
    ----------
    loop_config
        ``{"config": <PretrainConfig dict>, "out": str, "data_file": str, "resume": bool}``.
    """
    cfg = pretrain_config_from_dict(loop_config["config"])
    pretrain(cfg, Path(loop_config["out"]), resume=loop_config["resume"], data_file=Path(loop_config["data_file"]),
             progress=False)


def launch_pretrain(cfg: PretrainConfig, out: Path, *, resume: bool = False) -> dict[str, Any]:
    """Run ``pertadapt pretrain``: in this process (torch engine), or on ``engine.workers`` Ray Train workers
    (DeepSpeed; ``out`` must be a path every worker reaches, as on one node). Returns the ``--json`` figures.

    The data file is resolved (and a simulator preset made) here, before any worker starts. A failed worker
    is not retried: ``--resume`` continues from ``out/resume/``.
    """
    data_file = ensure_data_file(cfg)
    if cfg.engine.name != "deepspeed":
        return pretrain(cfg, out, resume=resume, data_file=data_file).summary
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 1, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="pertadapt-pretrain-ray-") as storage:
            trainer = TorchTrainer(
                pretrain_fn_per_worker,
                train_loop_config={"config": config_to_dict(cfg), "out": str(Path(out).absolute()),
                                   "data_file": str(Path(data_file).absolute()), "resume": resume},
                scaling_config=scaling_config(cfg),
                torch_config=TorchConfig(backend="nccl" if cfg.engine.on_gpu else "gloo"),
                run_config=ray.train.RunConfig(name=f"pretrain-{cfg.name}", storage_path=storage,
                                               failure_config=ray.train.FailureConfig(max_failures=0)))
            result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    card = read_model_card(Path(out))
    if card is None:
        raise FileNotFoundError(f"{Path(out) / 'model_card.json'}: the pretraining finished without its model card")
    return summary_of(card)


def scaling_config(cfg: RunConfig | PretrainConfig) -> ray.train.ScalingConfig:
    """Ray Train's placement of a run: ``engine.workers`` × (``cpus_per_worker`` CPUs, ``gpus`` GPUs) on nodes
    with ``accelerator_type`` (when set), packed onto as few nodes as possible or spread over many
    (``engine.placement``)."""
    e = cfg.engine
    resources = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus} if e.on_gpu else {})}
    return ray.train.ScalingConfig(num_workers=e.workers, use_gpu=e.on_gpu, resources_per_worker=resources,
                                   placement_strategy=e.placement.upper(), accelerator_type=e.accelerator_type)


def _fit_on_ray_train(cfg: RunConfig, run_dir: RunDir, *, name: str, storage_path: str, wandb_name: str | None,
                      callbacks: Sequence[Any], max_failures: int) -> dict[str, Any]:
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"run": config_to_dict(cfg), "run_dir": run_dir.location, "wandb_name": wandb_name},
        scaling_config=scaling_config(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.engine.on_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=2),
            # num_to_keep=1 with a score: the best epoch's checkpoint, and Ray always keeps the latest
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.eval.select_metric,
                                                         checkpoint_score_order=cfg.eval.select_mode)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if run_dir.is_remote:  # rank 0 committed the run directory, perhaps from another node
        run_dir.pull()
    # rank 0 wrote them before its last report (Result.metrics holds the latest checkpoint's epoch row)
    metrics = run_dir.final_metrics()
    if metrics is None:
        raise FileNotFoundError(f"{run_dir.final_metrics_file}: the run finished without writing its final metrics")
    return metrics


def _resume_point(cfg: RunConfig, run_dir: RunDir, ray_run: str | None) -> tuple[str | None, str]:
    """The checkpoint a resumed run continues from (``None``: none; a path or a URI) and where it was looked for."""
    if ray_run is None:
        last = run_dir.last_checkpoint
        return (str(last) if has_checkpoint(last) else None), str(last)
    if is_uri(ray_run):
        epochs = [e for e in list_dir(ray_run) if e.startswith("epoch_") and exists(join(ray_run, e, STATE_FILE))]
        return (join(ray_run, epochs[-1]) if epochs else None), ray_run
    d = Path(ray_run)
    epochs = sorted(e for e in d.glob("epoch_*") if has_checkpoint(e)) if d.is_dir() else []
    return (str(epochs[-1]) if epochs else None), ray_run


def _ray_run(cfg: RunConfig, run_dir: RunDir, name: str | None, storage_path: str | Path | None) -> str | None:
    """The Ray Train run's storage directory, a path or a URI (``None`` for in-process runs)."""
    root = str(storage_path or run_dir.ray_storage)
    return under(root, f"train-{name or cfg.name}") if cfg.uses_ray_train else None


def has_resumable_checkpoint(cfg: RunConfig, run_dir: RunDir | Path, *, name: str | None = None,
                             storage_path: str | Path | None = None) -> bool:
    """Whether :func:`launch` with ``resume=True`` (same ``name``/``storage_path``) has a checkpoint to continue from."""
    run_dir = RunDir.at(run_dir)
    return _resume_point(cfg, run_dir, _ray_run(cfg, run_dir, name, storage_path))[0] is not None


def _prepare_run_dir(cfg: RunConfig, run_dir: RunDir, ray_run: str | None, resume: bool) -> None:
    """Resume: check the checkpoint to continue from before anything is written. Fresh: clear the last run's state."""
    if resume:
        found, where = _resume_point(cfg, run_dir, ray_run)
        with tempfile.TemporaryDirectory(prefix="pertadapt-resume-") as tmp:
            if found is not None and is_uri(found):  # validated on a local copy
                pull_tree(found, Path(tmp))
                found = tmp
            ckpt = require_checkpoint(None if found is None else Path(found), where)
            read_checkpoint(ckpt, engine=cfg.engine.name, world_size=cfg.engine.workers, rank=0, shapes=None)
        return
    run_dir.clear_retry_state()
    if ray_run is not None and is_uri(ray_run):
        delete(ray_run)
    elif ray_run is not None:
        shutil.rmtree(ray_run, ignore_errors=True)


def launch(cfg: RunConfig, run_dir: RunDir | Path, *, name: str | None = None, storage_path: str | Path | None = None,
           report: Report | None = None, train_callbacks: Sequence[Any] = (), resume: bool = False,
           max_failures: int | None = None, log_wandb: bool = True) -> dict[str, Any]:
    """Run one config where it belongs and return its final metrics.

    A ``backbone.pretrain`` is resolved here first, in this process, before any worker starts
    (:func:`~pertadapt.train.fm_weights.resolve_pretrain`: pretrained once per data file and config, cached).

    Parameters
    ----------
    cfg
        The validated run config (``uses_ray_train`` decides where it runs).
    run_dir
        The run directory: a path every worker can reach, or a :class:`~pertadapt.rundir.RunDir` (on an
        object store: pulled by the caller; cleared there on a fresh start, committed after every epoch and at
        the end).
    name
        Stable run name: the Ray Train run name (a retried run resumes under it) and the W&B run name
        (default ``cfg.name``).
    storage_path
        Ray storage root, a path or an object-store URI (default ``run_dir/ray``).
    report
        In-process runs: called with each epoch's row and the final metrics (e.g. ``ray.tune.report``).
    train_callbacks
        Ray Train runs: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    resume
        Continue from the latest checkpoint (the run directory's last one, or the Ray Train run's storage);
        refused (:class:`~pertadapt.config.schema.ConfigError`) when there is none, and a checkpoint that
        fails validation is refused (:class:`~pertadapt.train.checkpoint.CheckpointError`) before anything
        is written. Without it, the last run's checkpoints, attempt and non-finite records are removed and
        training starts at epoch 0.
    max_failures
        Ray Train worker-group restarts on failure (default ``engine.max_failures``).
    log_wandb
        Open the run's W&B run here (rank 0); ``False`` when the caller keeps it (the sweep driver).

    Returns
    -------
    dict
        Final metrics.
    """
    cfg = resolve_pretrain(cfg)
    run_dir = RunDir.at(run_dir)
    ray_run = _ray_run(cfg, run_dir, name, storage_path)
    name = name or cfg.name
    _prepare_run_dir(cfg, run_dir, ray_run, resume)
    if ray_run is None:
        logger = open_run_logger(cfg, run_dir, name=name) if log_wandb else NullLogger()

        def hook(metrics: dict[str, float]) -> None:  # every epoch's files (and checkpoint) committed first
            run_dir.commit()
            if report is not None:
                report(metrics)

        try:
            return run(cfg, run_dir, logger=logger, report=hook, resume=resume)
        finally:
            run_dir.commit()
    started_here = not ray.is_initialized()
    if started_here:  # `pertadapt train --workers N`: a local Ray sized for this one run
        ray.init(num_cpus=math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 1, log_to_driver=False)
    try:
        return _fit_on_ray_train(cfg, run_dir, name=f"train-{name}",
                                 storage_path=str(storage_path or run_dir.ray_storage),
                                 wandb_name=name if log_wandb else None, callbacks=train_callbacks,
                                 max_failures=cfg.engine.max_failures if max_failures is None else max_failures)
    finally:
        if started_here:
            ray.shutdown()
