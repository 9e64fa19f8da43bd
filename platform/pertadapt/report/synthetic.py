"""A synthetic sweep directory with known effects, for tests, docs and the README screenshot.

Per (seed, condition) a reference value is drawn; every arm adds its known ``effect`` (a relative change
of the error metrics, the negative of it on the correlations) plus independent noise of sd ``noise``
(no noise for an arm with ``effect=None``: it is an exact copy of the reference). Trial metrics in
``results.csv`` are the means of the per-condition rows (overall and per subgroup), as in a real sweep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from pertadapt.files import atomic_write_json, atomic_write_text
from pertadapt.report.results import RESULTS_FILE, ResultRow, result_columns
from pertadapt.report.tables import SUBGROUPS, lower_is_better
from pertadapt.rundir import RunDir

__all__ = ["SYNTHETIC_METRICS", "synthetic_conditions", "write_synthetic_sweep"]

#: Per-condition metrics of the synthetic runs.
SYNTHETIC_METRICS = ("mse", "mse_de", "pearson_delta", "pearson_delta_de")


def synthetic_conditions(n: int) -> list[str]:
    """The ``n`` test conditions of a synthetic sweep (doubles ``G<i>+G<i+1>``, every fourth a single)."""
    return [f"G{i}+ctrl" if i % 4 == 3 else f"G{i}+G{i + 1}" for i in range(n)]


def _reference_values(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"mse": rng.gamma(4.0, 0.005, n), "mse_de": rng.gamma(4.0, 0.05, n),
            "pearson_delta": rng.uniform(0.5, 0.9, n), "pearson_delta_de": rng.uniform(0.4, 0.9, n)}


def write_synthetic_sweep(root: Path, *, arms: Mapping[str, float | None], seeds: Sequence[int] = (1, 2, 3),
                          n_conditions: int = 40, noise: float = 0.05, reference: str = "full",
                          failed: Mapping[str, str] | None = None, dataset: str = "sim",
                          baselines: Sequence[str] = ("baseline_mean",), epochs: int = 5, seed: int = 0,
                          data_path: Path | None = None) -> Path:
    """Write ``results.csv``, ``sweep.json`` and each run directory's per-condition table, history and config.

    Parameters
    ----------
    root
        Sweep directory (created).
    arms
        Arm → relative effect on the error metrics (``0.1`` = 10% worse; correlations move by the negative
        of it times their value), ``None`` for an exact copy of the reference. The reference must be a key.
    seeds
        Seeds (one trial per arm and seed).
    n_conditions
        Test conditions, cycling through the GEARS subgroups.
    noise
        Relative sd of the per-condition noise of arms with an effect.
    reference
        Reference arm (written to ``sweep.json``).
    failed
        Trial key → error: these trials get ``status = failed``, that error and no run files.
    dataset
        Dataset name of every trial.
    baselines
        Extra arms marked ``is_baseline`` with a 30% worse error and no learning curve.
    epochs
        Rows of each model arm's epoch history.
    seed
        Generator seed.
    data_path
        Written as ``data.path`` of every run's config (the dataset behind the DE figure).

    Returns
    -------
    pathlib.Path
        ``root``.
    """
    rng = np.random.default_rng(seed)
    failed = dict(failed or {})
    conds = synthetic_conditions(n_conditions)
    groups = [SUBGROUPS[i % len(SUBGROUPS)] for i in range(n_conditions)]
    all_arms = {**arms, **dict.fromkeys(baselines, 0.3)}
    rows = []
    for s in seeds:
        ref = _reference_values(rng, n_conditions)
        for arm, effect in all_arms.items():
            key = f"{dataset}/{arm}/seed{s}"
            run = RunDir(root / "runs" / key)
            row = ResultRow(trial=key, dataset=dataset, backbone="", arm=arm, seed=s, stage="grid", status="ok",
                            attempts=1, error="", wall_s=1.0, best_epoch=epochs - 1, config_hash="",
                            is_baseline=arm in baselines, backbone_weights="", run_dir=str(run.path), wandb_run="",
                            config={"adapter.enabled": arm != "no_pa"})
            if key in failed:
                rows.append(replace(row, status="failed", error=failed[key], best_epoch=None))
                continue
            per = pd.DataFrame({"condition": conds, "subgroup": groups})
            for m, v in ref.items():
                if effect is None or arm == reference:
                    per[m] = v
                    continue
                sign = 1.0 if lower_is_better(m) else -1.0
                per[m] = v * (1.0 + sign * effect) + rng.normal(0.0, noise * float(np.mean(v)), n_conditions)
            run.write_per_condition(per.to_csv(index=False))
            run.write_config({"name": key, "seed": s, "data": {"path": str(data_path) if data_path else None}})
            metrics: dict[str, float] = {}
            for m in SYNTHETIC_METRICS:
                metrics[f"test_{m}"] = float(per[m].mean())
                for g, sub in per.groupby("subgroup"):
                    metrics[f"test_{g}_{m}"] = float(sub[m].mean())
            if arm not in baselines:
                final = metrics["test_mse_de"]
                for e in range(epochs):
                    run.append_history({"epoch": e, "lr": 1e-3, "train_loss": 1.0 / (e + 1) + 0.1 * final,
                                        "val_mse_de": final * (1 + 1.0 / (e + 1))})
            rows.append(replace(row, metrics=metrics))
    root.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([r.record() for r in rows], columns=result_columns(rows))
    atomic_write_text(root / RESULTS_FILE, table.to_csv(index=False))
    atomic_write_json(root / "sweep.json", {"name": root.name, "reference_arm": reference})
    return root
