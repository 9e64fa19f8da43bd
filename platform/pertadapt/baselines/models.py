"""The four simple baselines that sit in every grid (Ahlmann-Eltze, Huber & Anders 2025).

All operate on condition means (pseudobulk, log-normalised expression): ``train_means[p]`` is the
``(n_genes,)`` mean of training condition ``p`` and ``b`` = ``ctrl_mean`` the ``(n_genes,)`` mean of
all control cells. Each model is fitted in closed form by :func:`fit_baseline` and predicts a
``(n_genes,)`` mean per GEARS condition name (``ctrl``, ``A+ctrl``, ``A+B``).

Each baseline's options are its ``model:`` block, the dataclass registered under its name in
:data:`pertadapt.config.components.MODEL_OPTIONS` (``baseline_linear``: ``k``, ``ridge``); :data:`BASELINES`
maps the same name to the builder that fits the model from those options, as backbones and losses do.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pertadapt.config.components import MODEL_OPTIONS, BaselineOptions
from pertadapt.config.components import LinearBaseline as LinearOptions
from pertadapt.data.conditions import condition_genes
from pertadapt.data.keys import CONTROL

__all__ = [
    "BASELINES",
    "AdditiveBaseline",
    "Baseline",
    "LinearBaseline",
    "MeanBaseline",
    "NoChangeBaseline",
    "baseline_options",
    "fit_baseline",
]

log = logging.getLogger(__name__)


class Baseline(ABC):
    """A fitted baseline; subclasses implement :meth:`_predict_one`."""

    def predict(self, conditions: Sequence[str],
                control_shift: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Predicted mean expression of each condition.

        Parameters
        ----------
        conditions
            GEARS condition names.
        control_shift
            Condition -> ``(n_genes,)`` mean of the control cells the models' prediction of it averages over,
            minus b. A baseline predicts a change from b; applied to those control cells instead of b, it
            is scored against the same controls as the models (:meth:`PairedCells.control_means`). ``None``
            (or a condition without one) = b itself.

        Returns
        -------
        dict of str to np.ndarray
            Condition -> ``(n_genes,)`` float64 prediction.
        """
        shift = control_shift or {}
        return {c: self._predict_one(c) + shift[c] if c in shift else self._predict_one(c) for c in conditions}

    @abstractmethod
    def _predict_one(self, condition: str) -> np.ndarray:
        """``(n_genes,)`` prediction of one condition."""


@dataclass(frozen=True)
class NoChangeBaseline(Baseline):
    """No change: ŷ_p = b for every condition.

    Attributes
    ----------
    ctrl_mean
        ``(n_genes,)`` control mean b.
    """

    ctrl_mean: np.ndarray

    def _predict_one(self, condition: str) -> np.ndarray:
        return self.ctrl_mean.copy()


@dataclass(frozen=True)
class MeanBaseline(Baseline):
    """Training mean: ŷ_p = (1/|T|) Σ_{q ∈ T} ȳ_q over the non-control training conditions T.

    Attributes
    ----------
    mean
        ``(n_genes,)`` mean of the training perturbation means (singles and doubles, not ctrl).
    """

    mean: np.ndarray

    def _predict_one(self, condition: str) -> np.ndarray:
        return self.mean.copy()


@dataclass(frozen=True)
class AdditiveBaseline(Baseline):
    """Additive: ŷ_{A+B} = b + Δ_A + Δ_B, ŷ_{A+ctrl} = b + Δ_A, ŷ_ctrl = b.

    Δ_g = ȳ_{g+ctrl} − b from the training single of gene g, and Δ_g = 0 (no change) for a gene
    without a training single.

    Attributes
    ----------
    ctrl_mean
        ``(n_genes,)`` control mean b.
    deltas
        Gene -> ``(n_genes,)`` Δ_g of every training single.
    """

    ctrl_mean: np.ndarray
    deltas: Mapping[str, np.ndarray]

    def _predict_one(self, condition: str) -> np.ndarray:
        out = self.ctrl_mean.copy()
        for gene in condition_genes(condition):
            if gene in self.deltas:
                out += self.deltas[gene]
        return out


@dataclass(frozen=True)
class LinearBaseline(Baseline):
    """Ahlmann-Eltze linear model: ŷ_p = G W e_p + m + b.

    Attributes
    ----------
    embedding
        ``(n_genes, K)`` gene embedding G (PC scores or a given embedding).
    weights
        ``(K, K)`` W = (GᵀG + λI)⁻¹ Gᵀ Ỹ Pᵀ (PPᵀ + λI)⁻¹.
    offset
        ``(n_genes,)`` m + b: the row mean m of the training changes plus the control mean b.
    gene_rows
        Gene name -> row of G; the perturbation embedding e_p of ``A+ctrl`` is G[A], of ``ctrl``
        zero, and of ``A+B`` G[A] + G[B] (**our extension**: the published model covers singles
        only). A perturbed gene without a row contributes zero.
    """

    embedding: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    gene_rows: Mapping[str, int]

    def _predict_one(self, condition: str) -> np.ndarray:
        e = np.zeros(self.embedding.shape[1])
        for gene in condition_genes(condition):
            if gene in self.gene_rows:
                e += self.embedding[self.gene_rows[gene]]
        return self.embedding @ (self.weights @ e) + self.offset


def _training_perturbations(train_means: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(c for c in train_means if c != CONTROL)


def _fit_nochange(options: BaselineOptions, train_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray,
                  **_: object) -> Baseline:
    return NoChangeBaseline(ctrl_mean)


def _fit_mean(options: BaselineOptions, train_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray,
              **_: object) -> Baseline:
    perts = _training_perturbations(train_means)
    if not perts:
        raise ValueError("baseline_mean: no training perturbation (only ctrl)")
    return MeanBaseline(np.mean([train_means[c] for c in perts], axis=0))


def _single_deltas(train_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray) -> dict[str, np.ndarray]:
    deltas = {}
    for c in _training_perturbations(train_means):
        genes = condition_genes(c)
        if len(genes) == 1:
            deltas[genes[0]] = train_means[c] - ctrl_mean
    return deltas


def _fit_additive(options: BaselineOptions, train_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray,
                  **_: object) -> Baseline:
    return AdditiveBaseline(ctrl_mean, _single_deltas(train_means, ctrl_mean))


def _pca_scores(matrix: np.ndarray, k: int) -> np.ndarray:
    """Top-k PC scores of ``matrix`` ``(n_genes, n_conditions)`` with genes as observations.

    Each column is centred over genes (R ``prcomp(center = TRUE, scale. = FALSE)``); the scores are
    U_k S_k of the SVD of the centred matrix, i.e. ``prcomp(...)$x[, 1:k]`` up to column signs, which
    the fitted predictions do not depend on.
    """
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(k, s.shape[0])
    return u[:, :k] * s[:k]


def _ridge_bilinear(g: np.ndarray, y: np.ndarray, p: np.ndarray, ridge: float) -> np.ndarray:
    """W = (GᵀG + λI)⁻¹ Gᵀ Y Pᵀ (PPᵀ + λI)⁻¹ for G ``(n, K)``, Y ``(n, m)``, P ``(K, m)``."""
    k = g.shape[1]
    left = np.linalg.solve(g.T @ g + ridge * np.eye(k), g.T @ y @ p.T)
    # right-multiplication by the inverse of the symmetric matrix (PPᵀ + λI), as a solve
    return np.linalg.solve(p @ p.T + ridge * np.eye(k), left.T).T


def _fit_linear(options: LinearOptions, train_means: Mapping[str, np.ndarray], ctrl_mean: np.ndarray, *,
                gene_embedding: np.ndarray | None, gene_names: Sequence[str] | None) -> Baseline:
    if gene_names is None:
        raise ValueError("baseline_linear: gene_names are required to find the perturbed genes' rows")
    if len(gene_names) != ctrl_mean.shape[0]:
        raise ValueError(f"baseline_linear: {len(gene_names)} gene names for {ctrl_mean.shape[0]} genes")
    rows = {g: i for i, g in enumerate(gene_names)}
    perts = _training_perturbations(train_means)
    if gene_embedding is None:
        ctrl_col = train_means.get(CONTROL, ctrl_mean)
        pseudobulk = np.column_stack([ctrl_col] + [train_means[c] for c in perts])
        g = _pca_scores(pseudobulk, options.k)  # k >= 1, ridge >= 0: checked by the options
    else:
        g = np.asarray(gene_embedding, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] != ctrl_mean.shape[0]:
            raise ValueError(f"baseline_linear: gene_embedding has shape {g.shape}; expected "
                             f"({ctrl_mean.shape[0]}, K)")
    # fit columns: ctrl (zero change, zero embedding) + training singles whose gene has a row
    fit = [c for c in perts if len(genes := condition_genes(c)) == 1 and genes[0] in rows]
    if not fit:
        raise ValueError("baseline_linear: no training single of a measured gene to fit on")
    y = np.column_stack([np.zeros_like(ctrl_mean)] + [train_means[c] - ctrl_mean for c in fit])
    p = np.column_stack([np.zeros(g.shape[1])] + [g[rows[condition_genes(c)[0]]] for c in fit])
    centre = y.mean(axis=1)
    w = _ridge_bilinear(g, y - centre[:, None], p, options.ridge)
    log.debug("baseline_linear: K=%d, %d fit columns, ridge %g", g.shape[1], y.shape[1], options.ridge)
    return LinearBaseline(embedding=g, weights=w, offset=centre + ctrl_mean, gene_rows=rows)


#: ``model.name`` → builder ``(options, train_means, ctrl_mean, *, gene_embedding, gene_names) -> Baseline``:
#: ``options`` is the baseline's ``model:`` block, the dataclass registered under the same name in
#: ``config.components.MODEL_OPTIONS`` (keys equal :data:`pertadapt.config.schema.BASELINE_MODELS`).
BASELINES: dict[str, Callable[..., Baseline]] = {
    "baseline_nochange": _fit_nochange,
    "baseline_mean": _fit_mean,
    "baseline_additive": _fit_additive,
    "baseline_linear": _fit_linear,
}


def baseline_options(knobs: Mapping[str, Mapping[str, Any]] | None = None) -> list[BaselineOptions]:
    """The options of every baseline of :data:`BASELINES`, in order: each block's defaults, or ``knobs[name]``
    (e.g. ``{"baseline_linear": {"k": 5}}``), validated by the block's dataclass."""
    knobs = knobs or {}
    return [MODEL_OPTIONS.options(name)(**knobs.get(name, {})) for name in BASELINES]


def fit_baseline(
    options: BaselineOptions,
    train_means: Mapping[str, np.ndarray],
    ctrl_mean: np.ndarray,
    *,
    gene_embedding: np.ndarray | None = None,
    gene_names: Sequence[str] | None = None,
) -> Baseline:
    """Fit the baseline ``options`` names on training condition means.

    Parameters
    ----------
    options
        The baseline's ``model:`` block (``options.name`` is a key of :data:`BASELINES`); its builder reads
        its knobs, e.g. ``baseline_linear``'s ``k`` (number K of principal components) and ``ridge`` (penalty
        λ ≥ 0, applied on both sides).
    train_means
        Training condition -> ``(n_genes,)`` mean expression (singles, doubles and optionally ``ctrl``).
    ctrl_mean
        ``(n_genes,)`` mean over all control cells, b.
    gene_embedding
        ``(n_genes, K)`` embedding used as G (and for P) instead of the PCA, e.g. GO or a backbone's
        gene embeddings; rows follow ``gene_names``.
    gene_names
        ``(n_genes,)`` names of the measured genes; required by ``baseline_linear``.

    Returns
    -------
    Baseline
        The fitted model; ``predict(conditions)`` gives ``(n_genes,)`` means.

    Raises
    ------
    ValueError
        On an unknown ``options.name`` (the message lists the valid names), options of another component,
        or unusable inputs.

    Notes
    -----
    ``baseline_linear`` (Ahlmann-Eltze, Huber & Anders 2025: the authors' ``run_linear_pretrained_model.R``
    with its default options): X = the genes × conditions matrix of all training means
    including ``ctrl`` (``ctrl_mean`` when ``train_means`` has no ``ctrl``) and doubles; G = its top-K
    PC scores (genes as observations, columns centred). Fit columns = ``ctrl`` (change 0, embedding 0)
    plus every training single ``A+ctrl`` whose gene A is measured, with change Y_p = ȳ_p − b and
    embedding P_p = G[A]. With m = the row mean of Y and Ỹ = Y − m,
    W = (GᵀG + λI)⁻¹ Gᵀ Ỹ Pᵀ (PPᵀ + λI)⁻¹ and ŷ_p = G W e_p + m + b. Doubles use
    e_{A+B} = G[A] + G[B], an extension of ours.
    """
    name = options.name
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid names: {', '.join(BASELINES)}")
    if not isinstance(options, MODEL_OPTIONS.options(name)):
        raise ValueError(f"model.name: {name!r} needs its own options, got {type(options).__name__}")
    ctrl = np.asarray(ctrl_mean, dtype=np.float64)
    means = {c: np.asarray(v, dtype=np.float64) for c, v in train_means.items()}
    return BASELINES[name](options, means, ctrl, gene_embedding=gene_embedding, gene_names=gene_names)
