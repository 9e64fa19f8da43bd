"""Perturbation-response metrics with GEARS semantics, plus the cell-eval / VCC family.

Everything is computed from **condition means**, as GEARS does: for a condition ``p`` the prediction
``μ̂_p`` and the truth ``μ_p`` are ``(n_genes,)`` means over the cells of ``p``, and ``c`` is the
``(n_genes,)`` mean over **all** control cells. Per-perturbation values are aggregated as the
unweighted mean over perturbations, overall and per subgroup (``combo_seen0/1/2``,
``unseen_single``), exactly as GEARS's ``compute_metrics`` / ``deeper_analysis`` /
``non_dropout_analysis`` and its subgroup loop (``gears/gears.py``) do.

Metric names (``D_p`` = the first 20 entries of ``de_idx[p]``, the top-20 DE genes of ``p``;
``r(x, y)`` = scipy's Pearson correlation with NaN mapped to 0, as GEARS does):

GEARS ``compute_metrics``
    ``mse`` = mean_g (μ̂_pg − μ_pg)², ``pearson`` = r(μ̂_p, μ_p) over all genes;
    ``mse_de``, ``pearson_de`` the same over ``D_p``. GEARS takes ``D_p`` in gene-index order
    (``np.where(var_names.isin(...))``); both values are invariant under a permutation of genes, so
    rank order gives identical numbers.
GEARS ``deeper_analysis``
    ``pearson_delta`` = r(μ̂_p − c, μ_p − c); ``pearson_delta_de`` the same over ``D_p``;
    ``frac_correct_direction_all`` = #{g : sign(μ̂_pg − c_g) = sign(μ_pg − c_g)} / n_genes;
    ``frac_correct_direction_n`` (n ∈ 20, 50, 100, 200) = the same count over the first n ranked DE
    genes, divided by n even when fewer genes exist (GEARS); ``pearson_top200_hvg`` = r over the HVG
    set H, ``pearson_delta_top200_hvg`` = r on deltas over H, ``mse_top200_hvg`` = MSE over H.
GEARS ``non_dropout_analysis``
    With ``N_p`` = ``non_dropout_de_idx[p]`` (``top_non_dropout_de_20``):
    ``mse_top20_de_non_dropout`` = mean over N_p of ((μ̂_p − c) − (μ_p − c))², which equals the
    absolute-expression MSE since c cancels; ``pearson_delta_top20_de_non_dropout`` = r on deltas
    over N_p. Both are permutation invariant, so the GEARS quirk of comparing DE genes in one order
    against c in another cannot change them; nothing is mirrored or fixed here.
cell-eval / Virtual Cell Challenge family (computed on means, so names carry no ``celleval.`` prefix
but differ from cell-eval where noted)
    ``mae`` = mean_g |μ̂_pg − μ_pg| (cell-eval ``mae``);
    ``de_overlap_20`` = |top20(|μ̂_p − c|) ∩ D_p| / 20, the overlap between the 20 genes with the
    largest predicted |change| and the true top-20 DE genes (cell-eval ``overlap_at_N`` ranks genes by
    a cell-level test; ours ranks the prediction by |Δ| of means, since only means are available);
    ``pds_l1`` = 1 − rank_p / P, the perturbation discrimination score: over the P evaluated
    non-control conditions, rank_p (0-based) is the position of p's true delta μ_p − c among all true
    deltas sorted by L1 distance to p's predicted delta μ̂_p − c (stable sort), with the columns of p's
    perturbed genes removed when ``gene_names`` is given (cell-eval ``discrimination_score_l1``; both
    deltas use the *true* control mean, avoiding cell-eval#183/#196).

Beyond systematic variation (Viñas Torné et al., Systema, Nat. Biotechnol. 2025)
    Perturbed cells often share a shift away from control (selection, stress) that PearsonΔ against
    control rewards. With ``m`` = the mean of the training perturbations' means:
    ``systema_pearson_delta`` = r(μ̂_p − m, μ_p − m), ``systema_pearson_delta_de`` the same over ``D_p``;
    ``centroid_accuracy`` = 1 when μ̂_p is nearer (Euclidean) to μ_p than to every other evaluated
    perturbation's μ_q, else 0 (its mean is the fraction of perturbations identified).

Added metrics
    A metric registered with its own ``compute`` function (:func:`pertadapt.config.metrics.register_metric`)
    is computed for every non-control perturbation from ``μ̂_p``, ``μ_p``, ``c`` and the ranked DE genes.

Control: if ``ctrl`` is evaluated it gets ``mse``, ``pearson`` and ``mae`` only (GEARS gives it
``*_de`` = 0 but leaves it out of the ``_de`` averages, and its ``deeper_analysis`` raises on it).
Every name, with its direction, is registered in :mod:`pertadapt.config.metrics`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr

from pertadapt.config.metrics import registered_metrics
from pertadapt.data.conditions import condition_genes
from pertadapt.data.dataset import PerturbData
from pertadapt.data.keys import CONTROL

__all__ = [
    "DIRECTION_TOP_N",
    "N_DE",
    "N_HVG",
    "Metrics",
    "aggregate",
    "compute_metrics",
    "pairing_noise_mse_de",
    "pearson0",
    "perturbation_metrics",
    "score_predictions",
    "top_variable_genes",
]

log = logging.getLogger(__name__)

#: Number of top DE genes behind every ``*_de`` metric (GEARS).
N_DE = 20
#: Number of highly variable genes of the ``*_top200_hvg`` metrics (GEARS).
N_HVG = 200
#: DE list lengths of ``frac_correct_direction_<n>`` (GEARS).
DIRECTION_TOP_N = (20, 50, 100, 200)


@dataclass(frozen=True)
class Metrics:
    """Aggregated and per-perturbation metric values.

    Attributes
    ----------
    overall
        Metric name -> unweighted mean over the evaluated perturbations that have that metric.
    subgroups
        Subgroup name -> metric name -> unweighted mean over the subgroup's evaluated perturbations.
    per_perturbation
        Condition -> metric name -> value.
    """

    overall: dict[str, float]
    subgroups: dict[str, dict[str, float]]
    per_perturbation: dict[str, dict[str, float]]

    def flat(self, prefix: str) -> dict[str, float]:
        """Flat names for loggers: ``<prefix>_<metric>`` and ``<prefix>_<subgroup>_<metric>``.

        Parameters
        ----------
        prefix
            ``train``, ``val`` or ``test``.

        Returns
        -------
        dict of str to float
            E.g. ``test_mse_de`` and ``test_combo_seen0_pearson_delta``.
        """
        out = {f"{prefix}_{m}": v for m, v in self.overall.items()}
        for group, values in self.subgroups.items():
            out.update({f"{prefix}_{group}_{m}": v for m, v in values.items()})
        return out

    def to_dict(self) -> dict[str, dict]:
        """The JSON layout of ``metrics.json``: ``{"overall", "subgroups", "per_perturbation"}``."""
        return {"overall": self.overall, "subgroups": self.subgroups,
                "per_perturbation": self.per_perturbation}


def pearson0(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation as GEARS uses it: scipy ``pearsonr``, NaN (constant input) -> 0.

    Parameters
    ----------
    x, y
        ``(n,)`` vectors with n ≥ 2.

    Returns
    -------
    float
        r = Σ(x − x̄)(y − ȳ) / sqrt(Σ(x − x̄)² Σ(y − ȳ)²), or 0 where it is undefined.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        r = float(pearsonr(x, y)[0])
    return 0.0 if np.isnan(r) else r


def top_variable_genes(condition_means: np.ndarray, n: int = N_HVG) -> np.ndarray:
    """The HVG set of GEARS's ``deeper_analysis``: genes with the largest std of condition means.

    Parameters
    ----------
    condition_means
        ``(n_conditions, n_genes)`` mean expression of **every** condition in the dataset (ctrl,
        train, val and test alike, as GEARS uses ``adata``).

    n
        Number of genes (GEARS: 200).

    Returns
    -------
    np.ndarray
        ``(min(n, n_genes),)`` gene indices ``argsort(std_k(M_kg))[-n:]`` (population std, ddof = 0),
        in GEARS's order (ascending std).
    """
    return np.argsort(np.std(condition_means, axis=0))[-n:]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def _same_direction(pred_delta: np.ndarray, true_delta: np.ndarray) -> int:
    return int(np.count_nonzero(np.sign(pred_delta) == np.sign(true_delta)))


def _check_inputs(pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], ctrl_mean: np.ndarray,
                  de_idx: Mapping[str, np.ndarray]) -> None:
    n_genes = ctrl_mean.shape[0]
    missing = [c for c in pred if c not in truth]
    if missing:
        raise ValueError(f"no truth for {len(missing)} predicted condition(s), first {missing[0]!r}")
    for name, source in (("pred", pred), ("truth", truth)):
        for c, v in source.items():
            if c in pred and v.shape != (n_genes,):
                raise ValueError(f"{name}[{c!r}] has shape {v.shape}; expected ({n_genes},)")
    bad = {c: int(np.count_nonzero(~np.isfinite(v))) for c, v in pred.items()}
    bad = {c: k for c, k in bad.items() if k}
    if bad:
        first = next(iter(bad))
        gene = int(np.flatnonzero(~np.isfinite(pred[first]))[0])
        raise ValueError(f"{sum(bad.values())} non-finite predicted value(s); first in condition "
                         f"{first!r} at gene index {gene}")
    no_de = [c for c in pred if c != CONTROL and c not in de_idx]
    if no_de:
        raise ValueError(f"no DE genes for {len(no_de)} condition(s), first {no_de[0]!r}")


def perturbation_metrics(p: np.ndarray, t: np.ndarray, c: np.ndarray, de: np.ndarray,
                         nd: np.ndarray | None = None, hvg: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of one non-control perturbation (formulas in the module docstring; PDS aside).

    Parameters
    ----------
    p, t, c
        ``(n_genes,)`` float64 predicted mean, true mean and control mean.
    de
        Gene indices ranked by DE, rank order (the first 20 are the DE set).
    nd
        ``top_non_dropout_de_20`` indices, enabling the ``*_non_dropout`` metrics.
    hvg
        HVG indices, enabling the ``*_top200_hvg`` metrics.

    Returns
    -------
    dict of str to float
        Metric name -> value (added metrics included).
    """
    n_genes = c.shape[0]
    top = de[:N_DE]
    pd_, td = p - c, t - c
    out = {
        "mse": _mse(p, t), "pearson": pearson0(p, t), "mae": float(np.mean(np.abs(p - t))),
        "mse_de": _mse(p[np.sort(top)], t[np.sort(top)]),
        "pearson_de": pearson0(p[np.sort(top)], t[np.sort(top)]),
        "pearson_delta": pearson0(pd_, td),
        "pearson_delta_de": pearson0(pd_[top], td[top]),
        "frac_correct_direction_all": _same_direction(pd_, td) / n_genes,
    }
    for n in DIRECTION_TOP_N:
        if len(de) >= min(n, n_genes):
            out[f"frac_correct_direction_{n}"] = _same_direction(pd_[de[:n]], td[de[:n]]) / n
    if nd is not None:
        out["mse_top20_de_non_dropout"] = _mse(pd_[nd], td[nd])
        out["pearson_delta_top20_de_non_dropout"] = pearson0(pd_[nd], td[nd])
    if hvg is not None:
        out["pearson_top200_hvg"] = pearson0(p[hvg], t[hvg])
        out["pearson_delta_top200_hvg"] = pearson0(pd_[hvg], td[hvg])
        out["mse_top200_hvg"] = _mse(p[hvg], t[hvg])
    out["de_overlap_20"] = (
        len(np.intersect1d(np.argsort(-np.abs(pd_), kind="stable")[:N_DE], top)) / N_DE
    )
    for spec in registered_metrics():
        if spec.compute is not None:
            out[spec.name] = float(spec.compute(p, t, c, de))
    return out


def _pds_l1(perts: Sequence[str], pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
            c: np.ndarray, gene_names: Sequence[str] | None) -> dict[str, float]:
    """Perturbation discrimination score (L1) of each perturbation in ``perts``."""
    if not perts:
        return {}
    true_eff = np.stack([truth[p] - c for p in perts])  # (P, n_genes)
    index = {g: i for i, g in enumerate(gene_names)} if gene_names is not None else {}
    out = {}
    for k, p in enumerate(perts):
        keep = np.ones(c.shape[0], dtype=bool)
        keep[[index[g] for g in condition_genes(p) if g in index]] = False
        dist = np.abs(true_eff[:, keep] - (pred[p] - c)[keep]).sum(axis=1)
        rank = int(np.flatnonzero(np.argsort(dist, kind="stable") == k)[0])
        out[p] = 1.0 - rank / len(perts)
    return out


def _mean_over(per: Mapping[str, Mapping[str, float]], conds: Sequence[str]) -> dict[str, float]:
    names: dict[str, None] = {}
    for cond in conds:
        names.update(dict.fromkeys(per[cond]))
    return {m: float(np.mean([per[cond][m] for cond in conds if m in per[cond]])) for m in names}


def aggregate(per: dict[str, dict[str, float]], subgroups: Mapping[str, Sequence[str]] | None) -> Metrics:
    """Per-perturbation values → :class:`Metrics`: unweighted means overall and per subgroup.

    Parameters
    ----------
    per
        Condition -> metric name -> value.
    subgroups
        Subgroup name -> conditions. Conditions not in ``per`` are skipped with a warning; a subgroup
        with none evaluated is left out.
    """
    groups: dict[str, dict[str, float]] = {}
    for name, members in (subgroups or {}).items():
        present = [m for m in members if m in per]
        if len(present) < len(members):
            log.warning("subgroup %s: %d of %d conditions not predicted; averaging over the rest",
                        name, len(members) - len(present), len(members))
        if present:
            groups[name] = _mean_over(per, present)
    return Metrics(overall=_mean_over(per, sorted(per)), subgroups=groups, per_perturbation=per)


def compute_metrics(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    ctrl_mean: np.ndarray,
    de_idx: Mapping[str, np.ndarray],
    *,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    non_dropout_de_idx: Mapping[str, np.ndarray] | None = None,
    hvg_idx: np.ndarray | None = None,
    gene_names: Sequence[str] | None = None,
    perturbed_mean: np.ndarray | None = None,
) -> Metrics:
    """GEARS-compatible metrics (plus MAE, DE overlap and PDS) of predicted condition means.

    Parameters
    ----------
    pred
        Condition -> ``(n_genes,)`` predicted mean expression μ̂_p. Every key is evaluated.
    truth
        Condition -> ``(n_genes,)`` observed mean expression μ_p; must cover every key of ``pred``.
    ctrl_mean
        ``(n_genes,)`` mean over all control cells, c.
    de_idx
        Condition -> gene indices ranked by DE (``rank_genes_groups_cov_all``), **rank order**. The
        first 20 are the DE set; ``frac_correct_direction_<n>`` needs at least ``min(n, n_genes)``
        entries and is left out for a perturbation with fewer (pass 200 or the full ranking).
    subgroups
        Subgroup name -> conditions (e.g. ``combo_seen0``). Conditions not in ``pred`` are skipped
        with a warning; a subgroup with none evaluated is left out.
    non_dropout_de_idx
        Condition -> ``top_non_dropout_de_20`` indices; enables the ``*_non_dropout`` metrics.
    hvg_idx
        ``(200,)`` HVG indices (:func:`top_variable_genes`); enables the ``*_top200_hvg`` metrics.
    gene_names
        ``(n_genes,)`` names; when given, PDS drops the perturbed genes' own columns.
    perturbed_mean
        ``(n_genes,)`` mean of the training perturbations' means (Systema's reference); enables
        ``systema_pearson_delta`` and ``systema_pearson_delta_de`` (PearsonΔ against it instead of the
        control, so that a shift shared by every perturbation earns nothing).

    Returns
    -------
    Metrics
        Per-perturbation values (sorted by condition, as GEARS's ``np.unique``), their unweighted
        means overall (each metric over the perturbations that have it) and per subgroup.

    Raises
    ------
    ValueError
        On a missing truth or DE list, a wrong shape, or non-finite predictions (count and first
        offender in the message).
    """
    ctrl = np.asarray(ctrl_mean, dtype=np.float64)
    _check_inputs(pred, truth, ctrl, de_idx)
    p64 = {k: np.asarray(v, dtype=np.float64) for k, v in pred.items()}
    t64 = {k: np.asarray(truth[k], dtype=np.float64) for k in pred}
    conds = sorted(p64)
    perts = [k for k in conds if k != CONTROL]
    per: dict[str, dict[str, float]] = {}
    hvg = None if hvg_idx is None else np.asarray(hvg_idx, dtype=np.intp)
    for k in conds:
        p, t = p64[k], t64[k]
        if k == CONTROL:
            per[k] = {"mse": _mse(p, t), "pearson": pearson0(p, t), "mae": float(np.mean(np.abs(p - t)))}
            continue
        nd = None
        if non_dropout_de_idx is not None and k in non_dropout_de_idx:
            nd = np.asarray(non_dropout_de_idx[k], dtype=np.intp)
        per[k] = perturbation_metrics(p, t, ctrl, np.asarray(de_idx[k], dtype=np.intp), nd, hvg)
    for k, v in _pds_l1(perts, p64, t64, ctrl, gene_names).items():
        per[k]["pds_l1"] = v
    for k, v in _centroid_accuracy(perts, p64, t64).items():
        per[k]["centroid_accuracy"] = v
    if perturbed_mean is not None:
        ref = np.asarray(perturbed_mean, dtype=np.float64)
        for k in perts:
            top = np.asarray(de_idx[k], dtype=np.intp)[:N_DE]
            pd_, td = p64[k] - ref, t64[k] - ref
            per[k]["systema_pearson_delta"] = pearson0(pd_, td)
            per[k]["systema_pearson_delta_de"] = pearson0(pd_[top], td[top])
    return aggregate(per, subgroups)


def _centroid_accuracy(perts: Sequence[str], pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]
                       ) -> dict[str, float]:
    """1 where a prediction is nearer (L2) to its own observed centroid than to any other evaluated one."""
    if not perts:
        return {}
    centroids = np.stack([truth[p] for p in perts])  # (P, n_genes)
    out = {}
    for k, p in enumerate(perts):
        dist = np.linalg.norm(centroids - pred[p], axis=1)
        out[p] = float(int(np.argmin(dist)) == k)
    return out


def pairing_noise_mse_de(control_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray,
                         de_idx: Mapping[str, np.ndarray]) -> float:
    """The pairing noise of an evaluation: ``mse_de`` of the no-change prediction on each condition's drawn
    controls against the no-change prediction on every control cell.

    A model's condition mean averages it over the condition's drawn control cells, so any prediction
    carries the drawn controls' deviation from ``c``; this is that deviation's mean squared size on the
    top-20 DE genes (``mse_de``'s genes), averaged over the conditions: 0 for the whole pool.

    Parameters
    ----------
    control_means
        Condition -> ``(n_genes,)`` mean of its drawn control cells
        (:meth:`pertadapt.data.dataset.PairedCells.control_means`).
    ctrl_mean
        ``(n_genes,)`` mean over all control cells, ``c``.
    de_idx
        Condition -> genes ranked by DE (the first :data:`N_DE` are scored).

    Returns
    -------
    float
        Mean over the conditions of ``mean_{g in DE_p} (m_p[g] - c[g])²``; NaN without conditions.
    """
    c = np.asarray(ctrl_mean, dtype=np.float64)
    per = [_mse(np.asarray(m, dtype=np.float64)[np.sort(de_idx[p][:N_DE])], c[np.sort(de_idx[p][:N_DE])])
           for p, m in control_means.items() if p != CONTROL]
    return float(np.mean(per)) if per else float("nan")


def score_predictions(pred: Mapping[str, np.ndarray], data: PerturbData, *,
                      subgroups: Mapping[str, Sequence[str]] | None = None,
                      reference_conditions: Sequence[str] = ()) -> Metrics:
    """The one metric path: predicted condition means scored against a dataset's observed means.

    Training (validation and test), ``pertadapt eval``, ``pertadapt baselines`` and the sweep's baseline
    arms all call this, so every metric means the same everywhere: truth = the condition's mean over all
    its cells, ``c`` = the mean over all control cells, DE lists from the file, the non-dropout and HVG
    variants, and PDS without the perturbed genes' own columns.

    Parameters
    ----------
    pred
        Condition -> ``(n_genes,)`` predicted mean (every key is evaluated).
    data
        The dataset (:func:`pertadapt.data.dataset.read_perturb_data`).
    subgroups
        Subgroup name -> conditions.
    reference_conditions
        The training conditions: the mean of their perturbations' means is the Systema reference.
    """
    means = data.condition_means
    unknown = [c for c in pred if c not in means]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted condition(s) have no cells in the data, first {unknown[0]!r}")
    if not data.non_dropout_de_idx:
        log.warning("the data has no uns['top_non_dropout_de_20']: the *_non_dropout metrics are left out")
    hvg = top_variable_genes(np.stack([means[c] for c in data.conditions]))
    refs = [c for c in reference_conditions if c != CONTROL and c in means]
    perturbed = np.mean([means[c] for c in refs], axis=0) if refs else None
    return compute_metrics(pred, {c: means[c] for c in pred}, data.ctrl_mean, data.de_idx, subgroups=subgroups,
                           non_dropout_de_idx=data.non_dropout_de_idx or None, hvg_idx=hvg, gene_names=data.genes,
                           perturbed_mean=perturbed)
