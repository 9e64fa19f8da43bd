"""The hierarchical bootstrap of a mean over (seed, condition) values: resample seeds, then conditions.

Used for the paired differences of :mod:`pertadapt.report.stats` and for the table cells of
:func:`pertadapt.report.tables.summarise`, so both intervals mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "hierarchical_bootstrap"]

#: Resamples of the hierarchical bootstrap.
BOOTSTRAP_RESAMPLES = 4000
#: Seed of the bootstrap generator (the report is reproducible).
BOOTSTRAP_SEED = 0


def hierarchical_bootstrap(groups: Sequence[np.ndarray], *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the pooled mean under a two-level bootstrap (seeds, then conditions).

    Each resample draws ``k`` groups (seeds) with replacement out of the ``k`` given, then, for every
    drawn group independently, as many values (conditions) with replacement as it has; the statistic is
    the mean over all drawn values.

    Parameters
    ----------
    groups
        ``k`` arrays, ``(n_i,)`` values of group ``i`` (the paired differences of one seed).
    n_resamples
        Bootstrap resamples.
    seed
        Seed of :func:`numpy.random.default_rng`.
    confidence
        Coverage of the interval.

    Returns
    -------
    tuple of float
        ``(low, high)``; NaN when there are no values.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_resamples, len(groups)))  # (B, k) drawn seeds
    sums = np.zeros(n_resamples)
    counts = np.zeros(n_resamples)
    for i, g in enumerate(groups):
        draws, _ = np.nonzero(picks == i)  # one entry per slot that drew group i, by resample
        if not len(draws):
            continue
        inner = g[rng.integers(0, len(g), size=(len(draws), len(g)))]  # (slots, n_i) resampled conditions
        np.add.at(sums, draws, inner.sum(axis=1))
        np.add.at(counts, draws, len(g))
    low, high = np.quantile(sums / counts, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)
