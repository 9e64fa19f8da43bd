"""Collect finished trials into ``results.csv``: one row per trial with its coordinates, the config
values that vary across the grid, and its final val/test metrics."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from pertadapt.config.load import config_to_dict
from pertadapt.sweep.ablation import Ablation

__all__ = ["collect_results", "flatten"]

log = logging.getLogger(__name__)


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


def collect_results(ablation: Ablation, sweep_dir: Path) -> Path:
    """Write ``sweep_dir/results.csv`` (atomically) and return its path.

    A trial without ``final_metrics.json`` gets ``status = failed`` and empty metrics.
    """
    rows = []
    for t in ablation.trials:
        run_dir = sweep_dir / "runs" / t.key
        metrics_file = run_dir / "final_metrics.json"
        cfg_file = run_dir / "config.yaml"
        cfg = flatten(config_to_dict(t.config))
        if cfg_file.is_file():
            cfg = flatten(yaml.safe_load(cfg_file.read_text()))
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        wandb_dirs = sorted(str(p) for p in run_dir.glob("wandb/offline-run-*"))
        rows.append({"trial": t.key, "dataset": t.dataset, "backbone_set": t.backbone, "arm": t.arm, "seed": t.seed,
                     "status": "ok" if metrics else "failed", "run_dir": str(run_dir),
                     "wandb_run": wandb_dirs[-1] if wandb_dirs else "", "_cfg": cfg, **metrics})
    keys = sorted({k for r in rows for k in r["_cfg"]})
    varying = [k for k in keys if len({json.dumps(r["_cfg"].get(k), default=str) for r in rows}) > 1
               and k not in ("seed", "name", "logging.group", "data.path")]
    for r in rows:
        cfg = r.pop("_cfg")
        r.update({f"cfg.{k}": cfg.get(k) for k in varying})
    head = ["trial", "dataset", "backbone_set", "arm", "seed", "status", *[f"cfg.{k}" for k in varying]]
    metric_cols = sorted({k for r in rows for k in r} - set(head) - {"run_dir", "wandb_run"})
    cols = [*head, *metric_cols, "run_dir", "wandb_run"]
    out = sweep_dir / "results.csv"
    tmp = out.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    failed = [r["trial"] for r in rows if r["status"] != "ok"]
    if failed:
        log.error("%d trial(s) failed: %s", len(failed), failed)
    return out
