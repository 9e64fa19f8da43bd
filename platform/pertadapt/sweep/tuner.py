"""Ray Tune driver: one trial = one Ray Train run (DeepSpeed workers) = one W&B run.

The only module importing :mod:`ray.tune` and :mod:`optuna`. Without a search space the grid of
trials runs as one Tune experiment; with one, each arm first gets an Optuna study (OptunaSearch,
persistent storage in the sweep dir) on the first seed, and its best parameters are then run on
every seed (``stage`` = ``hpo`` / ``final`` in the results).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from pertadapt.config.load import config_from_dict, config_to_dict, dotted_to_nested, load_run_config
from pertadapt.sweep.ablation import Ablation, Trial
from pertadapt.sweep.results import collect_results
from pertadapt.sweep.search_space import SearchSpace
from pertadapt.train.worker import launch

__all__ = ["run_sweep"]

log = logging.getLogger(__name__)


def _apply_params(run_dict: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    return config_to_dict(load_run_config(None, extra=_merge(run_dict, dotted_to_nested(params))))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def _trial_fn(config: dict[str, Any]) -> None:
    """A Tune function trainable: run one trial in-process (baselines, torch engine) or via Ray Train."""
    spec = config["trial"]
    params = {k: v for k, v in config.items() if k != "trial"}
    run_dict = _apply_params(spec["run"], params) if params else spec["run"]
    cfg = config_from_dict(run_dict)
    run_dir = Path(spec["run_dir"])
    if params:
        run_dir = run_dir / tune.get_context().get_trial_id()
    name = spec["key"].replace("/", "-")
    launch(cfg, run_dir, name=f"{name}-{tune.get_context().get_trial_id()}" if params else name,
           storage_path=Path(spec["storage"]), report=tune.report, train_callbacks=[TuneReportCallback()],
           max_failures=spec.get("max_failures", 0))
    if cfg.uses_ray_train:
        time.sleep(3)  # let the last TuneReportCallback result reach Tune (Train V2 race)


def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    if config_from_dict(config["trial"]["run"]).uses_ray_train:  # the Train workers ask for their own
        return tune.PlacementGroupFactory([{"CPU": 0.01}])
    return tune.PlacementGroupFactory([{"CPU": 1}])


def _spec(trial: Trial, sweep_dir: Path, data_paths: Mapping[str, str]) -> dict[str, Any]:
    run_dict = config_to_dict(trial.config)
    run_dict["data"]["path"] = data_paths[trial.key]
    return {"key": trial.key, "run": run_dict, "run_dir": str(sweep_dir / "runs" / trial.key),
            "storage": str(sweep_dir / "ray"), "max_failures": 0}


class _Progress(tune.Callback):
    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        log.info("[%d/%d] trial %s finished", self.done, self.total, trial.config["trial"]["key"])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        log.error("[%d/%d] trial %s FAILED", self.done, self.total, trial.config["trial"]["key"])


def _run_grid(specs: Sequence[dict[str, Any]], sweep_dir: Path, name: str, max_concurrent: int) -> None:
    tuner = tune.Tuner(
        tune.with_resources(_trial_fn, _resources),
        param_space={"trial": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir / "ray"), verbose=0,
                                  callbacks=[_Progress(len(specs))],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    tuner.fit()


def _optuna_space(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in space.dims:
        if d.kind == "choice":
            out[d.key] = optuna.distributions.CategoricalDistribution(list(d.values))
        elif d.kind == "int":
            out[d.key] = optuna.distributions.IntDistribution(int(d.low), int(d.high))
        else:
            out[d.key] = optuna.distributions.FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
    return out


def _storage(space: SearchSpace, sweep_dir: Path) -> optuna.storages.BaseStorage:
    root = sweep_dir / "optuna"
    root.mkdir(parents=True, exist_ok=True)
    if space.storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(root / "studies.journal")))
    return optuna.storages.RDBStorage(f"sqlite:///{root / 'studies.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 30}})


def _run_hpo(spec: dict[str, Any], arm: str, space: SearchSpace, sweep_dir: Path, ablation_name: str,
             max_concurrent: int) -> dict[str, Any]:
    search = OptunaSearch(_optuna_space(space), metric=space.metric, mode=space.mode,
                          study_name=f"{ablation_name}-{arm}", storage=_storage(space, sweep_dir),
                          sampler=optuna.samplers.TPESampler(seed=space.sampler_seed))
    epochs = spec["run"]["optim"]["epochs"]
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1) if space.scheduler == "asha"
                 and epochs > 1 else None)
    tuner = tune.Tuner(
        tune.with_resources(_trial_fn, _resources),
        param_space={"trial": spec},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=space.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"hpo-{arm}", storage_path=str(sweep_dir / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    best = tuner.fit().get_best_result(metric=space.metric, mode=space.mode, scope="all")
    return {k: v for k, v in best.config.items() if k != "trial"}


def _runtime_env() -> dict[str, Any]:
    """Forward the platform's environment (cache, W&B mode, DeepSpeed accelerator, threads) to every worker."""
    prefixes = ("PERTADAPT_", "WANDB_", "DS_", "OMP_", "RAY_TRAIN_")
    return {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(prefixes)}}


def run_sweep(ablation: Ablation, sweep_dir: Path, *, search_space: SearchSpace | None = None,
              data_paths: Mapping[str, str], num_cpus: float | None = None) -> Path:
    """Run every trial of ``ablation`` on a local Ray cluster this function starts and stops.

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
        Logical CPUs of the local Ray cluster (default: enough for the concurrent trials).

    Returns
    -------
    Path
        ``results.csv``.
    """
    sweep_dir = sweep_dir.resolve()
    concurrent = ablation.max_concurrent_trials or 2
    workers = max(t.config.engine.workers * t.config.engine.cpus_per_worker for t in ablation.trials)
    if os.environ.get("RAY_ADDRESS"):  # joining a cluster (ray job submit, KubeRay, SLURM): it owns resources
        ray.init(log_to_driver=False, runtime_env=_runtime_env())
    else:
        ray.init(num_cpus=num_cpus or math.ceil(concurrent * (workers + 0.01)) + 1, log_to_driver=False,
                 runtime_env=_runtime_env())
    try:
        specs = [_spec(t, sweep_dir, data_paths) for t in ablation.trials]
        if search_space is None:
            _run_grid(specs, sweep_dir, "grid", concurrent)
        else:
            first = ablation.seeds[0]
            for t, spec in zip(ablation.trials, specs, strict=True):
                if t.seed != first or t.is_baseline:
                    continue
                hpo_spec = {**spec, "run_dir": str(sweep_dir / "hpo" / t.key.rsplit("/", 1)[0])}
                best = _run_hpo(hpo_spec, t.arm, search_space, sweep_dir, ablation.name, concurrent)
                log.info("arm %s: best %s", t.arm, best)
                for t2, s2 in zip(ablation.trials, specs, strict=True):
                    if t2.arm == t.arm and t2.dataset == t.dataset and t2.backbone == t.backbone:
                        s2["run"] = _apply_params(s2["run"], best)
            _run_grid(specs, sweep_dir, "final", concurrent)
    finally:
        ray.shutdown()
    return collect_results(ablation, sweep_dir)
