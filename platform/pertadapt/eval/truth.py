"""Scores against the simulator's noise-free truth, with the same metric functions as everything else.

On simulated data the observed condition means carry sampling noise; scoring predictions against the
expected expression (``uns['sim']['true_mean']``) tells how close a model is to the process that made the
data. The metrics are those of :func:`pertadapt.eval.metrics.perturbation_metrics` with the true means as
truth, the true control mean as ``c`` and the top genes by true ``|shift|`` as the DE set.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pertadapt.config.metrics import truth_metric_names
from pertadapt.data.keys import CONTROL
from pertadapt.data.simulate import SimTruth
from pertadapt.eval.metrics import N_DE, Metrics, aggregate, perturbation_metrics

__all__ = ["score_against_truth"]


def score_against_truth(pred: Mapping[str, np.ndarray], truth: SimTruth, *, n_de: int = N_DE) -> Metrics:
    """Score predicted condition means against the noise-free truth.

    Parameters
    ----------
    pred
        Condition (``A+ctrl`` / ``A+B``) -> ``(N,)`` predicted mean log-normalised expression, in the
        dataset's gene order.
    truth
        The simulator's truth (:func:`pertadapt.data.simulate.read_sim_truth`).
    n_de
        Genes with the largest true ``|shift|`` forming the DE set.

    Returns
    -------
    Metrics
        The metrics registered with ``truth`` (:func:`pertadapt.config.metrics.truth_metric_names`) per
        condition and their unweighted mean (``overall``).

    Raises
    ------
    ValueError
        A control or unknown condition, or a prediction of the wrong shape.
    """
    c = truth.mean_of(CONTROL)
    names = truth_metric_names()
    per: dict[str, dict[str, float]] = {}
    for cond, p in pred.items():
        if cond == CONTROL:
            raise ValueError("pred: the control condition has no perturbation effect to score")
        t = truth.mean_of(cond)
        p = np.asarray(p, dtype=np.float64)
        if p.shape != t.shape:
            raise ValueError(f"pred[{cond!r}]: expected shape {t.shape}, got {p.shape}")
        de = np.argsort(-np.abs(t - c), kind="stable")[: max(n_de, 20)]
        full = perturbation_metrics(p, t, c, de)
        per[cond] = {m: full[m] for m in names}
    return aggregate(per, {})
