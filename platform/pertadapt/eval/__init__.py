"""Evaluation metrics on condition means (numpy only): GEARS family, cell-eval family, GI metrics."""

from __future__ import annotations

from pertadapt.eval.gi import GIMetrics, gi_metrics, gi_params
from pertadapt.eval.metrics import (
    Metrics,
    compute_metrics,
    pairing_noise_mse_de,
    pearson0,
    score_predictions,
    top_variable_genes,
)
from pertadapt.eval.truth import score_against_truth

__all__ = [
    "GIMetrics",
    "Metrics",
    "compute_metrics",
    "gi_metrics",
    "gi_params",
    "pairing_noise_mse_de",
    "pearson0",
    "score_against_truth",
    "score_predictions",
    "top_variable_genes",
]
