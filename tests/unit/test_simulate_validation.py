"""The simulator's data behave as designed: network and GO structure in the DE genes, 10x-like noise,
and genetic-interaction signatures (real simulations on small parameter sets, no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order

from pertadapt.data.keys import CONDITION, CONTROL, COUNTS_LAYER
from pertadapt.data.simulate import SIM_KEY, simulate
from pertadapt.go.annotations import load_annotations
from pertadapt.go.similarity import jaccard_matrix

SINGLES = {"n_genes": 150, "n_singles": 40, "n_doubles": 0, "cells_per_condition": 60, "n_control": 300}
#: Welch |t| above which a gene counts as DE (about Bonferroni 0.05 over 150 genes x 40 tests is 4.4).
T_DE = 5.0


def _welch_de(adata) -> dict[str, np.ndarray]:
    """Target -> (G,) boolean DE mask against control (target itself excluded)."""
    x = adata.X.toarray()
    labels = adata.obs[CONDITION].astype(str).to_numpy()
    ctrl = x[labels == CONTROL]
    m0, v0 = ctrl.mean(0), ctrl.var(0, ddof=1) / len(ctrl)
    genes = list(adata.var_names)
    out = {}
    for target in adata.uns[SIM_KEY]["targets"]:
        cells = x[labels == f"{target}+{CONTROL}"]
        t = (cells.mean(0) - m0) / np.sqrt(cells.var(0, ddof=1) / len(cells) + v0 + 1e-12)
        de = np.abs(t) > T_DE
        de[genes.index(target)] = False
        out[str(target)] = de
    return out


def _enrichment(adata, sets: dict[str, np.ndarray]) -> tuple[float, int]:
    """Pooled P(in set | DE) / P(in set | any non-target gene), and the number of DE genes."""
    genes = list(adata.var_names)
    hit = total = bg = bg_n = 0
    for target, de in _welch_de(adata).items():
        member = sets[target].copy()
        others = np.ones(len(genes), dtype=bool)
        others[genes.index(target)] = False
        member &= others
        hit += member[de].sum()
        total += de.sum()
        bg += member.sum()
        bg_n += others.sum()
    return (hit / total) / (bg / bg_n), int(total)


@pytest.fixture(scope="module")
def go_runs():
    # the network's footprint in the DE genes, without the programs' shared cell states (whose mean over a
    # condition's few cells moves whole gene sets at random)
    return {s: simulate("demo", seed=7, go_signal=s, program_sd=0.0, **SINGLES) for s in (0.0, 1.0)}


def test_de_genes_are_network_descendants(go_runs):
    for adata in go_runs.values():
        sim = adata.uns[SIM_KEY]
        n = adata.n_vars
        w = sp.csr_matrix((np.ones(sim["edge_src"].size), (sim["edge_src"], sim["edge_dst"])), shape=(n, n))
        genes = list(adata.var_names)
        desc = {}
        for target in sim["targets"]:
            mask = np.zeros(n, dtype=bool)
            mask[breadth_first_order(w, genes.index(target), directed=True, return_predecessors=False)] = True
            desc[str(target)] = mask
        ratio, n_de = _enrichment(adata, desc)
        assert n_de >= 20
        assert ratio > 2.0, ratio


def test_go_neighbours_enriched_only_with_go_signal(go_runs):
    ann = load_annotations("bundled")
    ratios = {}
    for signal, adata in go_runs.items():
        genes = list(adata.var_names)
        neighbours = (jaccard_matrix(ann, genes) > 0.1).toarray()
        sets = {str(t): neighbours[genes.index(t)] for t in adata.uns[SIM_KEY]["targets"]}
        ratios[signal] = _enrichment(adata, sets)[0]
    assert ratios[1.0] > 3.0, ratios
    assert 0.3 < ratios[0.0] < 1.8, ratios
    assert ratios[1.0] > 2 * ratios[0.0]


def test_counts_look_like_10x_umis():
    # the count model within one cell state: with the programs a gene's counts are a mixture over the cells' states
    # (not NB: mean |zero fraction - NB's| 0.025 here)
    adata = simulate("demo", seed=3, n_genes=200, n_singles=2, n_doubles=0, cells_per_condition=10, n_control=1500,
                     program_sd=0.0)
    ctrl = adata.obs[CONDITION].astype(str).to_numpy() == CONTROL
    counts = adata.layers[COUNTS_LAYER][ctrl].toarray()
    sim = adata.uns[SIM_KEY]
    # Zero fraction of an expressed-gene panel: 0.5-0.95 (a whole 10x transcriptome: 0.9-0.95).
    zero = (counts == 0).mean()
    assert 0.5 < zero < 0.95, zero
    # No zero inflation (Svensson 2020): per-gene zeros match the NB with the fitted moments.
    mean, var = counts.mean(0), counts.var(0, ddof=1)
    phi = np.clip((var - mean) / np.maximum(mean, 1e-12) ** 2, 1e-6, None)
    nb_zero = (1 + phi * mean) ** (-1 / phi)
    assert np.abs((counts == 0).mean(0) - nb_zero).mean() < 0.02
    # Poisson-like at low mean, over-dispersed at high mean; log-log slope between 1 and 2.
    low, high = mean < 0.1, mean > 2
    assert low.sum() >= 5
    assert high.sum() >= 5
    assert 0.8 < np.median(var[low] / mean[low]) < 1.5
    assert np.mean(var[high] / mean[high] > 1.2) > 0.9
    ok = mean > 0.02
    slope = np.polyfit(np.log(mean[ok]), np.log(var[ok]), 1)[0]
    assert 1.0 < slope < 2.0, slope
    # Log-normal library sizes with a 10x-like spread (log-sd 0.3-0.5 plus sampling noise).
    log_total = np.log(counts.sum(1))
    assert 0.25 < log_total.std() < 0.6
    assert sim["true_mean"].shape[0] == 3


def test_gi_types_show_their_signature():
    adata = simulate("demo", seed=5, n_genes=150, n_singles=14, n_doubles=40, cells_per_condition=2,
                     n_control=20, nonresponder_frac=0.0)
    sim = adata.uns[SIM_KEY]
    conds = [str(c) for c in sim["conditions"]]
    genes = [str(g) for g in sim["genes"]]
    z = sim["latent_log_fc"]
    seen = set()
    for name, kind, dom in zip(sim["doubles"], sim["gi_type"], sim["gi_dominant"], strict=True):
        a, b = name.split("+")
        za, zb, zab = z[conds.index(f"{a}+ctrl")], z[conds.index(f"{b}+ctrl")], z[conds.index(name)]
        down = np.ones(len(genes), dtype=bool)
        down[[genes.index(a), genes.index(b)]] = False
        if np.linalg.norm((za + zb)[down]) < 0.1:
            continue
        additive, double = (za + zb)[down], zab[down]
        ratio = np.linalg.norm(double) / np.linalg.norm(additive)
        resid = np.abs(double - additive).max()
        seen.add(str(kind))
        if kind == "synergy":
            assert ratio > 1.2, (name, ratio)
        elif kind == "buffering":
            assert ratio < 0.8, (name, ratio)
        elif kind == "epistasis":
            zdom = (za if dom == a else zb)[down]
            assert np.linalg.norm(double - zdom) < np.linalg.norm(double - additive), name
        elif kind == "neomorphic":
            assert resid > 0.7, (name, resid)
        else:
            assert 0.7 < ratio < 1.15, (name, ratio)
            assert resid < 0.7, (name, resid)
    assert seen == {"additive", "synergy", "buffering", "epistasis", "neomorphic"}
    # The signature survives into the noise-free log-normalised truth: synergy moves more genes.
    shift = sim["true_shift"]
    syn = [conds.index(d) for d, k in zip(sim["doubles"], sim["gi_type"], strict=True) if k == "synergy"]
    buf = [conds.index(d) for d, k in zip(sim["doubles"], sim["gi_type"], strict=True) if k == "buffering"]
    assert np.abs(shift[syn]).sum(1).mean() > np.abs(shift[buf]).sum(1).mean()
