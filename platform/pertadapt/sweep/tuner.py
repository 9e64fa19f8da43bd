"""Ray Tune driver: one trial = one Ray Train run (DeepSpeed workers) = one W&B run.

The only module importing :mod:`ray.tune` and :mod:`optuna`. Without a search space the grid of
trials runs as one Tune experiment (``grid``); with one, each arm first gets an Optuna study
(OptunaSearch, persistent storage in the sweep dir, optionally ASHA) on the first seed, and its best
parameters are then run on every seed (experiment ``final``). Every experiment lives under
``<sweep>/ray/<experiment>`` and is restored with :meth:`ray.tune.Tuner.restore` on ``--resume``:
finished trials are kept, interrupted and errored ones run again (Ray Train resumes them from their
last checkpoint under the same run name and storage).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from pertadapt.config.load import config_hash, config_to_dict, dotted_to_nested, load_typed
from pertadapt.config.schema import RunConfig
from pertadapt.files import sha256_bytes
from pertadapt.remote import is_uri, pull_tree, under
from pertadapt.rundir import RunDir
from pertadapt.sweep import stop
from pertadapt.sweep.ablation import Ablation, Trial, run_of
from pertadapt.sweep.command import LOOPBACK_ENV
from pertadapt.sweep.resources import capacity, cluster_concurrency, prepare_cluster, release_cluster, summed
from pertadapt.sweep.results import TrialOutcome, collect_results
from pertadapt.sweep.search_space import SearchSpace
from pertadapt.sweep.storage import RUN_TREES, check_storage_on_worker
from pertadapt.sweep.tables import build_sweep_tables, use_sweep_tables
from pertadapt.sweep.trial_spec import SPEC_KEY, TUNED_KEY, TrialSpec, trial_of, tuned_of
from pertadapt.sweep.wandb_runs import REPLAYED_KEY, TrialRuns
from pertadapt.train.run import FINISHED_KEY
from pertadapt.train.timeline import mark
from pertadapt.train.worker import has_resumable_checkpoint, launch, record_ray_node

__all__ = ["fresh_study", "run_sweep", "study_name"]

log = logging.getLogger(__name__)

#: Environment forwarded to every Ray worker (cache, W&B mode, DeepSpeed accelerator, threads, object-store
#: endpoint and region).
_FORWARD_PREFIXES = ("PERTADAPT_", "WANDB_", "DS_", "OMP_", "RAY_TRAIN_", "AWS_ENDPOINT_URL", "AWS_REGION",
                     "AWS_DEFAULT_REGION")
#: Never forwarded, never written: secrets stay in the environment of the process that has them.
_SECRETS = ("WANDB_API_KEY",)


def _apply_params(cfg: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    # two layers, so that a sampled component name (loss.name) switches the block as an override does
    return load_typed(RunConfig, "<trial + search sample>", config_to_dict(cfg), dotted_to_nested(params))


def _trial_fn(config: dict[str, Any]) -> None:
    """A Tune function trainable: run one trial in-process (baselines, torch engine) or via Ray Train."""
    spec, tuned = trial_of(config), tuned_of(config)
    cfg = _apply_params(spec.config, tuned) if tuned else spec.config
    record_ray_node()  # an in-process trial (baseline, torch engine) records its node, as Ray Train workers do
    sample = tune.get_context().get_trial_id() if tuned else None
    run_dir, name = spec.run(sample).pull(), spec.name(sample)  # on an object store: this node's copy
    finished = run_dir.finished_metrics(config_hash(cfg))
    if finished is not None:  # a resumed sweep whose Tune state missed this trial's end: nothing to redo
        tune.report({**finished, FINISHED_KEY: 1, REPLAYED_KEY: 1})
        return
    mark(run_dir, "trial_start")
    run_dir.commit()  # on the store before a worker, perhaps on this node, pulls the run directory
    # a retried or resumed trial continues from its last checkpoint; a first start begins afresh
    resume = has_resumable_checkpoint(cfg, run_dir, name=name, storage_path=spec.storage)
    # the driver keeps the trial's W&B run (TrialRuns): the workers open none
    launch(cfg, run_dir, name=name, storage_path=spec.storage, report=tune.report,
           train_callbacks=[TuneReportCallback()], resume=resume, log_wandb=False)
    if cfg.uses_ray_train:
        time.sleep(3)  # let the last TuneReportCallback result reach Tune (Train V2 race)
    mark(run_dir, "trial_end")
    run_dir.commit()


def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    cfg = trial_of(config).config
    if cfg.uses_ray_train:  # the Train workers ask for their own
        return tune.PlacementGroupFactory([{"CPU": 0.01}])
    gpu = {"GPU": cfg.engine.gpus} if cfg.engine.on_gpu and not cfg.is_baseline else {}
    return tune.PlacementGroupFactory([{"CPU": 1, **gpu}])


def _spec(trial: Trial, ablation: Ablation, sweep_dir: Path, data_paths: Mapping[str, str],
          storage: str) -> TrialSpec:
    return TrialSpec(key=trial.key, config=trial.run_config(data_paths[trial.key]),
                     run_dir=sweep_dir / "runs" / trial.key,
                     home=under(storage, "runs", trial.key) if is_uri(storage) else None,
                     storage=under(storage, "ray"), tags=tuple(ablation.toggles(trial)),
                     job_type="baseline" if trial.is_baseline else "model")


class _StopTune(tune.Callback):
    """Hands a stop asked for (:mod:`pertadapt.sweep.stop`) to Tune: its own graceful stop (SIGUSR1, handled
    by Tune while it runs), so Tune saves the experiment's state and returns."""

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if stop.requested():
            os.kill(os.getpid(), signal.SIGUSR1)


class _Progress(tune.Callback):
    """Live progress: a rich table in a terminal, one log line per event otherwise.

    Parameters
    ----------
    title, total
        The experiment's name and number of trials.
    metric
        The validation metric shown: the search space's, or (``None``) each trial's ``eval.select_metric``.
    """

    def __init__(self, title: str, total: int, metric: str | None = None) -> None:
        self.title, self.total, self.metric = title, total, metric
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table(), console=Console(stderr=True), refresh_per_second=2)
            self.live.start()

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"{self.title}: {sum(r['status'] != 'running' for r in self.rows.values())}/"
                            f"{self.total} done")
        for col in ("trial", "status", "epoch", "val metric", "elapsed s"):
            table.add_column(col, justify="left" if col in ("trial", "status") else "right")
        for key, r in self.rows.items():
            table.add_row(key, r["status"], str(r.get("epoch", "")), r.get("metric", ""), f"{r.get('elapsed', 0):.0f}")
        return table

    def _update(self, trial: Any, status: str, result: Mapping[str, Any] | None = None) -> None:
        key = trial_of(trial.config).key + (f"#{trial.trial_id}" if TUNED_KEY in trial.config else "")
        row = self.rows.setdefault(key, {"status": "running"})
        row["status"] = status
        if result:
            row["elapsed"] = float(result.get("time_total_s", row.get("elapsed", 0.0)))
            if "epoch" in result:
                row["epoch"] = int(result["epoch"])
            metric = self.metric or trial_of(trial.config).config.eval.select_metric
            if isinstance(result.get(metric), int | float):
                row["metric"] = f"{metric} {result[metric]:.4g}"
        if self.live is not None:
            self.live.update(self._table())
        elif status != "running" or result is None:
            log.info("[%s] %s %s%s", self.title, key, status, f" ({row.get('metric')})" if row.get("metric") else "")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial, "running", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "finished", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "FAILED", trial.last_result)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.live is not None:
            self.live.stop()


def _fit(make: Any, trainable: Any, param_space: dict[str, Any], path: str, resume: bool) -> tune.ResultGrid:
    """Fit a fresh Tuner, or restore the experiment at ``path`` when resuming and it can be restored.

    ``param_space`` is the Tuner's, given again on a restore: Tune keeps the trials' :class:`TrialSpec` objects
    out of its saved state (placeholders in each config), so a trial it had not started before the stop gets its
    spec from here (without it, its config holds the bare placeholder).
    """
    with stop.deferred():  # while Tune runs, a stop is Tune's (_StopTune); after, it ends the sweep
        if resume and tune.Tuner.can_restore(path):
            log.info("resuming Tune experiment %s", path)
            return tune.Tuner.restore(path, trainable=trainable, param_space=param_space, resume_errored=True).fit()
        return make().fit()


def _run_grid(specs: Sequence[TrialSpec], ray_storage: str, name: str, max_concurrent: int,
              resume: bool) -> tune.ResultGrid:
    trainable = tune.with_resources(_trial_fn, _resources)
    param_space = {SPEC_KEY: tune.grid_search(list(specs))}
    return _fit(lambda: tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=ray_storage, verbose=0,
                                  callbacks=[_Progress(name, len(specs)), TrialRuns(), _StopTune()],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ), trainable, param_space, under(ray_storage, name), resume)


def _optuna_space(space: SearchSpace) -> dict[str, Any]:
    """The Optuna distributions, under :data:`TUNED_KEY` (a sample's config holds its parameters there)."""
    out: dict[str, Any] = {}
    for d in space.dims:
        if d.kind == "choice":
            out[d.key] = optuna.distributions.CategoricalDistribution(list(d.values))
        elif d.kind == "int":
            out[d.key] = optuna.distributions.IntDistribution(int(d.low), int(d.high))
        else:
            out[d.key] = optuna.distributions.FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
    return {TUNED_KEY: out}


def _storage(space: SearchSpace, sweep_dir: Path) -> optuna.storages.BaseStorage:
    """The Optuna storage: ``sqlite`` / ``journal`` in ``sweep_dir/optuna``, or the database URL given."""
    if "://" in space.storage:
        kwargs = {"connect_args": {"timeout": 30}} if space.storage.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(space.storage, engine_kwargs=kwargs)
    root = sweep_dir / "optuna"
    root.mkdir(parents=True, exist_ok=True)
    if space.storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(root / "studies.journal")))
    return optuna.storages.RDBStorage(f"sqlite:///{root / 'studies.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 30}})


def _scheduler(space: SearchSpace, epochs: int) -> ASHAScheduler | None:
    if space.scheduler != "asha" or epochs < 2:
        return None
    max_t = min(space.max_t or epochs, epochs)
    # one report per epoch, then the final one (test metrics, ``done``): ASHA must not cut that last report
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1,
                         grace_period=min(space.grace_period, max_t), reduction_factor=space.reduction_factor)


def study_name(space: SearchSpace, ablation_name: str, arm: str, sweep_dir: Path) -> str:
    """The arm's Optuna study: ``<ablation>-<arm>``; in a database shared by many sweeps, also the sweep
    directory's hash (a sweep resumes its own study and never touches another's)."""
    own = "" if "://" not in space.storage else f"-{sha256_bytes(str(sweep_dir.resolve()))[:8]}"
    return f"{ablation_name}-{arm}{own}"


def fresh_study(storage: optuna.storages.BaseStorage, name: str) -> None:
    """Delete the study ``name`` (a sweep started afresh over an old one, ``--overwrite``, samples anew)."""
    try:
        optuna.delete_study(study_name=name, storage=storage)
        log.info("Optuna study %s deleted: the sweep starts afresh", name)
    except KeyError:
        pass


def _run_hpo(spec: TrialSpec, arm: str, space: SearchSpace, sweep_dir: Path, ray_storage: str,
             ablation_name: str, max_concurrent: int, resume: bool) -> tuple[dict[str, Any], tune.ResultGrid]:
    trainable = tune.with_resources(_trial_fn, _resources)
    name = f"hpo-{arm}"
    param_space = {SPEC_KEY: spec}
    study, storage = study_name(space, ablation_name, arm, sweep_dir), _storage(space, sweep_dir)
    if not resume:
        fresh_study(storage, study)

    def make() -> tune.Tuner:
        search = OptunaSearch(_optuna_space(space), metric=space.metric, mode=space.mode,
                              study_name=study, storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=space.sampler_seed))
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search,
                                        scheduler=_scheduler(space, spec.config.optim.epochs),
                                        num_samples=space.num_samples, max_concurrent_trials=max_concurrent,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=ray_storage, verbose=0,
                                      callbacks=[_Progress(name, space.num_samples, space.metric), TrialRuns(),
                                                 _StopTune()],
                                      failure_config=tune.FailureConfig(max_failures=0)))

    grid = _fit(make, trainable, param_space, under(ray_storage, name), resume)
    best = grid.get_best_result(metric=space.metric, mode=space.mode, scope="all")
    return tuned_of(best.config), grid


def _runtime_env() -> dict[str, Any]:
    """The platform's environment for every worker, without secrets (workers read those from their own)."""
    return {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES) and k not in _SECRETS}}


def _init_ray(num_cpus: int) -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local one bound to loopback (:data:`LOOPBACK_ENV`) with
    token auth."""
    if os.environ.get("RAY_ADDRESS"):  # joining a cluster (ray job submit, KubeRay, SLURM): it owns resources
        ray.init(log_to_driver=False, runtime_env=_runtime_env())
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # one machine: no node can be preempted, so no watcher actor per trial (seconds of start-up each)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, log_to_driver=False, runtime_env=_runtime_env(), dashboard_host="127.0.0.1",
             include_dashboard=True)
    node_ip = ray.util.get_node_ip_address()
    if not node_ip.startswith("127."):
        raise RuntimeError(f"the local Ray cluster listens on {node_ip}, not loopback: start the driver with "
                           f"{LOOPBACK_ENV} in its environment (read when Ray is imported)")


def _hashes(specs: Sequence[TrialSpec]) -> dict[str, str]:
    """trial key → hash of the config it runs (as sent to the trial: data path and tuned parameters in)."""
    return {s.key: config_hash(s.config) for s in specs}


def _outcomes(grid: tune.ResultGrid, stage: str) -> list[TrialOutcome]:
    out = []
    for result in grid:
        spec, tuned = trial_of(result.config), tuned_of(result.config)
        metrics = result.metrics or {}
        error = None if result.error is None else (str(result.error).strip().splitlines() or [""])[-1][:500]
        if error is not None:
            status = "failed"
        elif metrics.get(FINISHED_KEY):
            status = "ok"
        elif metrics:
            status = "stopped_early"
        else:
            status = "pending"
        out.append(TrialOutcome(spec.key, stage, status, error, float(metrics.get("time_total_s", math.nan)),
                                str(metrics.get("trial_id", Path(result.path).name)) if tuned else None, tuned))
    return out


def run_sweep(ablation: Ablation, sweep_dir: Path, *, search_space: SearchSpace | None = None,
              data_paths: Mapping[str, str], num_cpus: int, max_concurrent: int | None, resume: bool = False,
              storage: str | None = None) -> Path:
    """Run every trial of ``ablation`` on Ray (a local cluster this function starts and stops, or
    the one at ``RAY_ADDRESS``), then write the results.

    Parameters
    ----------
    ablation
        The validated grid.
    sweep_dir
        Output root: ``runs/<trial key>/`` (run dirs, W&B runs), ``ray/``, ``optuna/``, ``results.csv``.
    search_space
        Optional Optuna search space (HPO per arm on the first seed, then the best on every seed).
    data_paths
        trial key → prepared ``.h5ad`` (made once by the caller).
    num_cpus
        Logical CPUs of a local Ray cluster.
    max_concurrent
        Trials at once; ``None``: as many as the cluster's CPUs and GPUs hold (:func:`cluster_concurrency`).
    resume
        Restore the sweep's Tune experiments instead of starting them afresh.
    storage
        The storage root (:mod:`pertadapt.sweep.storage`): a path every node sees or an object-store URI,
        holding ``ray/`` (Tune experiment state, Ray Train checkpoints) and, on an object store, the run
        directories, copied into ``sweep_dir`` (checkpoints aside) when the trials end (default: ``sweep_dir``).

    Returns
    -------
    Path
        ``results.csv``.
    """
    sweep_dir = sweep_dir.resolve()
    storage = storage or str(sweep_dir)
    ray_storage = under(storage, "ray")
    outcomes: list[TrialOutcome] = []
    use_sweep_tables(storage)  # before Ray starts: its workers inherit the variable
    try:
        with stop.deferred():  # a stop asked for while Ray starts waits for it (then shuts it down below)
            _init_ray(num_cpus)
        check_storage_on_worker(storage)
        nodes, node_types = prepare_cluster(ablation)
        fit = cluster_concurrency(ablation, summed(capacity(nodes, node_types)))
        if max_concurrent is None or max_concurrent > fit:
            log.info("%d trial(s) at a time: what the cluster holds%s", fit,
                     "" if max_concurrent is None else f" (max_concurrent_trials {max_concurrent} asks for more)")
        max_concurrent = min(fit, max_concurrent or fit)
        specs = [_spec(t, ablation, sweep_dir, data_paths, storage) for t in ablation.trials]
        # trials with one identity run once, as the first of them (plan.json lists the others as its aliases)
        runs = run_of(_hashes(specs).items())
        build_sweep_tables([s.config for s in _runs(specs, runs)], storage)  # once each, before any trial
        if search_space is None:
            outcomes += _outcomes(_run_grid(_runs(specs, runs), ray_storage, "grid", max_concurrent, resume),
                                  "grid")
        else:
            first = ablation.seeds[0]
            by_key = {t.key: t for t in ablation.trials}
            for t, spec in zip(ablation.trials, specs, strict=True):
                if t.seed != first or t.is_baseline or runs[t.key] != t.key:
                    continue
                hpo_dir = t.key.rsplit("/", 1)[0]
                hpo_spec = replace(spec, run_dir=sweep_dir / "hpo" / hpo_dir,
                                   home=under(storage, "hpo", hpo_dir) if is_uri(storage) else None)
                best, grid = _run_hpo(hpo_spec, t.arm, search_space, sweep_dir, ray_storage, ablation.name,
                                      max_concurrent, resume)
                outcomes += _outcomes(grid, "hpo")
                if any(o.status == "pending" for o in outcomes):  # interrupted: --resume continues here
                    return _collect(ablation, sweep_dir, storage, outcomes, specs)
                log.info("arm %s: best %s", t.arm, best)
                # the arm's trials and those that share their runs get its best parameters (and stay shared)
                specs = [replace(s2, config=_apply_params(s2.config, best))
                         if (r := by_key[runs[s2.key]]).arm == t.arm and r.dataset == t.dataset
                         and r.backbone == t.backbone else s2 for s2 in specs]
            outcomes += _outcomes(_run_grid(_runs(specs, runs), ray_storage, "final", max_concurrent, resume),
                                  "final")
    finally:
        with stop.deferred():
            release_cluster()
            ray.shutdown()
    return _collect(ablation, sweep_dir, storage, outcomes, specs)


def _runs(specs: Sequence[TrialSpec], runs: Mapping[str, str]) -> list[TrialSpec]:
    """The specs that run: one per identity (a trial whose run is another's gets that run's results)."""
    return [s for s in specs if runs[s.key] == s.key]


def _collect(ablation: Ablation, sweep_dir: Path, storage: str, outcomes: Sequence[TrialOutcome],
             specs: Sequence[TrialSpec]) -> Path:
    """The results table, from the run directories (on an object store: first copied into ``sweep_dir``)."""
    if is_uri(storage):
        for tree in RUN_TREES:
            n = pull_tree(under(storage, tree), sweep_dir / tree, skip=RunDir.CHECKPOINT_DIRS)
            log.info("%d file(s) of %s/ copied from %s", n, tree, storage)
    return collect_results(ablation, sweep_dir, outcomes, _hashes(specs))
