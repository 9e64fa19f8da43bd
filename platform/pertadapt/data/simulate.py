"""Perturb-seq simulator on real human GO annotations, with a stored, noise-free ground truth.

No real Perturb-seq screen can be downloaded on the platform's machines, so the default dataset and
the held-out benchmark are simulated. The simulator is a vectorised NumPy/SciPy model written for
this package; it is not SERGIO (PyPI ``sergio-scsim``). SERGIO integrates a chemical Langevin
equation cell by cell and gene by gene in Python loops: its authors report minutes to hours for a
few thousand genes, it needs a hand-written master-regulator input file, it has no notion of CRISPR
perturbations, genetic-interaction types or GO, and its technical-noise model (outliers, library
size, dropout) is a post-hoc step, not a negative binomial with a 10x-like mean-variance trend. Here
the perturbation steady states are a fixed point computed for all conditions at once (one sparse
product per iteration), counts are drawn in chunks of cells with one Gamma-Poisson draw, and the
``demo`` preset takes about 2 s (half of it loading the GO table).

Generative model (every random draw comes from ``numpy.random.default_rng`` streams spawned from
``seed``, so the same preset, seed and overrides give a byte-identical file):

1. **Genes.** ``n_genes`` real human symbols that have direct GO annotations (the bundled table of
   :mod:`pertadapt.go`) and are in the 19,264-gene foundation-model vocabulary. A fraction
   ``module_frac`` is drawn in blocks of 4-12 genes from GO terms annotated to 10-200 of the
   candidates ("modules"), the rest uniformly, so that GO neighbourhoods exist inside the panel. Genes
   are ordered as in the vocabulary.
2. **Network.** A sparse directed gene-regulatory network with about ``mean_out_degree * n_genes``
   edges. Each gene's expected out-degree is proportional to a log-normal activity (log-sd 1), so a
   few hub regulators have many targets. A share ``1 - go_signal`` of the edges has its source drawn
   by activity and its target uniformly, a share ``go_signal``
   with pair probability proportional to the source's activity times ``J_ij ** 3``, the cubed GO
   Jaccard similarity of direct
   annotations (capped at 1). With ``go_signal = 0`` edges ignore GO; with ``go_signal = 1`` every
   edge joins genes sharing GO terms, about 80% of them GO neighbours (J > 0.1, as in GEARS). Edge
   signs are positive with probability ``p_activation``; magnitudes are uniform in [0.5, 1] and are
   rescaled so that each gene's absolute incoming weights sum to at most ``weight_scale`` < 1.
3. **Perturbations.** ``n_singles`` target genes, drawn among genes with outgoing edges (like the
   transcription factors of Norman et al. 2019), and ``n_doubles`` distinct pairs of them. The
   guide clamps the target's log expression: CRISPRi to ``log(1 - e)`` with knock-down efficiency
   ``e ~ U(kd_efficiency)``, CRISPRa to ``+U(activation_log_fc)``.
4. **Steady state.** The log fold changes ``z`` of the other genes solve the saturating fixed point
   ``z_j = S tanh(sum_i W_ij z_i / S)`` with ``S = max_log_fc``; the map is a contraction (incoming
   weight sums < 1), so iteration converges to the unique steady state.
5. **Genetic interactions** (Norman et al. 2019, Fig. 4). Each double gets a type in
   :data:`GI_TYPES` with proportions ``gi_mix``; ``z_ab`` is the joint steady state with both genes
   clamped and only its downstream part (targets excluded) is changed: ``additive`` keeps ``z_ab``;
   ``synergy`` multiplies it by ``1 + g``, ``g ~ U(0.5, 1)``; ``buffering`` (suppression) by
   ``1 - g``, ``g ~ U(0.4, 0.7)``; ``epistasis`` returns the dominant gene's single response plus
   ``g ~ U(0, 0.2)`` of the rest; ``neomorphic`` adds effects of size ``U(0.7, 1.5)`` (random sign)
   on ``n_neomorphic_genes`` genes that are downstream of neither target. The type, ``g`` and the
   dominant gene are stored per double.
6. **Cells.** ``n_control`` control cells and ``cells_per_condition`` cells per perturbation. A
   perturbed cell is a non-responder (incomplete knock-down, no shift) with probability
   ``nonresponder_frac``. Each cell draws a batch (of ``n_batches``, gene shifts ``N(0, batch_sd)``)
   and a log-normal library size (median ``library_median``, log-sd ``library_log_sd``).
   **Cell-to-cell variation** (``cell_noise_sd`` = sigma > 0): each cell draws intrinsic
   fluctuations ``eps_c ~ N(0, sigma^2 I)`` of the genes' inputs, which propagate through the
   network, ``dx_c = eps_c + W^T dx_c = (I - W^T)^-1 eps_c`` (the fixed point's linear response at
   the control state, where the saturation has slope 1), and pass the same saturation: the cell's
   log fold changes are ``z_c = z + S tanh(dx_c / S)``, except that a responding cell's clamped
   targets keep their clamp. So control cells co-vary along the network's edges (demo preset, 400
   control cells: AUROC of |Pearson r| for joined against unjoined gene pairs 0.51 at sigma 0, 0.65
   at 0.5, 0.76 at 0.75). The fluctuations come from a stream of their own: at sigma 0 none is
   drawn and every other draw is unchanged.
   **Cell programs** (``program_sd`` > 0): ``n_programs`` shared continuous cell states, each
   loading on a share ``program_frac`` of the genes (weights ``U(0.5, 1)``, positive with probability
   ``p_activation``); each cell draws one activity per program, ``a_c ~ N(0, program_sd^2 I)``, that
   joins the inputs, ``eps_c + P a_c``, and passes the same propagation and saturation. Whole gene
   sets then rise and fall together, so a masked gene is predictable from the others (demo preset:
   ridge on the other genes 0.83 x the per-gene mean's squared error, 0.99 x without programs). Their
   own stream again: at 0 nothing is drawn.
7. **Counts.** ``count ~ NB(mean = L * pi_g * exp(z_c + batch), dispersion phi_g)`` drawn as
   Gamma-Poisson, ``var = mean + phi_g mean^2``. Baseline means at the median library are
   log-normal (median ``gene_mean_median`` UMI per cell, log10-sd ``gene_mean_log10_sd``) and the
   dispersion follows a decreasing trend ``phi_g = dispersion_asymptote (1 + mean_g^-1/2)`` with
   log-normal scatter (sd 0.25).

Realism targets (checked by ``tests/unit/test_simulate_validation.py``): droplet UMI counts are
negative binomial without zero inflation, Poisson-like (variance/mean near 1) for genes below 0.1
UMI per cell and quadratic above (Svensson 2020, *Nat. Biotechnol.* 38:147; Hafemeister & Satija
2019, *Genome Biol.* 20:296, whose fitted NB ``theta`` is about 1-100, i.e. ``phi`` 0.01-1); the
log-log slope of variance against mean over genes therefore lies between 1 and 2, and the zero
fraction of a panel of expressed/variable genes is typically 0.5-0.95 (a whole 10x transcriptome is
about 0.9-0.95). Library sizes of 10x cell-line screens are log-normal with a log-sd of about
0.3-0.5.

Ground truth, in ``uns['sim']`` (h5ad-writable): the genes, the network edges and weights, the
conditions with their latent log fold changes, the expected mean log-normalised expression per
condition (``true_mean``, what a perfect model predicts for the mean of ``X`` over the condition's
cells) and its shift from control, GI type and parameter per double, the parameters as JSON and the
seed. ``true_mean`` is the expectation of ``log1p(target_sum * count / total)`` over the NB noise,
the library-size distribution (7-node Gauss-Hermite), the batches and the non-responder mixture,
with the cell total replaced by its expectation; counts with mean up to 30 are summed exactly, above
that a second-order delta method is used. With cell-to-cell variation it is also the expectation over
each gene's fluctuation (Gauss-Hermite, 5 nodes over ``dx_g ~ N(0, var_g)`` times 5 over the library
size: within 5e-4 of 9 x 9 nodes on the demo preset), and the total is treated
more finely: the gene's own count stays in it and the rest of the cell's total enters to second order
in its variance (NB noise and the correlated fluctuations of the other genes, from the covariance
``sigma^2 (I - W^T)^-1 (I - W^T)^-T``). With programs it is also the expectation over the program
activities (Gauss-Hermite, 3 nodes per program, and 3 x 3 nodes over the rest of the fluctuation and the
library size at each), given which the fluctuation is the one above, shifted.
Checked against 20,000-cell draws: each gene's observed mean lies within its standard error of
``true_mean``; with programs the genes' errors are correlated and their joint (Mahalanobis) distance is
1.3-2.5 per gene against 1 for an exact truth, about 0.002 in log1p units
(``tests/unit/test_simulate_network.py``). At ``cell_noise_sd = program_sd = 0`` the original computation
is kept, so older files are reproduced byte for byte;
its cell-total approximation leaves errors up to about 0.01 on the most expressed genes of an 80-gene
panel (less in wider panels), below a 40-cell condition's sampling noise.
:func:`score_against_truth` scores predictions against it.

What this is not: biology. The network, effect sizes and GI types are random draws from the rules
above, with real gene names and real GO annotations attached. See ``docs/simulator.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.polynomial.hermite_e import hermegauss
from scipy.sparse.linalg import splu

from pertadapt.data.io import read_h5ad
from pertadapt.data.keys import CELL_TYPE, CONDITION, CONTROL, GENE_NAME, SEP
from pertadapt.data.prepare import prepare_adata
from pertadapt.data.presets import GI_TYPES, MODALITIES, PRESETS, SimParams
from pertadapt.files import fm_gene_vocabulary
from pertadapt.go.annotations import load_annotations
from pertadapt.go.similarity import jaccard_matrix

__all__ = [
    "GI_TYPES",
    "MODALITIES",
    "PRESETS",
    "SIM_KEY",
    "SimParams",
    "SimTruth",
    "read_sim_truth",
    "sim_truth",
    "simulate",
]

log = logging.getLogger(__name__)

#: ``uns`` key of the ground truth.
SIM_KEY = "sim"
#: Edge affinity is ``J ** 3``: direct GO annotations share broad terms ("protein binding",
#: "cytoplasm"), so about 70% of gene pairs have J > 0; with the cube about 80% of the GO share of
#: the edges joins genes with J > 0.1 (GEARS's GO-graph threshold), with J itself only about 20%.
_GO_EXPONENT = 3
#: Log-sd of the regulator activity that sets each gene's expected out-degree (hub regulators).
_HUB_LOG_SD = 1.0
_MODULE_TERM_SIZE = (10, 200)
_MODULE_BLOCK = (4, 12)
_EXACT_MAX_MEAN = 30.0
_LIBRARY_NODES = 7
#: Gauss-Hermite nodes over each gene's cell-to-cell fluctuation in ``true_mean``, and over the
#: library size in that case: the fluctuation dominates the quadrature error (demo preset: 5 x 5
#: nodes within 5e-4 of 9 x 9, 7 x 5 within 4e-4, 5 x 3 off by 4e-3).
_FLUCTUATION_NODES = 5
_FLUCTUATION_LIBRARY_NODES = 5
#: Gauss-Hermite nodes per program over the cell's program activities in ``true_mean`` (3 ** K nodes), and
#: the nodes over the rest of the fluctuation and the library size at each of them (demo preset: within
#: 0.002, mean 1.6e-4, of 5 x 5 inner nodes, in a quarter of the time).
_PROGRAM_NODES = 3
_PROGRAM_INNER_NODES = (3, 3)
#: Parameters left out of ``uns['sim']['params']`` while the parameter they map to is 0 (it switches a feature
#: off that older files lack), so a file simulated before the feature existed is reproduced byte for byte.
_OFF_AT_ZERO = {"cell_noise_sd": "cell_noise_sd", "program_sd": "program_sd", "n_programs": "program_sd",
                "program_frac": "program_sd"}
_CELL_CHUNK = 4096
_MAX_ITER = 500
_TOL = 1e-8


# --------------------------------------------------------------------------- genes and network


def _choose_genes(gene2terms: Mapping[str, frozenset[str]], p: SimParams,
                  rng: np.random.Generator) -> list[str]:
    """Draw ``n_genes`` annotated vocabulary genes, a share ``module_frac`` in GO-term blocks."""
    vocab = list(fm_gene_vocabulary())
    order = {g: i for i, g in enumerate(vocab)}
    candidates = sorted(g for g in order if gene2terms.get(g))
    if p.n_genes > len(candidates):
        raise ValueError(f"n_genes: {p.n_genes} requested but only {len(candidates)} vocabulary genes "
                         "have GO annotations")
    term2genes: dict[str, list[str]] = {}
    for g in candidates:
        for t in gene2terms[g]:
            term2genes.setdefault(t, []).append(g)
    lo, hi = _MODULE_TERM_SIZE
    modules = sorted(t for t, gs in term2genes.items() if lo <= len(gs) <= hi)
    chosen: set[str] = set()
    n_module = round(p.module_frac * p.n_genes)
    while len(chosen) < n_module and modules:
        members = [g for g in term2genes[modules[rng.integers(len(modules))]] if g not in chosen]
        k = min(int(rng.integers(_MODULE_BLOCK[0], _MODULE_BLOCK[1] + 1)), n_module - len(chosen), len(members))
        chosen.update(members[i] for i in rng.choice(len(members), size=k, replace=False))
    rest = [g for g in candidates if g not in chosen]
    chosen.update(rest[i] for i in rng.choice(len(rest), size=p.n_genes - len(chosen), replace=False))
    return sorted(chosen, key=order.__getitem__)


def _sample_network(jac: sp.csr_matrix, p: SimParams,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample directed edges ``src -> dst`` and weights; shapes ``(E,)`` each, sorted by (src, dst)."""
    n = p.n_genes
    n_edges = p.mean_out_degree * n
    # Hub regulators: each gene's out-degree is proportional to a log-normal activity (mean 1).
    activity = np.exp(rng.normal(0.0, _HUB_LOG_SD, n))
    activity /= activity.mean()
    # GO-independent share: source by activity, target uniform among the other genes.
    k = rng.poisson((1.0 - p.go_signal) * n_edges)
    src_r = rng.choice(n, size=k, p=activity / activity.sum())
    off = rng.integers(n - 1, size=k)
    dst_r = off + (off >= src_r)
    # GO share: pair probability proportional to activity times the cubed Jaccard similarity.
    jo = (sp.triu(jac, 1, format="coo") + sp.tril(jac, -1, format="coo")).tocoo()
    affinity = activity[jo.row] * jo.data.astype(float) ** _GO_EXPONENT
    total = affinity.sum()
    prob = np.minimum(1.0, p.go_signal * n_edges * affinity / total) if total > 0 else np.zeros(jo.nnz)
    keep = rng.random(jo.nnz) < prob
    key = np.unique(np.concatenate([src_r * n + dst_r, jo.row[keep].astype(np.int64) * n + jo.col[keep]]))
    src, dst = np.divmod(key, n)
    sign = np.where(rng.random(key.size) < p.p_activation, 1.0, -1.0)
    weight = sign * rng.uniform(0.5, 1.0, key.size)
    in_sum = np.bincount(dst, weights=np.abs(weight), minlength=n)
    weight *= p.weight_scale / np.maximum(1.0, in_sum[dst])
    return src, dst, weight


# --------------------------------------------------------------------------- perturbation responses


def _steady_state(w: sp.csr_matrix, clamp_idx: np.ndarray, clamp_val: np.ndarray, s: float) -> np.ndarray:
    """Fixed point of ``z = S tanh(z W / S)`` with clamped targets.

    Parameters
    ----------
    w
        ``(G, G)`` weights, ``w[i, j]`` = effect of gene ``i`` on gene ``j``.
    clamp_idx, clamp_val
        ``(C, 2)`` target gene indices (``-1`` = none) and their clamped log fold changes.
    s
        Saturation of the downstream log fold changes.

    Returns
    -------
    numpy.ndarray
        ``(C, G)`` steady-state log fold changes.
    """
    rows, slots = np.nonzero(clamp_idx >= 0)
    cols, vals = clamp_idx[rows, slots], clamp_val[rows, slots]
    z = np.zeros((clamp_idx.shape[0], w.shape[0]))
    z[rows, cols] = vals
    wt = w.T.tocsr()
    for _ in range(_MAX_ITER):
        new = s * np.tanh((wt @ z.T).T / s)
        new[rows, cols] = vals
        delta = np.abs(new - z).max(initial=0.0)
        z = new
        if delta < _TOL:
            break
    return z


def _descendants(w: sp.csr_matrix, genes: np.ndarray) -> np.ndarray:
    """``(G,)`` boolean mask of genes reachable from any of ``genes`` (excluded unless on a cycle)."""
    reach = np.zeros(w.shape[0], dtype=bool)
    frontier = np.zeros(w.shape[0], dtype=bool)
    frontier[genes] = True
    adj = (w != 0).astype(np.int8).T.tocsr()
    while frontier.any():
        nxt = (adj @ frontier.astype(np.int8)) > 0
        frontier = nxt & ~reach
        reach |= nxt
    return reach


class _Fluctuation:
    """Cells' fluctuating inputs propagated through the network: ``dx = (I - W^T)^-1 eps``.

    ``eps = e + P a``: each gene's intrinsic fluctuation ``e ~ N(0, sd^2 I)`` plus the cell's program
    activities ``a ~ N(0, I_K)`` through the ``(G, K)`` loadings ``P`` (already scaled by ``program_sd``).

    Parameters
    ----------
    w
        ``(G, G)`` weights, ``w[i, j]`` = effect of gene ``i`` on gene ``j``.
    sd
        Sd of each gene's intrinsic fluctuation.
    s
        Saturation: a cell's log fold changes move by ``S tanh(dx / S)``.
    programs
        ``(G, K)`` program loadings ``P`` and the generator of the activities, or ``None``.
    """

    def __init__(self, w: sp.csr_matrix, sd: float, s: float,
                 programs: tuple[np.ndarray, np.random.Generator] | None = None) -> None:
        n = w.shape[0]
        self._lu = splu((sp.identity(n, format="csc") - w.T).tocsc())
        self.sd, self.s, self._programs = sd, s, programs
        a = self._lu.solve(np.eye(n))  # A = (I - W^T)^-1; dx has covariance A (sd^2 I + P P^T) A^T
        #: ``(G, G)`` covariance of ``dx`` given the cell's program activities, ``sd^2 A A^T``.
        self.residual_cov = sd**2 * (a @ a.T)
        #: ``(G,)`` variance of each gene's ``dx`` given the cell's program activities.
        self.residual_var = np.diag(self.residual_cov).copy()
        #: ``(G, K)`` move of ``dx`` per unit of each program's activity, ``A P`` (``K`` = 0 without programs).
        self.directions = a @ programs[0] if programs is not None else np.zeros((n, 0))

    def draw(self, n_cells: int, rng: np.random.Generator) -> np.ndarray:
        """``(n_cells, G)`` log fold-change fluctuations ``S tanh(dx / S)`` of independent cells."""
        n_genes = self.residual_var.size
        eps = rng.normal(0.0, self.sd, (n_cells, n_genes)) if self.sd > 0 else np.zeros((n_cells, n_genes))
        if self._programs is not None:
            loadings, r_prog = self._programs
            eps += r_prog.normal(0.0, 1.0, (n_cells, loadings.shape[1])) @ loadings.T
        return self.s * np.tanh(self._lu.solve(eps.T).T / self.s)


def _program_loadings(n_genes: int, p: SimParams, rng: np.random.Generator) -> np.ndarray:
    """``(G, K)`` loadings of the ``n_programs`` programs, times ``program_sd``: each gene joins each program
    with probability ``program_frac``, weight ``U(0.5, 1)``, positive with probability ``p_activation``."""
    shape = (n_genes, p.n_programs)
    member = rng.random(shape) < p.program_frac
    sign = np.where(rng.random(shape) < p.p_activation, 1.0, -1.0)
    return p.program_sd * member * sign * rng.uniform(0.5, 1.0, shape)


def _assign_gi(n_doubles: int, mix: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """``(D,)`` GI type indices with counts from ``mix`` by largest remainder, in random order."""
    quota = np.asarray(mix) * n_doubles
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[: n_doubles - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(mix)), counts))


def _apply_gi(z_joint: np.ndarray, z_dominant: np.ndarray, targets: np.ndarray, types: np.ndarray,
              w: sp.csr_matrix, p: SimParams,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply the GI type of each double to the downstream part of its joint steady state.

    Parameters
    ----------
    z_joint
        ``(D, G)`` steady states with both genes of each double clamped.
    z_dominant
        ``(D, 2, G)`` single-perturbation steady states of the two genes of each double.
    targets
        ``(D, 2)`` gene indices of the two targets.
    types
        ``(D,)`` indices into :data:`GI_TYPES`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(D, G)`` double log fold changes (targets keep their clamped values), ``(D,)`` GI
        parameter ``g``, ``(D,)`` dominant slot (0 or 1 for epistasis, -1 otherwise).
    """
    z = z_joint.copy()
    param = np.zeros(len(types))
    dominant = np.full(len(types), -1)
    for d, t in enumerate(types):
        kind = GI_TYPES[t]
        if kind == "synergy":
            param[d] = rng.uniform(0.5, 1.0)
            z[d] *= 1.0 + param[d]
        elif kind == "buffering":
            param[d] = rng.uniform(0.4, 0.7)
            z[d] *= 1.0 - param[d]
        elif kind == "epistasis":
            param[d] = rng.uniform(0.0, 0.2)
            dominant[d] = rng.integers(2)
            dom = z_dominant[d, dominant[d]]
            z[d] = dom + param[d] * (z_joint[d] - dom)
        elif kind == "neomorphic":
            param[d] = rng.uniform(0.7, 1.5)
            free = np.flatnonzero(~_descendants(w, targets[d]))
            free = np.setdiff1d(free, targets[d])
            hit = rng.choice(free, size=min(p.n_neomorphic_genes, free.size), replace=False)
            z[d, hit] += param[d] * np.where(rng.random(hit.size) < 0.5, 1.0, -1.0)
    rows = np.repeat(np.arange(len(types)), 2)
    cols = targets.ravel()
    z[rows, cols] = z_joint[rows, cols]
    return z, param, dominant


# --------------------------------------------------------------------------- observation model


def _nb_expected_log1p(mean: np.ndarray, phi: np.ndarray, scale: np.ndarray,
                       rest: np.ndarray | None = None, rest_var: np.ndarray | None = None) -> np.ndarray:
    """``E[log1p(scale * X)]`` for ``X ~ NB(mean, phi)`` (``var = mean + phi mean^2``).

    Parameters
    ----------
    mean, phi, scale
        ``(E,)`` arrays, one entry per expectation.
    rest, rest_var
        ``(E,)`` expected count of the cell's other genes and its variance; when given the
        expectation is of ``log1p(scale * X / (X + R))`` over ``X`` and the rest ``R``, the
        log-normalised value of a gene whose own count is part of the cell total ``X + R``
        (``scale`` is then the normalisation target), to second order in ``R``'s fluctuation.

    Returns
    -------
    numpy.ndarray
        ``(E,)`` expectations: exact sums over the support for ``mean <= 30`` (truncated where the
        remaining tail is negligible and renormalised), a second-order delta method above.
    """
    out = np.empty(mean.shape)
    big = mean > _EXACT_MAX_MEAN
    m, a = mean[big], scale[big]
    if rest is None:
        out[big] = np.log1p(a * m) - a**2 * (m + phi[big] * m**2) / (2.0 * (1.0 + a * m) ** 2)
    else:
        total = m + rest[big]
        u = a * m / total
        du = a * rest[big] / total**2
        d2u = -2.0 * du / total
        out[big] = (np.log1p(u) + (d2u / (1.0 + u) - (du / (1.0 + u)) ** 2) * (m + phi[big] * m**2) / 2.0
                    + _rest_curvature(u, total) * rest_var[big] / 2.0)
    exact = np.flatnonzero(~big)
    exact = exact[np.argsort(mean[exact], kind="stable")]
    for lo in range(0, exact.size, 2048):
        idx = exact[lo: lo + 2048]
        m_hi, phi_hi = mean[idx[-1]], phi[idx].max()
        k = np.arange(min(1024, int(np.ceil(m_hi + 12.0 * np.sqrt(m_hi + phi_hi * m_hi**2) + 8))), dtype=float)
        r = 1.0 / phi[idx, None]
        m = mean[idx, None]
        # pmf(k) / pmf(0) by the recurrence pmf(k) = pmf(k - 1) (k - 1 + r) / k * m / (r + m): no gammaln
        pmf = np.empty((idx.size, k.size))
        pmf[:, 0] = 1.0
        np.cumprod((k[1:] - 1.0 + r) / k[1:] * (m / (r + m)), axis=1, out=pmf[:, 1:])
        if rest is None:
            value = np.log1p(scale[idx, None] * k)
        else:
            total = k + rest[idx, None]
            u = scale[idx, None] * k / total
            value = np.log1p(u) + _rest_curvature(u, total) * rest_var[idx, None] / 2.0
        out[idx] = (pmf * value).sum(1) / pmf.sum(1)
    return out


def _rest_curvature(u: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``d^2/dR^2 log1p(u)`` for ``u = c X / (X + R)`` at ``total = X + R``: the second-order term of the rest."""
    return u * (2.0 + u) / (total * (1.0 + u)) ** 2


def _expected_log_norm(z: np.ndarray, responder: float, pi: np.ndarray, phi: np.ndarray,
                       batch_shift: np.ndarray, p: SimParams, target_sum: float,
                       fluct: tuple[np.ndarray, _Fluctuation] | None = None) -> np.ndarray:
    """Noise-free mean log-normalised expression per condition.

    Parameters
    ----------
    z
        ``(C, G)`` latent log fold changes of responding cells (row 0 = control, all zero).
    responder
        Probability that a perturbed cell responds.
    pi, phi
        ``(G,)`` baseline expression share and NB dispersion.
    batch_shift
        ``(B, G)`` log shifts of the batches (equally likely).
    target_sum
        The ``normalize_total`` target used for ``X``.
    fluct
        ``None`` without cell-to-cell fluctuations, else the ``(C, G)`` mask of each condition's clamped
        targets in its responding cells (row 0 = control, which non-responders share; clamped targets do not
        fluctuate) and the fluctuation model.

    Returns
    -------
    numpy.ndarray
        ``(C, G)`` ``E[log1p(target_sum * count / total)]`` over NB noise, library size, batch, the
        cell-to-cell fluctuation (5 x 5 Gauss-Hermite nodes over each gene's ``dx`` and the library
        size) and the non-responder mixture; with programs, also over the cell's program activities
        (Gauss-Hermite, 3 nodes per program; 3 x 3 over the rest of ``dx`` and the library size at each),
        given which the rest of ``dx`` is Gaussian as without them.
        Without fluctuations the cell total is replaced by its expectation; with them the gene's own count
        stays in the total and the rest of the total enters to second order in its fluctuation (NB noise and
        the correlated ``dx`` of the other genes given the program activities).
    """
    nodes, weights = hermegauss(_LIBRARY_NODES)
    weights = weights / weights.sum()
    libs = p.library_median * np.exp(p.library_log_sd * nodes)
    n_cond, n_genes = z.shape

    def state_mean(zz: np.ndarray) -> np.ndarray:
        acc = np.zeros(zz.shape)
        for shift in batch_shift:
            rel = pi * np.exp(zz + shift)
            totals = rel.sum(1, keepdims=True)
            for lib, wt in zip(libs, weights, strict=True):
                scale = np.broadcast_to(target_sum / (lib * totals), zz.shape)
                phis = np.broadcast_to(phi, zz.shape)
                acc += wt * _nb_expected_log1p((lib * rel).ravel(), phis.ravel(),
                                               scale.ravel()).reshape(zz.shape)
        return acc / len(batch_shift)

    def fluctuating_mean(zz: np.ndarray, var: np.ndarray, cov: np.ndarray, shift: np.ndarray,
                         free_mask: np.ndarray, n_nodes: tuple[int, int]) -> np.ndarray:
        f_nodes, f_weights = hermegauss(n_nodes[0])
        f_weights = f_weights / f_weights.sum()
        s = p.max_log_fc
        # (K, C, G) log fold-change moves at the nodes of dx ~ N(shift, var) (clamped targets: var 0, shift 0)
        moves = s * np.tanh((shift + np.sqrt(var)[None] * f_nodes[:, None, None]) / s)
        growth = np.tensordot(f_weights, np.exp(moves), axes=1)
        growth2 = np.tensordot(f_weights, np.exp(2.0 * moves), axes=1)
        lib_nodes, lib_weights = hermegauss(n_nodes[1])
        lib_weights = lib_weights / lib_weights.sum()
        f_libs = p.library_median * np.exp(p.library_log_sd * lib_nodes)
        excess = np.expm1(cov)
        np.fill_diagonal(excess, 0.0)
        phis = np.broadcast_to(phi, zz.shape).ravel()
        target = np.full(phis.shape, target_sum)
        acc = np.zeros(zz.shape)
        for shift in batch_shift:
            base = pi * np.exp(zz + shift)
            expected = base * growth
            # Per unit library size: the rest's expected count, and its variance as Poisson (linear in
            # the library) and NB-plus-fluctuation (quadratic) parts; the lognormal moments of
            # correlated genes use dx's covariance (clamped targets do not fluctuate).
            others = expected.sum(1, keepdims=True) - expected
            own_sq = base**2 * (growth2 * (1.0 + phi) - growth**2)
            free = expected * free_mask
            cross = free @ excess
            quad = own_sq.sum(1, keepdims=True) - own_sq + (free * cross).sum(1, keepdims=True) - 2.0 * free * cross
            for lib, wt in zip(f_libs, lib_weights, strict=True):
                rest = (lib * others).ravel()
                rest_var = (lib * others + lib**2 * quad).ravel()
                for move, f_wt in zip(moves, f_weights, strict=True):
                    mean = (lib * pi * np.exp(zz + move + shift)).ravel()
                    acc += wt * f_wt * _nb_expected_log1p(mean, phis, target, rest, rest_var).reshape(zz.shape)
        return acc / len(batch_shift)

    if fluct is None:
        ctrl = state_mean(np.zeros((1, n_genes)))
        resp = state_mean(z[1:])
    else:
        clamped, model = fluct
        var = np.where(clamped, 0.0, model.residual_var)
        n_programs = model.directions.shape[1]
        inner = (_FLUCTUATION_NODES, _FLUCTUATION_LIBRARY_NODES) if n_programs == 0 else _PROGRAM_INNER_NODES
        ctrl = resp = 0.0
        for activity, a_wt in zip(*_activity_nodes(n_programs), strict=True):
            shift = np.where(clamped, 0.0, model.directions @ activity)  # one node (0, weight 1) without programs
            ctrl = ctrl + a_wt * fluctuating_mean(np.zeros((1, n_genes)), var[:1], model.residual_cov, shift[:1],
                                                  ~clamped[:1], inner)
            resp = resp + a_wt * fluctuating_mean(z[1:], var[1:], model.residual_cov, shift[1:], ~clamped[1:], inner)
    return np.vstack([ctrl, responder * resp + (1.0 - responder) * ctrl])


def _activity_nodes(n_programs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, K)`` nodes and ``(Q,)`` weights of the Gauss-Hermite product rule over ``K`` standard normal
    program activities (:data:`_PROGRAM_NODES` per program; ``K = 0``: one node of weight 1)."""
    nodes, weights = hermegauss(_PROGRAM_NODES)
    grid = np.array(list(itertools.product(nodes, repeat=n_programs)), dtype=float)
    grid_weights = np.array([np.prod(w) for w in itertools.product(weights / weights.sum(), repeat=n_programs)])
    return grid.reshape(grid_weights.size, n_programs), grid_weights


def _draw_counts(z: np.ndarray, cell_cond: np.ndarray, responds: np.ndarray, batch: np.ndarray,
                 lib: np.ndarray, pi: np.ndarray, phi: np.ndarray, batch_shift: np.ndarray,
                 rng: np.random.Generator,
                 fluct: tuple[_Fluctuation, np.ndarray, np.random.Generator] | None = None) -> sp.csr_matrix:
    """``(N, G)`` float32 CSR of NB (Gamma-Poisson) UMI counts, drawn in chunks of cells.

    ``fluct``, when given, is the fluctuation model, the ``(C, G)`` mask of each condition's clamped
    targets (they keep their clamp in responding cells) and the generator of the fluctuations.
    """
    blocks = []
    shape = 1.0 / phi
    for lo in range(0, cell_cond.size, _CELL_CHUNK):
        sl = slice(lo, lo + _CELL_CHUNK)
        log_fc = z[cell_cond[sl]] * responds[sl, None] + batch_shift[batch[sl]]
        if fluct is not None:
            model, clamped, r_fluct = fluct
            log_fc += model.draw(log_fc.shape[0], r_fluct) * ~(clamped[cell_cond[sl]] & responds[sl, None])
        mean = lib[sl, None] * pi * np.exp(log_fc)
        counts = rng.poisson(rng.gamma(shape, mean / shape))
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
    return sp.vstack(blocks, format="csr")


# --------------------------------------------------------------------------- public API


def _resolve(preset: str, overrides: Mapping[str, object]) -> SimParams:
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(SimParams)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown simulator parameter(s); valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def simulate(preset: str = "demo", seed: int = 0, *, vocabulary: Sequence[str] | None = None,
             **overrides: object) -> ad.AnnData:
    """Simulate a Perturb-seq screen and return it prepared for training.

    Parameters
    ----------
    preset
        A key of :data:`PRESETS`.
    seed
        Seed of every random draw; the same preset, seed and overrides give an identical matrix.
    vocabulary
        Gene vocabulary of the output (e.g. an FM's 19,264 genes): the simulated counts are prepared
        against it as ``pertadapt data prepare --vocab`` does (the vocabulary's other genes zero-filled and
        flagged ``var['measured'] = False``; the simulation is the same). ``None``: the simulated genes.
    **overrides
        :class:`SimParams` fields replacing the preset's values.

    Returns
    -------
    anndata.AnnData
        ``(N cells, G genes)`` in the layout of :func:`pertadapt.data.prepare.prepare_adata` (raw
        counts in ``layers['counts']``, log1p-normalised sparse ``X``, GEARS ``obs``/``uns`` keys),
        plus ``obs['batch']``, ``obs['responder']`` and the ground truth in ``uns['sim']``.

    Raises
    ------
    ValueError
        Unknown preset or parameter, or impossible parameter values (the message names the
        parameter).
    """
    p = _resolve(preset, overrides)
    t0 = time.perf_counter()
    # the fluctuations and the programs have streams of their own: the other six draw the same values whatever
    # cell_noise_sd and program_sd are
    r_genes, r_net, r_pert, r_gi, r_expr, r_cells, r_fluct, r_prog = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8))
    ann = load_annotations("bundled")
    genes = _choose_genes(ann.gene2terms, p, r_genes)
    n = len(genes)
    src, dst, weight = _sample_network(sp.csr_matrix(jaccard_matrix(ann, genes)), p, r_net)
    w = sp.csr_matrix((weight, (src, dst)), shape=(n, n))

    regulators = np.flatnonzero(np.bincount(src, minlength=n) > 0)
    others = np.setdiff1d(np.arange(n), regulators)
    k = min(p.n_singles, regulators.size)
    targets = np.sort(np.concatenate([r_pert.choice(regulators, size=k, replace=False),
                                      r_pert.choice(others, size=p.n_singles - k, replace=False)]))
    if p.modality == "crispri":
        clamp = np.log1p(-r_pert.uniform(*p.kd_efficiency, size=targets.size))
    else:
        clamp = r_pert.uniform(*p.activation_log_fc, size=targets.size)
    iu, ju = np.triu_indices(p.n_singles, 1)
    pick = np.sort(r_pert.choice(iu.size, size=p.n_doubles, replace=False))
    pairs = np.stack([iu[pick], ju[pick]], axis=1)

    clamp_idx = np.full((p.n_singles + p.n_doubles, 2), -1)
    clamp_val = np.zeros(clamp_idx.shape)
    clamp_idx[: p.n_singles, 0] = targets
    clamp_val[: p.n_singles, 0] = clamp
    clamp_idx[p.n_singles:] = targets[pairs]
    clamp_val[p.n_singles:] = clamp[pairs]
    z_pert = _steady_state(w, clamp_idx, clamp_val, p.max_log_fc)
    z_single = z_pert[: p.n_singles]
    gi = _assign_gi(p.n_doubles, p.gi_mix, r_gi)
    z_double, gi_param, dominant = _apply_gi(z_pert[p.n_singles:], z_single[pairs], targets[pairs], gi, w, p, r_gi)
    z = np.vstack([np.zeros((1, n)), z_single, z_double])
    gene_arr = np.asarray(genes, dtype=object)
    doubles = [SEP.join(sorted(pair)) for pair in gene_arr[targets[pairs]].tolist()]
    conditions = [CONTROL, *(f"{g}{SEP}{CONTROL}" for g in gene_arr[targets]), *doubles]

    gene_mean = p.gene_mean_median * 10.0 ** r_expr.normal(0.0, p.gene_mean_log10_sd, n)
    pi = gene_mean / p.library_median
    phi = p.dispersion_asymptote * (1.0 + gene_mean**-0.5) * np.exp(r_expr.normal(0.0, 0.25, n))
    batch_shift = r_expr.normal(0.0, p.batch_sd, (p.n_batches, n))

    sizes = np.array([p.n_control] + [p.cells_per_condition] * (len(conditions) - 1))
    cell_cond = np.repeat(np.arange(len(conditions)), sizes)
    responds = (r_cells.random(cell_cond.size) >= p.nonresponder_frac) & (cell_cond > 0)
    batch = r_cells.integers(p.n_batches, size=cell_cond.size)
    lib = p.library_median * np.exp(r_cells.normal(0.0, p.library_log_sd, cell_cond.size))
    fluct, fluct_truth = None, None
    if p.cell_noise_sd > 0 or p.program_sd > 0:
        programs = (_program_loadings(n, p, r_prog), r_prog) if p.program_sd > 0 else None
        model = _Fluctuation(w, p.cell_noise_sd, p.max_log_fc, programs)
        clamped = np.zeros(z.shape, dtype=bool)
        rows, slots = np.nonzero(clamp_idx >= 0)
        clamped[rows + 1, clamp_idx[rows, slots]] = True
        fluct = (model, clamped, r_fluct)
        fluct_truth = (clamped, model)
    counts = _draw_counts(z, cell_cond, responds, batch, lib, pi, phi, batch_shift, r_cells, fluct)

    obs = pd.DataFrame({
        CONDITION: pd.Categorical(np.asarray(conditions)[cell_cond], categories=conditions),
        CELL_TYPE: p.cell_type,
        "batch": pd.Categorical([f"batch{b}" for b in batch]),
        "responder": responds,
    }, index=[f"cell{i:07d}" for i in range(cell_cond.size)])
    raw = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame({GENE_NAME: genes}, index=genes))
    totals = np.asarray(counts.sum(1)).ravel()
    target_sum = float(np.median(totals[counts.getnnz(axis=1) > 0]))
    adata = prepare_adata(raw, vocabulary=vocabulary, min_genes=1, target_sum=target_sum,
                          cell_type_default=p.cell_type)

    true_mean = _expected_log_norm(z, 1.0 - p.nonresponder_frac, pi, phi, batch_shift, p, target_sum, fluct_truth)
    params = {k: v for k, v in dataclasses.asdict(p).items()
              if not (k in _OFF_AT_ZERO and getattr(p, _OFF_AT_ZERO[k]) == 0)}
    adata.uns[SIM_KEY] = {
        "seed": int(seed),
        "preset": preset,
        "params": json.dumps(params, sort_keys=True),
        "genes": gene_arr,
        "edge_src": src,
        "edge_dst": dst,
        "edge_weight": weight,
        "conditions": np.asarray(conditions, dtype=object),
        "latent_log_fc": z,
        "true_mean": true_mean,
        "true_shift": true_mean - true_mean[0],
        "targets": gene_arr[targets],
        "target_log_fc": clamp,
        "doubles": np.asarray(doubles, dtype=object),
        "gi_type": np.asarray([GI_TYPES[t] for t in gi], dtype=object),
        "gi_param": gi_param,
        "gi_dominant": np.asarray([gene_arr[targets[pairs[d, s]]] if s >= 0 else ""
                                   for d, s in enumerate(dominant)], dtype=object),
        "gene_mean": gene_mean,
        "dispersion": phi,
        "batch_shift": batch_shift,
        "target_sum": target_sum,
    }
    log.info("simulated preset %r (seed %d): %d cells x %d genes, %d singles, %d doubles, %d edges in %.1f s",
             preset, seed, adata.n_obs, adata.n_vars, p.n_singles, p.n_doubles, src.size,
             time.perf_counter() - t0)
    return adata


@dataclass(frozen=True)
class SimTruth:
    """The simulator's noise-free truth, aligned to a dataset's genes.

    Attributes
    ----------
    conditions
        Simulated condition names (``ctrl`` first).
    true_mean
        ``(n_conditions, N)`` expected log-normalised expression per condition, columns in ``var_names``
        order.
    """

    conditions: tuple[str, ...]
    true_mean: np.ndarray

    def mean_of(self, condition: str) -> np.ndarray:
        """``(N,)`` true mean of one condition; unknown conditions are a ``ValueError``."""
        try:
            return self.true_mean[self.conditions.index(condition)]
        except ValueError:
            raise ValueError(f"{condition!r} is not a simulated condition") from None


def sim_truth(adata: ad.AnnData, genes: Sequence[str] | None = None) -> SimTruth | None:
    """The truth stored in ``uns['sim']`` of a simulated AnnData, or ``None`` for real data.

    ``genes``: the columns of the truth (default ``var_names``); each must be a simulated gene (a file
    prepared with ``--vocab`` has zero-filled genes that were not simulated: pass its measured genes).
    """
    if SIM_KEY not in adata.uns:
        return None
    sim = adata.uns[SIM_KEY]
    wanted = list(map(str, adata.var_names if genes is None else genes))
    order = pd.Index([str(g) for g in sim["genes"]]).get_indexer(wanted)
    if (order < 0).any():
        raise ValueError(f"adata: gene {wanted[int(np.flatnonzero(order < 0)[0])]!r} was not simulated (the truth "
                         "covers the simulated genes only)")
    return SimTruth(tuple(str(c) for c in sim["conditions"]), np.asarray(sim["true_mean"], dtype=np.float64)[:, order])


def read_sim_truth(path: str | Path, genes: Sequence[str] | None = None) -> SimTruth | None:
    """:func:`sim_truth` of a data file (over ``genes``), opened in backed mode (``X`` is not loaded)."""
    adata = read_h5ad(path, backed=True)
    try:
        return sim_truth(adata, genes)
    finally:
        adata.file.close()
