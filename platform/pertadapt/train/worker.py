"""Where a run executes: in this process, or on Ray Train workers (DeepSpeed). The only ``ray.train`` import.

:func:`launch` is the one dispatch every caller uses (``pertadapt train``, a Tune trial): a config that
``uses_ray_train`` runs on ``engine.workers`` Ray Train workers (:func:`train_fn_per_worker` on each),
anything else runs :func:`pertadapt.train.run.run` right here.

On Ray Train every epoch's checkpoint (each rank's files, merged by Ray) is reported with the epoch's
metrics into Ray storage as ``<storage>/train-<name>/epoch_<n>``; Ray keeps the best (``eval.select_metric``)
and the latest. When a worker or node fails, Ray restarts the worker group (``engine.max_failures``
times) and each worker restores the latest checkpoint (model, optimiser, epoch, RNG states) from
``ray.train.get_checkpoint()``; the world-size-invariant step order makes the resumed run end with the
metrics of an uninterrupted one. A non-finite loss is not retried (``nonfinite.json``). At the end,
the selected epoch's checkpoint is also copied to ``run_dir/ckpt/best``.
"""

from __future__ import annotations

import json
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
from pertadapt.config.schema import RunConfig
from pertadapt.remote import RunMirror, delete, exists, is_uri, join, list_dir, pull_tree, under
from pertadapt.report.logger import NullLogger
from pertadapt.train.checkpoint import (
    ATTEMPTS_FILE,
    NONFINITE_FILE,
    STATE_FILE,
    CheckpointEngine,
    CheckpointError,
    check_not_nonfinite,
    has_checkpoint,
    read_checkpoint,
    replace_dir,
    require_checkpoint,
)
from pertadapt.train.run import NODE_ID_ENV, NODE_IP_ENV, open_run_logger, run
from pertadapt.train.timeline import mark

__all__ = ["RayCheckpoints", "has_resumable_checkpoint", "launch", "record_ray_node", "scaling_config",
           "train_fn_per_worker"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]


class RayCheckpoints:
    """Checkpoints in Ray Train storage (see the module docstring); also the worker's report hook.

    Parameters
    ----------
    run_dir
        The run directory (the selected epoch's checkpoint is copied to ``ckpt/best``).
    mirror
        Rank 0 of a run whose directory lives on an object store: pushed before every report, so that the
        store holds the epoch's files (``metrics.jsonl``, ``attempts.json``) by the time Ray counts the epoch.
    """

    def __init__(self, run_dir: Path, mirror: RunMirror | None = None) -> None:
        self.run_dir, self.mirror = run_dir, mirror
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
        if self.mirror is not None:
            self.mirror.push()
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
                copy = self.run_dir / "ckpt" / ".best.new"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(d, copy)
                replace_dir(copy, self.run_dir / "ckpt" / "best")
        return state


def record_ray_node() -> None:
    """Tell :func:`~pertadapt.train.run.run` the Ray node this process runs on (``provenance.json`` ``ranks``)."""
    os.environ[NODE_ID_ENV] = ray.get_runtime_context().get_node_id()
    os.environ[NODE_IP_ENV] = ray.util.get_node_ip_address()


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: rebuild the config, restore the latest checkpoint, run, report.

    Parameters
    ----------
    loop_config
        ``{"run": <config dict>, "run_dir": str, "remote_run_dir": str | None, "wandb_name": str | None}``
        (``remote_run_dir``: the run directory's home on an object store, worked on in this node's copy;
        ``wandb_name`` ``None``: no W&B run in the workers, e.g. when the sweep driver keeps the trial's run).

    Raises
    ------
    FloatingPointError
        At once, when an earlier attempt recorded a non-finite loss (a retry would fail again).
    """
    cfg = config_from_dict(loop_config["run"])
    rank = ray.train.get_context().get_world_rank()
    home = loop_config.get("remote_run_dir")
    mirror = RunMirror(home) if home else None
    run_dir = Path(loop_config["run_dir"]) if mirror is None else (mirror.pull() if rank == 0 else mirror.local)
    if mirror is None or rank == 0:  # other ranks' node-local copies are not pulled
        check_not_nonfinite(run_dir)
    if rank == 0:
        mark(run_dir, "worker_start")
    record_ray_node()
    name = loop_config["wandb_name"]
    logger = NullLogger() if name is None else open_run_logger(cfg, run_dir, rank=rank, name=name)
    store = RayCheckpoints(run_dir, mirror if rank == 0 else None)
    try:
        run(cfg, run_dir, logger=logger, report=store.report, checkpoints=store)
    except FloatingPointError:
        if mirror is not None:  # whichever rank saw it: a retry on any node must find it
            mirror.push(only=NONFINITE_FILE)
        raise
    if mirror is not None and rank == 0:
        mirror.push()


def scaling_config(cfg: RunConfig) -> ray.train.ScalingConfig:
    """Ray Train's placement of a run: ``engine.workers`` × (``cpus_per_worker`` CPUs, ``gpus`` GPUs) on nodes
    with ``accelerator_type`` (when set), packed onto as few nodes as possible or spread over many
    (``engine.placement``)."""
    e = cfg.engine
    resources = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus} if e.on_gpu else {})}
    return ray.train.ScalingConfig(num_workers=e.workers, use_gpu=e.on_gpu, resources_per_worker=resources,
                                   placement_strategy=e.placement.upper(), accelerator_type=e.accelerator_type)


def _fit_on_ray_train(cfg: RunConfig, run_dir: Path, *, name: str, storage_path: str, wandb_name: str | None,
                      callbacks: Sequence[Any], max_failures: int, mirror: RunMirror | None) -> dict[str, Any]:
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"run": config_to_dict(cfg), "run_dir": str(run_dir), "wandb_name": wandb_name,
                           "remote_run_dir": None if mirror is None else mirror.uri},
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
    if mirror is not None:  # rank 0 pushed the run directory, perhaps from another node
        mirror.pull()
    # rank 0 wrote them before its last report (Result.metrics holds the latest checkpoint's epoch row)
    return json.loads((run_dir / "final_metrics.json").read_text())


def _resume_point(cfg: RunConfig, run_dir: Path, ray_run: str | None) -> tuple[str | None, str]:
    """The checkpoint a resumed run continues from (``None``: none; a path or a URI) and where it was looked for."""
    if ray_run is None:
        last = run_dir / "ckpt" / "last"
        return (str(last) if has_checkpoint(last) else None), str(last)
    if is_uri(ray_run):
        epochs = [e for e in list_dir(ray_run) if e.startswith("epoch_") and exists(join(ray_run, e, STATE_FILE))]
        return (join(ray_run, epochs[-1]) if epochs else None), ray_run
    d = Path(ray_run)
    epochs = sorted(e for e in d.glob("epoch_*") if has_checkpoint(e)) if d.is_dir() else []
    return (str(epochs[-1]) if epochs else None), ray_run


def _ray_run(cfg: RunConfig, run_dir: Path, name: str | None, storage_path: str | Path | None) -> str | None:
    """The Ray Train run's storage directory, a path or a URI (``None`` for in-process runs)."""
    root = str(storage_path or run_dir / "ray")
    return under(root, f"train-{name or cfg.name}") if cfg.uses_ray_train else None


def has_resumable_checkpoint(cfg: RunConfig, run_dir: Path, *, name: str | None = None,
                             storage_path: str | Path | None = None) -> bool:
    """Whether :func:`launch` with ``resume=True`` (same ``name``/``storage_path``) has a checkpoint to continue from."""
    return _resume_point(cfg, run_dir, _ray_run(cfg, run_dir, name, storage_path))[0] is not None


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, ray_run: str | None, resume: bool,
                     mirror: RunMirror | None) -> None:
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
    if mirror is not None:
        mirror.remove(ATTEMPTS_FILE, NONFINITE_FILE, "ckpt")
    for name in (ATTEMPTS_FILE, NONFINITE_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    if ray_run is not None and is_uri(ray_run):
        delete(ray_run)
    elif ray_run is not None:
        shutil.rmtree(ray_run, ignore_errors=True)


def launch(cfg: RunConfig, run_dir: Path, *, name: str | None = None, storage_path: Path | None = None,
           report: Report | None = None, train_callbacks: Sequence[Any] = (), resume: bool = False,
           max_failures: int | None = None, log_wandb: bool = True,
           mirror: RunMirror | None = None) -> dict[str, Any]:
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
        Ray storage root, a path or an object-store URI (default ``run_dir/ray``).
    report
        In-process runs: called with each epoch's row and the final metrics (e.g. ``ray.tune.report``).
    train_callbacks
        Ray Train runs: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    resume
        Continue from the latest checkpoint (``run_dir/ckpt/last``, or the Ray Train run's storage);
        refused (:class:`~pertadapt.config.schema.ConfigError`) when there is none, and a checkpoint that
        fails validation is refused (:class:`~pertadapt.train.checkpoint.CheckpointError`) before anything
        is written. Without it, the last run's checkpoints, ``attempts.json`` and ``nonfinite.json`` are
        removed and training starts at epoch 0.
    max_failures
        Ray Train worker-group restarts on failure (default ``engine.max_failures``).
    log_wandb
        Open the run's W&B run here (rank 0); ``False`` when the caller keeps it (the sweep driver).
    mirror
        The run directory's home on an object store, ``run_dir`` being its node-local copy (pulled by the
        caller): cleared there on a fresh start, pushed after every epoch and at the end of an in-process run,
        handed to the Ray Train workers.

    Returns
    -------
    dict
        Final metrics.
    """
    ray_run = _ray_run(cfg, run_dir, name, storage_path)
    name = name or cfg.name
    _prepare_run_dir(cfg, run_dir, ray_run, resume, mirror)
    if ray_run is None:
        logger = open_run_logger(cfg, run_dir, name=name) if log_wandb else NullLogger()
        hook = report
        if mirror is not None:  # every epoch's files (and ckpt/last) on the store before the epoch is reported

            def hook(metrics: dict[str, float]) -> None:
                mirror.push()
                if report is not None:
                    report(metrics)

        try:
            return run(cfg, run_dir, logger=logger, report=hook, resume=resume)
        finally:
            if mirror is not None:
                mirror.push()
    started_here = not ray.is_initialized()
    if started_here:  # `pertadapt train --workers N`: a local Ray sized for this one run
        ray.init(num_cpus=math.ceil(cfg.engine.workers * cfg.engine.cpus_per_worker) + 1, log_to_driver=False)
    try:
        return _fit_on_ray_train(cfg, run_dir, name=f"train-{name}", storage_path=str(storage_path or run_dir / "ray"),
                                 wandb_name=name if log_wandb else None,
                                 callbacks=train_callbacks, mirror=mirror,
                                 max_failures=cfg.engine.max_failures if max_failures is None else max_failures)
    finally:
        if started_here:
            ray.shutdown()
