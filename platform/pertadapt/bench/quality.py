"""``pertadapt bench quality``: the full model against the four baselines on held-out conditions, per seed.

Each seed trains ``configs/benchmark.yaml`` (the simulator's ``benchmark`` preset, 2,000 genes) in this
process with the torch engine (:func:`pertadapt.train.run.run`, no Ray) and fits the four baselines on the
same split. Besides the final metrics it scores the no-change prediction built from the very control
cells the model's condition means average over (``eval.test_controls``): the pairing-noise floor, which the
baselines carry too (they are scored against the same controls).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pertadapt.config.load import load_run_config, resolve_config_path
from pertadapt.config.schema import BASELINE_MODELS, RunConfig
from pertadapt.data.keys import CONTROL
from pertadapt.eval import score_predictions
from pertadapt.train.run import run
from pertadapt.train.setup import RunData, ensure_data_file, prepare_run_data

__all__ = ["QUALITY_METRICS", "nochange_from_eval_controls", "quality_targets", "run_quality_benchmark"]

log = logging.getLogger(__name__)

#: Final-metric columns the benchmark reports (``test_truth_*``: against the simulator's noise-free truth).
QUALITY_METRICS = ("test_mse_de", "test_mse", "test_pearson_delta_de", "test_truth_mse_de", "test_truth_mse",
                   "test_truth_pearson_delta_de")
#: The full model's all-gene mse may be at most this multiple of no-change's.
MSE_RATIO_TARGET = 1.1


def nochange_from_eval_controls(rd: RunData) -> dict[str, float]:
    """Test ``mse`` and ``mse_de`` of no-change predicted as the mean of each condition's evaluation controls.

    Parameters
    ----------
    rd
        The run's data; ``rd.test.cells`` pairs each test condition with its evaluation control cells.

    Returns
    -------
    dict
        ``nochange_eval_controls_mse``, ``nochange_eval_controls_mse_de`` (equal to no-change's own when the
        whole control pool is used).
    """
    d = rd.data
    pred = {c: m.astype(np.float32) for c, m in rd.test.cells.control_means().items() if c != CONTROL}
    m = score_predictions(pred, d, subgroups=rd.split.subgroups, reference_conditions=rd.split.train).overall
    return {"nochange_eval_controls_mse": m["mse"], "nochange_eval_controls_mse_de": m["mse_de"]}


def quality_targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether the full model beats no-change and mean on test ``mse_de`` in every seed and its all-gene
    ``mse`` stays within :data:`MSE_RATIO_TARGET` × no-change's; the per-seed paired differences.

    Parameters
    ----------
    rows
        One dict per seed: ``seed`` and, per model name, its :data:`QUALITY_METRICS`.

    Returns
    -------
    dict
        ``beats_nochange_mse_de``, ``beats_mean_mse_de``, ``mse_within_target`` (bools over all seeds),
        ``met`` (all three), and per seed ``paired``: full − baseline test ``mse_de``, ``mse`` ratio to no-change.
    """
    paired = [{"seed": r["seed"],
               **{f"mse_de_minus_{b}": r["pertadapt"]["test_mse_de"] - r[b]["test_mse_de"] for b in BASELINE_MODELS},
               "mse_ratio_to_nochange": r["pertadapt"]["test_mse"] / r["baseline_nochange"]["test_mse"]}
              for r in rows]
    out = {"beats_nochange_mse_de": all(p["mse_de_minus_baseline_nochange"] < 0 for p in paired),
           "beats_mean_mse_de": all(p["mse_de_minus_baseline_mean"] < 0 for p in paired),
           "mse_within_target": all(p["mse_ratio_to_nochange"] <= MSE_RATIO_TARGET for p in paired)}
    return {**out, "met": all(out.values()), "paired": paired}


def _config(config: str | Path, seed: int, overrides: Sequence[str]) -> RunConfig:
    return load_run_config(resolve_config_path(config), [f"seed={seed}", "engine.name=torch", "engine.workers=1",
                                                         "logging.wandb=disabled", *overrides])


def run_quality_benchmark(out: Path, *, config: str | Path = "benchmark.yaml", seeds: Sequence[int] = (1, 2, 3),
                          overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the full model and fit the four baselines for each seed; their test metrics and the targets.

    Parameters
    ----------
    out
        Root of the run directories (``<out>/seed<s>/<model>``).
    config
        Run config (default: the shipped ``benchmark.yaml``).
    seeds
        Run seeds (each also the split seed, unless the config fixes ``data.split_seed``).
    overrides
        Dotted ``key=value`` overrides for every run (e.g. ``optim.epochs=2``).

    Returns
    -------
    dict
        ``config``, ``overrides``, ``seeds``: one row per seed (``seed``, each model's :data:`QUALITY_METRICS`
        and ``best_epoch``, the no-change pairing-noise floor), and ``targets`` (:func:`quality_targets`).
    """
    rows = []
    for seed in seeds:
        cfg = _config(config, seed, overrides)
        ensure_data_file(cfg)
        row: dict[str, Any] = {"seed": seed}
        for model in ("pertadapt", *BASELINE_MODELS):
            mcfg = cfg if model == "pertadapt" else _config(config, seed, [*overrides, f"model.name={model}"])
            log.info("bench quality: seed %d, %s", seed, model)
            metrics = run(mcfg, out / f"seed{seed}" / model)
            row[model] = {k: metrics.get(k, float("nan")) for k in (*QUALITY_METRICS, "best_epoch")}
        row.update(nochange_from_eval_controls(prepare_run_data(cfg)))
        rows.append(row)
    return {"config": str(config), "overrides": list(overrides), "seeds": rows, "targets": quality_targets(rows)}
