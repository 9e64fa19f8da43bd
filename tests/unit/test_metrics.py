"""GEARS-semantics metrics on hand-computed tiny cases (3 genes, 2 perturbations)."""

from __future__ import annotations

import math

import dcor
import numpy as np
import pytest

from pertadapt.eval import compute_metrics, gi_metrics, gi_params, pearson0, top_variable_genes

CTRL = np.array([1.0, 1.0, 1.0])
# A+ctrl: deltas pred (0.5, 0, -0.5) vs truth (1, 0, -1); B+ctrl: no-change prediction vs truth (0, 2, 0)
PRED = {"A+ctrl": np.array([1.5, 1.0, 0.5]), "B+ctrl": np.array([1.0, 1.0, 1.0])}
TRUTH = {"A+ctrl": np.array([2.0, 1.0, 0.0]), "B+ctrl": np.array([1.0, 3.0, 1.0]), "ctrl": CTRL}
DE = {"A+ctrl": np.array([2, 0, 1]), "B+ctrl": np.array([1, 2, 0])}


@pytest.fixture
def metrics():
    return compute_metrics(PRED, TRUTH, CTRL, DE, subgroups={"g1": ["A+ctrl"], "g2": ["A+ctrl", "B+ctrl"]})


def test_per_perturbation_hand_computed(metrics):
    a, b = metrics.per_perturbation["A+ctrl"], metrics.per_perturbation["B+ctrl"]
    assert a["mse"] == pytest.approx(0.5 / 3)  # (0.25 + 0 + 0.25) / 3
    assert a["mae"] == pytest.approx(1 / 3)
    assert a["pearson"] == pytest.approx(1.0)
    assert a["pearson_delta"] == pytest.approx(1.0)
    assert a["mse_de"] == pytest.approx(0.5 / 3)  # the 3 genes are the whole (<20) DE list
    assert a["frac_correct_direction_all"] == pytest.approx(1.0)
    # GEARS divides by n even when fewer genes exist: 3 / 20, 3 / 50, ...
    assert a["frac_correct_direction_20"] == pytest.approx(0.15)
    assert a["frac_correct_direction_200"] == pytest.approx(0.015)
    assert b["mse"] == pytest.approx(4 / 3)
    assert b["mae"] == pytest.approx(2 / 3)
    assert b["frac_correct_direction_all"] == pytest.approx(2 / 3)  # sign 0 == 0 on genes 0 and 2
    assert b["frac_correct_direction_20"] == pytest.approx(0.1)
    assert a["de_overlap_20"] == pytest.approx(3 / 20)


def test_nan_pearson_is_zero(metrics):
    b = metrics.per_perturbation["B+ctrl"]
    assert b["pearson"] == 0.0  # constant prediction
    assert b["pearson_delta"] == 0.0
    assert b["pearson_de"] == 0.0
    assert pearson0(np.ones(4), np.arange(4.0)) == 0.0


def test_unweighted_means_overall_and_subgroups(metrics):
    assert metrics.overall["mse"] == pytest.approx((1 / 6 + 4 / 3) / 2)
    assert metrics.overall["pearson"] == pytest.approx(0.5)
    assert metrics.subgroups["g1"]["mse"] == pytest.approx(1 / 6)
    assert metrics.subgroups["g2"]["mse"] == pytest.approx(0.75)
    flat = metrics.flat("test")
    assert flat["test_mse"] == pytest.approx(0.75)
    assert flat["test_g1_pearson_delta"] == pytest.approx(1.0)
    assert flat["test_g2_pearson_delta"] == pytest.approx(0.5)


def test_subgroup_members_not_predicted_are_skipped():
    m = compute_metrics(PRED, TRUTH, CTRL, DE, subgroups={"g": ["A+ctrl", "Z+ctrl"], "empty": ["Z+ctrl"]})
    assert m.subgroups["g"]["mse"] == pytest.approx(1 / 6)
    assert "empty" not in m.subgroups


def test_pds_ranks_and_target_gene_exclusion():
    m = compute_metrics(PRED, TRUTH, CTRL, DE)
    # A: L1 1 to its own truth vs 3 to B -> rank 0; B: tie (2, 2), stable order puts A first -> rank 1
    assert m.per_perturbation["A+ctrl"]["pds_l1"] == pytest.approx(1.0)
    assert m.per_perturbation["B+ctrl"]["pds_l1"] == pytest.approx(0.5)
    assert m.overall["pds_l1"] == pytest.approx(0.75)
    # dropping B's own column leaves B's (zero) predicted delta at L1 0 from B's truth
    named = compute_metrics(PRED, TRUTH, CTRL, DE, gene_names=["A", "B", "C"])
    assert named.per_perturbation["B+ctrl"]["pds_l1"] == pytest.approx(1.0)


def test_de_genes_only_and_order_invariant():
    ctrl = np.zeros(5)
    truth = {"X+ctrl": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    pred = {"X+ctrl": np.array([1.0, 0.0, 3.0, 0.0, 6.0])}
    m1 = compute_metrics(pred, truth, ctrl, {"X+ctrl": np.array([4, 0, 2, 1, 3])})
    m2 = compute_metrics(pred, truth, ctrl, {"X+ctrl": np.array([0, 2, 4, 1, 3])})
    assert m1.overall["mse_de"] == pytest.approx((0 + 4 + 0 + 16 + 1) / 5)
    # top-20 of a 5-gene ranking is everything; restrict with a shorter list to check the subset
    m3 = compute_metrics(pred, truth, ctrl, {"X+ctrl": np.array([4, 0])})
    assert m3.overall["mse_de"] == pytest.approx(0.5)  # genes 4 and 0: (1 + 0) / 2
    assert m3.overall["pearson_de"] == pytest.approx(1.0)
    assert "frac_correct_direction_50" not in m3.per_perturbation["X+ctrl"]  # 2 < min(50, 5) ranked genes
    for key in ("mse_de", "pearson_de", "pearson_delta_de"):
        assert m1.overall[key] == pytest.approx(m2.overall[key])


def test_ctrl_gets_only_absolute_metrics():
    pred = dict(PRED, ctrl=CTRL + np.array([0.0, 0.0, 0.3]))
    m = compute_metrics(pred, TRUTH, CTRL, DE)
    assert set(m.per_perturbation["ctrl"]) == {"mse", "pearson", "mae"}
    assert m.overall["mse"] == pytest.approx((1 / 6 + 4 / 3 + 0.03) / 3)
    assert m.overall["mse_de"] == pytest.approx((1 / 6 + 4 / 3) / 2)


def test_non_dropout_and_hvg_metrics():
    m = compute_metrics(PRED, TRUTH, CTRL, DE, non_dropout_de_idx={"A+ctrl": np.array([0, 1])},
                        hvg_idx=np.array([0, 2]))
    a = m.per_perturbation["A+ctrl"]
    assert a["mse_top20_de_non_dropout"] == pytest.approx(0.125)  # ((0.5 - 1)^2 + 0) / 2
    assert a["pearson_delta_top20_de_non_dropout"] == pytest.approx(1.0)
    assert "mse_top20_de_non_dropout" not in m.per_perturbation["B+ctrl"]
    assert a["mse_top200_hvg"] == pytest.approx(0.25)
    assert a["pearson_top200_hvg"] == pytest.approx(1.0)
    assert m.per_perturbation["B+ctrl"]["pearson_delta_top200_hvg"] == 0.0


def test_top_variable_genes_is_gears_argsort():
    means = np.array([[0.0, 1.0, 5.0], [0.0, 3.0, 5.1], [0.0, 5.0, 4.9]])
    assert top_variable_genes(means, n=2).tolist() == [2, 1]  # ascending std, last n


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2 non-finite .* 'A\+ctrl' at gene index 0"):
        compute_metrics({"A+ctrl": np.array([np.nan, 1.0, np.inf])}, TRUTH, CTRL, DE)
    with pytest.raises(ValueError, match="no truth"):
        compute_metrics({"Q+ctrl": CTRL}, TRUTH, CTRL, DE)
    with pytest.raises(ValueError, match="no DE genes"):
        compute_metrics(PRED, TRUTH, CTRL, {"A+ctrl": DE["A+ctrl"]})
    with pytest.raises(ValueError, match="shape"):
        compute_metrics({"A+ctrl": np.ones(4)}, TRUTH, CTRL, DE)


DA = np.array([1.0, 0.0, 2.0, -1.0, 3.0, 0.5])
DB = np.array([0.0, 1.0, -1.0, 2.0, 0.5, 1.0])


def test_gi_params_exact_fit():
    r = gi_params(DA, DB, 2 * DA + DB)
    assert (r["c1"], r["c2"]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert r["mag"] == pytest.approx(math.sqrt(5))
    assert r["dominance"] == pytest.approx(math.log10(2))
    assert r["corr_fit"] == pytest.approx(1.0)
    assert r["dcor"] == pytest.approx(dcor.distance_correlation(np.column_stack([DA, DB]), 2 * DA + DB))


def test_gi_metrics_magnitude_mse_and_single_fallback():
    ctrl = np.full(6, 2.0)
    truth = {"A+ctrl": ctrl + DA, "B+ctrl": ctrl + DB, "A+B": ctrl + 2 * DA + DB}
    pred = {"A+B": ctrl + DA + DB}  # singles fall back to the observed ones
    g = gi_metrics(pred, truth, ctrl, ["A+B"])
    assert g.per_double["A+B"]["pred_mag"] == pytest.approx(math.sqrt(2))
    assert g.overall["gi_magnitude_mse"] == pytest.approx((math.sqrt(2) - math.sqrt(5)) ** 2)
    expected = (g.per_double["A+B"]["pred_dcor"] - g.per_double["A+B"]["true_dcor"]) ** 2
    assert g.overall["gi_dcor_mse"] == pytest.approx(expected)
    assert g.overall["gi_n_doubles"] == 1.0
    with pytest.raises(ValueError, match="not a double"):
        gi_metrics(pred, truth, ctrl, ["A+ctrl"])


def test_systema_metrics_and_centroid_accuracy_by_hand():
    """Systema: PearsonΔ against the mean of training perturbations; centroid accuracy (nearest centroid)."""
    ctrl = np.zeros(4)
    shared = np.ones(4)  # every training perturbation shifts all genes by +1
    truth = {"A+ctrl": np.array([2.0, 0.0, 1.0, 1.0]), "B+ctrl": np.array([1.0, 1.0, 2.0, 0.0])}
    pred = {"A+ctrl": np.array([0.0, 2.0, 1.0, 1.0]),  # A's own effect (+1, -1, 0, 0) predicted backwards
            "B+ctrl": truth["B+ctrl"].copy()}
    de = {c: np.arange(4) for c in truth}
    m = compute_metrics(pred, truth, ctrl, de, perturbed_mean=shared)
    per = m.per_perturbation
    assert per["A+ctrl"]["systema_pearson_delta"] == pytest.approx(-1.0)  # (-1,1,0,0) vs (1,-1,0,0)
    assert per["B+ctrl"]["systema_pearson_delta"] == pytest.approx(1.0)
    assert per["A+ctrl"]["systema_pearson_delta_de"] == pytest.approx(-1.0)
    # |pred_A - A| = sqrt(8) > |pred_A - B| = 2: A's prediction is nearer B's centroid
    assert per["A+ctrl"]["centroid_accuracy"] == 0.0
    assert per["B+ctrl"]["centroid_accuracy"] == 1.0
    assert m.overall["centroid_accuracy"] == 0.5
    assert m.overall["systema_pearson_delta"] == pytest.approx(0.0)
    # without a reference the Systema PearsonΔ is not reported (centroid accuracy needs none)
    assert "systema_pearson_delta" not in compute_metrics(pred, truth, ctrl, de).overall
