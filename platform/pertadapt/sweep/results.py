"""The sweep's results, built from what this sweep's trials reported: ``results.csv`` and ``results.parquet``.

One row per grid trial (and ``hpo_results.csv`` for the Optuna samples): its coordinates, ``status``
(``ok``, ``failed``, ``stopped_early``, ``pending``), ``attempts``, ``error`` (the exception's last line),
``wall_s``, ``best_epoch``, ``config_hash``, the config values that vary across the grid, and every final
val/test metric. A run directory's ``final_metrics.json`` counts only when the trial reported success in
this sweep and the run's recorded config hash equals the trial's: a file left by an earlier sweep with
another config is never reported as this trial's result.
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
from pertadapt.sweep.ablation import Ablation, Trial

__all__ = ["RESULT_STATUSES", "TrialOutcome", "collect_results", "finished_metrics", "flatten", "varying_keys"]

log = logging.getLogger(__name__)

RESULT_STATUSES = ("ok", "failed", "stopped_early", "pending")
_HEAD = ["trial", "dataset", "backbone_set", "arm", "seed", "stage", "status", "attempts", "error", "wall_s",
         "best_epoch", "config_hash", "is_baseline", "backbone_weights"]


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
        One of :data:`RESULT_STATUSES`.
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_metrics(run_dir: Path, expected_hash: str | None) -> dict[str, Any] | None:
    """The final metrics in ``run_dir`` when its run finished the config hashed ``expected_hash``, else None.

    ``expected_hash=None`` accepts any config (an HPO sample records its own).
    """
    final = _read_json(run_dir / "final_metrics.json")
    prov = _read_json(run_dir / "provenance.json") or {}
    if not isinstance(final, dict) or (expected_hash is not None and prov.get("config_hash") != expected_hash):
        return None
    return final


def _row(t: Trial, outcome: TrialOutcome | None, run_dir: Path, expected: str | None) -> dict[str, Any]:
    prov = _read_json(run_dir / "provenance.json") or {}
    metrics: dict[str, Any] = {}
    status = outcome.status if outcome is not None else "pending"
    if status == "ok":
        found = finished_metrics(run_dir, expected)
        if found is None:
            status = "failed"
            log.error("trial %s reported success but %s holds no results of its config", t.key, run_dir)
        else:
            metrics = found
    attempts = _read_json(run_dir / "attempts.json")
    wandb_dirs = sorted(str(p) for p in run_dir.glob("wandb/offline-run-*"))
    return {"trial": t.key, "dataset": t.dataset, "backbone_set": t.backbone, "arm": t.arm, "seed": t.seed,
            "stage": outcome.stage if outcome else "", "status": status,
            "attempts": len(attempts) if isinstance(attempts, list) else int(outcome is not None),
            "error": (outcome.error if outcome else None) or ("" if status != "failed" else "no results written"),
            "wall_s": outcome.wall_s if outcome else None, "best_epoch": metrics.pop("best_epoch", None),
            "config_hash": prov.get("config_hash", expected or ""), "is_baseline": t.is_baseline,
            "backbone_weights": prov.get("backbone_weights", ""), **metrics, "run_dir": str(run_dir),
            "wandb_run": wandb_dirs[-1] if wandb_dirs else ""}


def _table(rows: list[dict[str, Any]], cfgs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    varying = varying_keys(cfgs)
    for r, c in zip(rows, cfgs, strict=True):
        r.update({f"cfg.{k}": c.get(k) for k in varying})
    head = [*_HEAD, *[f"cfg.{k}" for k in varying]]
    metric_cols = sorted({k for r in rows for k in r} - set(head) - {"run_dir", "wandb_run"})
    return [*head, *metric_cols, "run_dir", "wandb_run"], rows


def _write(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
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
    rows, cfgs = [], []
    for t in ablation.trials:
        rows.append(_row(t, final.get(t.key), sweep_dir / "runs" / t.key, hashes[t.key]))
        cfgs.append(flatten(config_to_dict(t.config)))
    out = sweep_dir / "results.csv"
    _write(out, *_table(rows, cfgs))
    by_key = {t.key: t for t in ablation.trials}
    hpo_rows, hpo_cfgs = [], []
    for o in (o for o in outcomes if o.stage == "hpo"):
        t = by_key[o.key]
        # a sample's config is the arm's plus its parameters: its run records its own hash
        row = _row(t, o, sweep_dir / "hpo" / t.key.rsplit("/", 1)[0] / str(o.sample), None)
        row.update({f"param.{k}": v for k, v in o.params.items()})
        hpo_rows.append(row)
        hpo_cfgs.append({})
    if hpo_rows:
        _write(sweep_dir / "hpo_results.csv", *_table(hpo_rows, hpo_cfgs))
    failed = [r["trial"] for r in rows if r["status"] != "ok"]
    if failed:
        log.error("%d trial(s) did not finish: %s", len(failed), failed)
    return out
