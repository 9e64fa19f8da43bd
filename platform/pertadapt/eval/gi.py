"""Genetic-interaction (GI) metrics of double perturbations (Norman et al. 2019; GEARS ``get_coeffs``).

For a double ``A+B`` with deltas to control δ_AB = μ_AB − c, δ_A = μ_A+ctrl − c, δ_B = μ_B+ctrl − c
(``(n_genes,)`` each, optionally restricted to a gene subset), a Theil–Sen regression **without
intercept** of δ_AB on the two columns [δ_A, δ_B] gives coefficients c1, c2 (sklearn
``TheilSenRegressor(fit_intercept=False, max_subpopulation=1e5, max_iter=1000, random_state=1000)``,
GEARS's settings). From them:

* ``mag`` = sqrt(c1² + c2²) (magnitude of the interaction),
* ``dcor`` = distance correlation between [δ_A, δ_B] and δ_AB (``dcor.distance_correlation``),
* ``dominance`` = |log10(c1 / c2)|,
* ``corr_fit`` = Pearson(c1 δ_A + c2 δ_B, δ_AB), NaN -> 0.

The same parameters are computed once from the predicted means and once from the observed means;
the metrics are ``gi_magnitude_mse`` = mean over test doubles of (mag_pred − mag_true)² ("Magnitude
MSE" in the PertAdapt paper) and ``gi_dcor_mse`` = mean of (dcor_pred − dcor_true)² ("Dcorr MSE",
plotted as "Model fit MSE"); the paper's own code for these two is not shipped, so their exact
form is inferred: the MSE over test doubles of the parameters GEARS's ``get_coeffs`` gives, computed in
the same way from predicted and observed deltas.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pertadapt.data.conditions import condition_genes
from pertadapt.data.keys import CONTROL, SEP
from pertadapt.eval.metrics import pearson0

__all__ = ["GIMetrics", "gi_metrics", "gi_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GIMetrics:
    """GI error metrics over doubles, and the per-double parameters behind them.

    Attributes
    ----------
    overall
        ``gi_magnitude_mse``, ``gi_dcor_mse`` and ``gi_n_doubles``.
    per_double
        Double -> ``{pred_,true_} x {c1, c2, mag, dcor, dominance, corr_fit}``.
    """

    overall: dict[str, float]
    per_double: dict[str, dict[str, float]]


def gi_params(delta_a: np.ndarray, delta_b: np.ndarray, delta_ab: np.ndarray) -> dict[str, float]:
    """GI parameters of one double from its deltas to control.

    Parameters
    ----------
    delta_a, delta_b
        ``(n,)`` changes of the two singles, μ_A − c and μ_B − c.
    delta_ab
        ``(n,)`` change of the double, μ_AB − c.

    Returns
    -------
    dict of str to float
        ``c1``, ``c2`` (Theil–Sen fit δ_AB ≈ c1 δ_A + c2 δ_B, no intercept), ``mag`` = √(c1² + c2²),
        ``dcor`` = dCor([δ_A, δ_B], δ_AB), ``dominance`` = |log10(c1/c2)| (inf/NaN when a
        coefficient is 0, as in GEARS), ``corr_fit`` = Pearson(fit, δ_AB) with NaN -> 0.
    """
    import dcor  # numba-compiled at import (seconds): only where GI metrics are computed
    from sklearn.linear_model import TheilSenRegressor

    singles = np.column_stack([delta_a, delta_b]).astype(np.float64)
    y = np.asarray(delta_ab, dtype=np.float64)
    ts = TheilSenRegressor(fit_intercept=False, max_subpopulation=int(1e5), max_iter=1000,
                           random_state=1000).fit(singles, y)
    c1, c2 = (float(v) for v in ts.coef_)
    with np.errstate(divide="ignore", invalid="ignore"):
        dominance = float(np.abs(np.log10(c1 / c2)))
    return {"c1": c1, "c2": c2, "mag": float(np.hypot(c1, c2)),
            "dcor": float(dcor.distance_correlation(singles, y)),
            "dominance": dominance, "corr_fit": pearson0(ts.predict(singles), y)}


def _single(gene: str, source: Mapping[str, np.ndarray]) -> np.ndarray | None:
    for name in (f"{gene}{SEP}{CONTROL}", f"{CONTROL}{SEP}{gene}"):
        if name in source:
            return source[name]
    return None


def gi_metrics(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    ctrl_mean: np.ndarray,
    doubles: Sequence[str],
    *,
    gene_idx: np.ndarray | None = None,
) -> GIMetrics:
    """Magnitude and distance-correlation errors of predicted genetic interactions.

    Parameters
    ----------
    pred, truth
        Condition -> ``(n_genes,)`` predicted / observed means. The double must be in both; each
        single (``A+ctrl`` or ``ctrl+A``) is taken from ``pred`` when predicted there, otherwise from
        ``truth`` (a model that predicts only test conditions is then scored on its doubles alone).
    ctrl_mean
        ``(n_genes,)`` control mean c.
    doubles
        Double conditions ``A+B`` to score; one whose single is in neither mapping is skipped with
        a warning.
    gene_idx
        Optional gene subset for all deltas (GEARS used genes with a high mean; the distance
        correlation of n genes needs O(n²) memory, so pass ~1,000 genes for a full transcriptome).

    Returns
    -------
    GIMetrics
        ``gi_magnitude_mse`` = mean_d (mag_pred,d − mag_true,d)², ``gi_dcor_mse`` =
        mean_d (dcor_pred,d − dcor_true,d)² over the scored doubles d, and the per-double values.
    """
    sel = slice(None) if gene_idx is None else np.asarray(gene_idx, dtype=np.intp)
    c = np.asarray(ctrl_mean, dtype=np.float64)[sel]
    per: dict[str, dict[str, float]] = {}
    for d in doubles:
        genes = condition_genes(d)
        if len(genes) != 2:
            raise ValueError(f"{d!r} is not a double perturbation")
        if d not in pred or d not in truth:
            raise ValueError(f"double {d!r} is missing from the {'predictions' if d not in pred else 'truth'}")
        true_singles = [_single(g, truth) for g in genes]
        pred_singles = [_single(g, pred) for g in genes]
        pred_singles = [p if p is not None else t for p, t in zip(pred_singles, true_singles, strict=True)]
        if any(s is None for s in true_singles):
            log.warning("GI: skipping %s, a single of it has no observed mean", d)
            continue
        row = {}
        for tag, (sa, sb), dd in (("pred", pred_singles, pred[d]), ("true", true_singles, truth[d])):
            params = gi_params(np.asarray(sa)[sel] - c, np.asarray(sb)[sel] - c, np.asarray(dd)[sel] - c)
            row.update({f"{tag}_{k}": v for k, v in params.items()})
        per[d] = row
    overall: dict[str, float] = {"gi_n_doubles": float(len(per))}
    if per:
        overall["gi_magnitude_mse"] = float(np.mean([(r["pred_mag"] - r["true_mag"]) ** 2 for r in per.values()]))
        overall["gi_dcor_mse"] = float(np.mean([(r["pred_dcor"] - r["true_dcor"]) ** 2 for r in per.values()]))
    return GIMetrics(overall=overall, per_double=per)
