"""Cells that carry the network: ``cell_noise_sd`` (intrinsic fluctuations propagated through the
regulatory network) and ``program_sd`` (shared cell programs), their off switches and the truth under them
(real simulations, no mocks)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import RidgeCV

from pertadapt.data.io import write_h5ad_atomic
from pertadapt.data.keys import CONDITION, CONTROL
from pertadapt.data.simulate import PRESETS, SIM_KEY, simulate
from pertadapt.files import sha256_file

#: sha256 of ``simulate("demo", seed=0)`` written by ``write_h5ad_atomic`` before ``cell_noise_sd``
#: existed (commit b128f31, anndata 0.12.19, h5py 3.16.0): the file depends on their writers too.
DEMO_BEFORE_CELL_NOISE = "d20f3bafaceb669afa7cd20ae047ea72140c46fe1b090da927b910db286810e1"
#: sha256 of ``simulate("demo", seed=0)`` (then ``cell_noise_sd`` 0.5, no programs) written the same way before
#: ``program_sd`` existed (commit 6eb0752, same versions).
DEMO_BEFORE_PROGRAMS = "890081c915415c8d62860660ff7e0a01c612b0200e2c822f6a94b10e6add72f7"


def _edge_coexpression_auroc(adata) -> float:
    """AUROC of control cells' |Pearson r| for gene pairs joined by a true edge against unjoined pairs."""
    sim = adata.uns[SIM_KEY]
    genes = list(adata.var_names)
    order = [genes.index(str(g)) for g in sim["genes"]]
    ctrl = adata.obs[CONDITION].astype(str).to_numpy() == CONTROL
    x = adata.X[ctrl].toarray()[:, order]
    idx = np.flatnonzero(x.std(0) > 0)
    r = np.abs(np.corrcoef(x[:, idx], rowvar=False))
    edges = {(min(a, b), max(a, b)) for a, b in zip(sim["edge_src"], sim["edge_dst"], strict=True)}
    iu, ju = np.triu_indices(idx.size, 1)
    joined = np.array([(idx[i], idx[j]) in edges for i, j in zip(iu, ju, strict=True)])
    ranks = rankdata(r[iu, ju])
    n_pos, n_neg = joined.sum(), (~joined).sum()
    return float((ranks[joined].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_zero_strength_reproduces_the_file_from_before(tmp_path):
    adata = simulate("demo", seed=0, cell_noise_sd=0.0, program_sd=0.0)
    # var['measured'] (model.gene_space) came after the pin: every simulated gene is measured; without the
    # column the file is the one from before, byte for byte
    assert adata.var["measured"].all()
    del adata.var["measured"]
    write_h5ad_atomic(adata, tmp_path / "demo.h5ad")
    assert sha256_file(tmp_path / "demo.h5ad") == DEMO_BEFORE_CELL_NOISE


def test_programs_off_reproduce_the_file_from_before_programs(tmp_path):
    assert PRESETS["demo"].program_sd > 0
    write_h5ad_atomic(simulate("demo", seed=0, program_sd=0.0), tmp_path / "demo.h5ad")
    assert sha256_file(tmp_path / "demo.h5ad") == DEMO_BEFORE_PROGRAMS


def test_n_programs_sets_the_shared_axes_and_program_frac_the_genes_they_move():
    # programs only (no intrinsic fluctuation), 2,000 control cells: the correlation matrix of the genes has one
    # eigenvalue far above the rest per program (measured 20.1 | 2.3 for one; 22.3, 17.8, 13.1 | 2.9 for three)
    for k in (1, 3):
        adata = simulate("demo", seed=0, n_control=2000, n_singles=2, n_doubles=0, cells_per_condition=5,
                         cell_noise_sd=0.0, program_sd=1.0, n_programs=k)
        x = adata.X[adata.obs[CONDITION].astype(str).to_numpy() == CONTROL].toarray()
        eig = np.linalg.eigvalsh(np.corrcoef(x[:, x.std(0) > 0], rowvar=False))
        assert (eig > 5.0).sum() == k, np.sort(eig)[::-1][:5]
    # programs on no gene move nothing: the counts of programs off
    none = simulate("demo", seed=0, program_frac=0.0).layers["counts"]
    assert (none != simulate("demo", seed=0, program_sd=0.0).layers["counts"]).nnz == 0
    assert (simulate("demo", seed=0).layers["counts"] != none).nnz > 0


def _masked_value_ratio(adata) -> float:
    """Held-out squared error of the best linear predictor of each gene from all the others (ridge, penalty by
    cross-validation, plus log depth) over that of the per-gene mean, on the control cells (80 held out)."""
    ctrl = adata[adata.obs[CONDITION].astype(str).to_numpy() == CONTROL]
    x = ctrl.X.toarray()
    depth = np.log(np.asarray(ctrl.layers["counts"].sum(1)).ravel())
    train, test = np.arange(80, x.shape[0]), np.arange(80)
    err = base = 0.0
    for g in range(x.shape[1]):
        others = np.c_[np.delete(x, g, 1), depth]
        fit = RidgeCV(alphas=np.logspace(0, 4, 5)).fit(others[train], x[train, g])
        err += ((fit.predict(others[test]) - x[test, g]) ** 2).sum()
        base += ((x[train, g].mean() - x[test, g]) ** 2).sum()
    return float(err / base)


def test_programs_make_a_masked_value_predictable_from_the_other_genes():
    # demo preset, 400 control cells: 0.834 with the programs (program_sd 0.75), 0.988 without (network only)
    assert _masked_value_ratio(simulate("demo", seed=0)) < 0.87
    assert _masked_value_ratio(simulate("demo", seed=0, program_sd=0.0)) > 0.96


def test_control_coexpression_reveals_the_edges_at_the_default_only():
    # demo preset: 271 edges, 400 control cells; measured AUROC 0.51 at 0, 0.65 at 0.5, 0.76 at 0.75, and 0.62 at
    # the default (0.5 with the programs, which join genes that share no edge too)
    assert PRESETS["demo"].cell_noise_sd > 0
    assert PRESETS["benchmark"].cell_noise_sd > 0
    off = _edge_coexpression_auroc(simulate("demo", seed=0, cell_noise_sd=0.0, program_sd=0.0))
    default = _edge_coexpression_auroc(simulate("demo", seed=0))
    assert abs(off - 0.5) < 0.05, off
    assert default > 0.6, default


def _large_draws(**overrides: float) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(condition, ``(20,000, 80)`` log1p values of its cells in the truth's gene order, its ``true_mean``) of
    a demo-like screen of 80 genes, 2 singles and 1 double with 20,000 cells per condition."""
    adata = simulate("demo", seed=4, n_genes=80, n_singles=2, n_doubles=1, cells_per_condition=20_000,
                     n_control=20_000, **overrides)
    sim = adata.uns[SIM_KEY]
    genes = list(adata.var_names)
    x = adata.X.toarray()[:, [genes.index(str(g)) for g in sim["genes"]]]
    labels = adata.obs[CONDITION].astype(str).to_numpy()
    for i, cond in enumerate(sim["conditions"]):
        yield cond, x[labels == cond], sim["true_mean"][i]


def test_true_mean_is_the_mean_of_a_large_draw():
    """Each gene's mean over 20,000 cells of a condition lies within its standard error of ``true_mean``."""
    for cond, cells, truth in _large_draws(cell_noise_sd=0.5, program_sd=0.0):
        se = cells.std(0, ddof=1) / np.sqrt(len(cells))
        z = (cells.mean(0) - truth)[se > 0] / se[se > 0]
        # z ~ N(0, 1) per gene when the truth is exact: mean z^2 about 1 +- 0.16 over 80 genes,
        # mean z about 0 (the old truth, cell total at its expectation, gives 1.9-3.0 and 0.9-1.3 here)
        assert np.mean(z**2) < 1.5, (cond, np.mean(z**2))
        assert abs(z.mean()) < 0.5, (cond, z.mean())
        assert np.abs(z).max() < 5.0, (cond, np.abs(z).max())


def test_true_mean_with_programs_is_the_mean_of_a_large_draw():
    """With the demo's programs, the genes' means over 20,000 cells of a condition agree with ``true_mean``.

    The genes' sampling errors are correlated now (the cells' mean program activity moves whole gene sets), so
    the test is the joint one: the Mahalanobis distance of the error vector, ``e^T (S / n)^-1 e``, over the
    number of genes is about 1 for an exact truth; measured 1.3-2.5 over seeds 4 and 5 (mean per-gene error
    -0.1 to -0.7 standard errors, about 0.002 in log1p units: the second-order treatment of the cell total;
    the largest gene's error 2.8-4.1 standard errors), 15-45 without the integral over the program activities.
    """
    for cond, cells, truth in _large_draws():
        keep = cells.std(0) > 0
        err = cells.mean(0)[keep] - truth[keep]
        cov = np.cov(cells[:, keep], rowvar=False) / len(cells)
        assert err @ np.linalg.solve(cov, err) / keep.sum() < 3.5, cond
        assert np.abs(err / np.sqrt(np.diag(cov))).max() < 5.0, cond  # measured at most 4.1 standard errors


def test_clamped_targets_do_not_fluctuate():
    adata = simulate("demo", seed=2, n_genes=80, n_singles=4, n_doubles=0, cells_per_condition=200,
                     n_control=200, nonresponder_frac=0.0, cell_noise_sd=0.75)
    sim = adata.uns[SIM_KEY]
    labels = adata.obs[CONDITION].astype(str).to_numpy()
    counts = adata.layers["counts"].toarray()
    for target in sim["targets"]:
        j = list(adata.var_names).index(str(target))
        pert = labels == f"{target}+{CONTROL}"
        # a clamped gene varies by NB and library-size noise only (CV^2 = 1/mean + phi + ~0.13); its
        # own fluctuation (variance >= 0.75^2 in log space) would add CV^2 >= 0.75
        cv_pert = counts[pert, j].std() / counts[pert, j].mean()
        assert cv_pert < np.sqrt(1.0 / counts[pert, j].mean() + sim["dispersion"][j]) * 1.3, target

