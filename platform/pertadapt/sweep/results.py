"""The sweep's results, built from what this sweep's trials reported: ``results.csv`` and ``results.parquet``.

One :class:`~pertadapt.report.results.ResultRow` per grid trial (and ``hpo_results.csv`` for the Optuna
samples): its coordinates, ``status`` (``ok``, ``failed``, ``stopped_early``, ``pending``), ``attempts``,
``error`` (the exception's last line), ``wall_s``, ``device_s`` and ``device_kind`` (GPU-seconds of a trial that
asked for GPUs, else its processes' measured CPU seconds: :func:`~pertadapt.report.results.device_seconds`),
``best_epoch``, ``config_hash``, the config values that
vary across the grid, and every final val/test metric. A run directory's final metrics count only when the
trial reported success in this sweep and the run's recorded config hash equals the trial's: a file left by
an earlier sweep with another config is never reported as this trial's result. Trials with one config hash
ran once (:func:`~pertadapt.sweep.ablation.shared_runs`): each still has its row, under its own name and
coordinates, with the shared run's status, metrics and ``run_dir``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pertadapt.config.load import config_to_dict
from pertadapt.files import atomic_write, atomic_write_text
from pertadapt.report.results import HPO_RESULTS_FILE, RESULTS_FILE, ResultRow, device_seconds, result_columns
from pertadapt.rundir import RunDir
from pertadapt.sweep.ablation import Ablation, Trial, run_of

__all__ = ["TrialOutcome", "collect_results", "flatten", "varying_keys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialOutcome:
    """What Tune reported for one trial of this sweep.

    Attributes
    ----------
    key
        Grid trial key.
    stage
        ``grid``, ``final`` (after HPO) or ``hpo``.
    status
        One of :data:`~pertadapt.report.results.RESULT_STATUSES`.
    error
        Last line of the exception of a failed trial.
    wall_s
        Tune's ``time_total_s``.
    sample
        Tune trial id of an HPO sample (its run dir is ``hpo/<arm>/<id>``), ``None`` for grid trials.
    params
        Sampled parameters of an HPO sample.
    """

    key: str
    stage: str
    status: str
    error: str | None
    wall_s: float
    sample: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → dotted keys (lists kept as their JSON text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def varying_keys(flat_configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted config keys whose value differs across trials (the run's own name, seed and data path aside)."""
    keys = sorted({k for c in flat_configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in flat_configs}) > 1
            and k not in ("seed", "name", "logging.group", "data.path")]


def _row(t: Trial, outcome: TrialOutcome | None, run: RunDir, expected: str | None,
         config: Mapping[str, Any]) -> ResultRow:
    prov = run.provenance()
    weights = prov.get("backbone_weights")  # train.fm_weights.backbone_weights: {"fm": ..., "summary": ...}
    weights = weights if isinstance(weights, dict) else {}
    metrics: dict[str, Any] = {}
    status = outcome.status if outcome is not None else "pending"
    if status == "ok":
        found = run.finished_metrics(expected)
        if found is None:
            status = "failed"
            log.error("trial %s reported success but %s holds no results of its config", t.key, run.path)
        else:
            metrics = found
    cfg = t.config
    gpus = 0.0 if t.is_baseline else cfg.engine.gpus * (cfg.engine.workers if cfg.uses_ray_train else 1)
    wall_s = outcome.wall_s if outcome else None
    device_s, device_kind = device_seconds(wall_s=wall_s, gpus=gpus,
                                           cpu_s=run.cost().get("cpu_s") if status == "ok" else None)
    attempts = run.attempts()
    wandb_runs = run.wandb_offline_runs()
    return ResultRow(
        trial=t.key, dataset=t.dataset, backbone=t.backbone, arm=t.arm, seed=t.seed,
        stage=outcome.stage if outcome else "", status=status,
        attempts=len(attempts) if attempts is not None else int(outcome is not None),
        error=(outcome.error if outcome else None) or ("" if status != "failed" else "no results written"),
        wall_s=wall_s, device_s=device_s, device_kind=device_kind, best_epoch=metrics.pop("best_epoch", None),
        config_hash=prov.get("config_hash", expected or ""), is_baseline=t.is_baseline,
        fm_weights=weights.get("fm", ""), backbone_weights=weights.get("summary", ""),
        gene_space=prov.get("gene_space", ""),
        run_dir=str(run.path),
        wandb_run=str(wandb_runs[-1]) if wandb_runs else "", config=config, metrics=metrics,
        params=outcome.params if outcome is not None and outcome.stage == "hpo" else {})


def _write(path: Path, results: Sequence[ResultRow]) -> None:
    cols, rows = result_columns(results), [r.record() for r in results]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows]) if rows else pa.table({c: [] for c in cols})
    atomic_write(path.with_suffix(".parquet"), lambda p: pq.write_table(table, p))


def collect_results(ablation: Ablation, sweep_dir: Path, outcomes: Sequence[TrialOutcome],
                    hashes: Mapping[str, str]) -> Path:
    """Write ``results.csv`` / ``results.parquet`` (and ``hpo_results.*``) atomically; return the CSV path.

    ``hashes`` (trial key → :func:`~pertadapt.config.load.config_hash` of the config the trial ran, data
    path and tuned parameters included) is what a run dir must carry for its metrics to count.
    """
    final = {o.key: o for o in outcomes if o.stage in ("grid", "final")}
    cfgs = [flatten(config_to_dict(t.config)) for t in ablation.trials]
    varying = varying_keys(cfgs)
    runs = run_of((t.key, hashes[t.key]) for t in ablation.trials)
    rows = [_row(t, final.get(runs[t.key]), RunDir(sweep_dir / "runs" / runs[t.key]), hashes[t.key],
                 {k: c.get(k) for k in varying}) for t, c in zip(ablation.trials, cfgs, strict=True)]
    out = sweep_dir / RESULTS_FILE
    _write(out, rows)
    by_key = {t.key: t for t in ablation.trials}
    # a sample's config is the arm's plus its parameters: its run records its own hash
    hpo_rows = [_row(by_key[o.key], o, RunDir(sweep_dir / "hpo" / o.key.rsplit("/", 1)[0] / str(o.sample)), None, {})
                for o in outcomes if o.stage == "hpo"]
    if hpo_rows:
        _write(sweep_dir / HPO_RESULTS_FILE, hpo_rows)
    failed = [r.trial for r in rows if r.status != "ok"]
    if failed:
        log.error("%d trial(s) did not finish: %s", len(failed), failed)
    return out
