"""Simple baselines on condition means (numpy only): no-change, mean, additive, linear."""

from __future__ import annotations

from pertadapt.baselines.models import BASELINES, Baseline, fit_baseline

__all__ = ["BASELINES", "Baseline", "fit_baseline"]
