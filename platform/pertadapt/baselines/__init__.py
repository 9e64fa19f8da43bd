"""Simple baselines on condition means (numpy only): no-change, mean, additive, linear."""

from __future__ import annotations

from pertadapt.baselines.models import BASELINES, Baseline, baseline_options, fit_baseline

__all__ = ["BASELINES", "Baseline", "baseline_options", "fit_baseline"]
