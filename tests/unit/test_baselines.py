"""The four baselines on hand-computed means; exact recovery of a linear truth by baseline_linear."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.decomposition import PCA

from pertadapt.baselines import BASELINES, baseline_options, fit_baseline
from pertadapt.baselines.models import _pca_scores
from pertadapt.bench.baselines import run_baseline_benchmark
from pertadapt.config.components import (
    AdditiveBaseline,
    BaselineOptions,
    LinearBaseline,
    MeanBaseline,
    NoChangeBaseline,
)
from pertadapt.config.schema import MODELS, ConfigError

CTRL = np.array([1.0, 2.0, 3.0])
TRAIN = {
    "ctrl": CTRL,
    "A+ctrl": np.array([2.0, 2.0, 3.0]),  # Δ_A = (1, 0, 0)
    "B+ctrl": np.array([1.0, 0.0, 3.0]),  # Δ_B = (0, -2, 0)
    "A+B": np.array([3.0, 1.0, 0.0]),
}


def test_registry_matches_config_vocabulary():
    assert set(BASELINES) == {m for m in MODELS if m.startswith("baseline_")}
    @dataclass(frozen=True)
    class GearsOptions(BaselineOptions):  # a block no baseline is registered for
        name: str = "baseline_gears"

    with pytest.raises(ValueError, match="baseline_nochange, baseline_mean, baseline_additive, baseline_linear"):
        fit_baseline(GearsOptions(), TRAIN, CTRL)
    with pytest.raises(ValueError, match="'baseline_linear' needs its own options, got MeanBaseline"):
        fit_baseline(MeanBaseline(name="baseline_linear"), TRAIN, CTRL)


def test_nochange_and_mean():
    out = fit_baseline(NoChangeBaseline(), TRAIN, CTRL).predict(["C+ctrl", "A+B"])
    assert all(np.array_equal(v, CTRL) for v in out.values())
    mean = fit_baseline(MeanBaseline(), TRAIN, CTRL).predict(["C+D"])["C+D"]
    np.testing.assert_allclose(mean, [2.0, 1.0, 2.0])  # mean of the three non-ctrl training means


def test_additive_uses_single_deltas_and_no_change_for_unseen_genes():
    model = fit_baseline(AdditiveBaseline(), TRAIN, CTRL)
    out = model.predict(["A+B", "B+A", "A+C", "C+ctrl", "ctrl", "ctrl+B"])
    np.testing.assert_allclose(out["A+B"], [2.0, 0.0, 3.0])
    np.testing.assert_allclose(out["B+A"], [2.0, 0.0, 3.0])
    np.testing.assert_allclose(out["A+C"], [2.0, 2.0, 3.0])
    np.testing.assert_allclose(out["C+ctrl"], CTRL)
    np.testing.assert_allclose(out["ctrl"], CTRL)
    np.testing.assert_allclose(out["ctrl+B"], [1.0, 0.0, 3.0])


def _linear_world():
    """Gene embedding E (8 x 2) with a fit set whose embeddings sum to 0, and a bilinear truth."""
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(8)]
    emb = rng.normal(size=(8, 2))
    emb[1], emb[3] = -emb[0], -emb[2]  # training singles G0..G3: Σ P = 0, so the row centre is 0
    w_true = np.array([[0.7, -0.2], [0.4, 1.1]])
    ctrl = rng.gamma(2.0, 1.0, size=8)

    def truth(*gs: str) -> np.ndarray:
        e = sum(emb[genes.index(g)] for g in gs)
        return ctrl + emb @ w_true @ e

    train = {f"G{i}+ctrl": truth(f"G{i}") for i in range(4)} | {"ctrl": ctrl}
    return genes, emb, ctrl, train, truth


def test_linear_recovers_exactly_linear_truth():
    genes, emb, ctrl, train, truth = _linear_world()
    model = fit_baseline(LinearBaseline(ridge=0.0), train, ctrl, gene_embedding=emb, gene_names=genes)
    out = model.predict(["G4+ctrl", "G5+ctrl", "G4+G6", "ctrl"])
    for g in ("G4", "G5"):
        np.testing.assert_allclose(out[f"{g}+ctrl"], truth(g), atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["G4+G6"], truth("G4", "G6"), atol=1e-6, rtol=0)  # summed embeddings
    np.testing.assert_allclose(out["ctrl"], ctrl, atol=1e-6, rtol=0)
    shrunk = fit_baseline(LinearBaseline(ridge=0.1), train, ctrl, gene_embedding=emb,
                          gene_names=genes).predict(["G4+ctrl"])["G4+ctrl"]
    assert not np.allclose(shrunk, truth("G4"), atol=1e-6)  # λ = 0.1 shrinks towards the centre


def test_linear_unknown_gene_predicts_centre():
    genes, emb, ctrl, train, _ = _linear_world()
    model = fit_baseline(LinearBaseline(), train, ctrl, gene_embedding=emb, gene_names=genes)
    np.testing.assert_allclose(model.predict(["NOTMEASURED+ctrl"])["NOTMEASURED+ctrl"], ctrl, atol=1e-12)


def test_linear_pca_scores_match_sklearn_up_to_sign():
    x = np.random.default_rng(0).normal(size=(50, 6))  # genes x conditions
    ours = _pca_scores(x, 3)
    ref = PCA(n_components=3, svd_solver="full").fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-10)


def test_linear_default_pca_path_and_input_errors():
    genes, _, ctrl, train, _ = _linear_world()
    model = fit_baseline(LinearBaseline(k=3), train, ctrl, gene_names=genes)
    assert model.embedding.shape == (8, 3)
    assert np.isfinite(model.predict(["G7+ctrl"])["G7+ctrl"]).all()
    with pytest.raises(ValueError, match="gene_names"):
        fit_baseline(LinearBaseline(), train, ctrl)
    with pytest.raises(ValueError, match="gene_embedding"):
        fit_baseline(LinearBaseline(), train, ctrl, gene_embedding=np.ones((3, 2)), gene_names=genes)


def test_benchmark_runs_every_baseline():
    res = run_baseline_benchmark(n_genes=100, n_conditions=20)
    assert set(res["baselines"]) == set(BASELINES)
    assert res["n_conditions"] == 20
    assert res["n_train"] == 15  # 75 % of the 20 conditions
    parts = [t[k] for t in res["baselines"].values() for k in ("fit_s", "predict_s")]
    assert all(p > 0 for p in parts)
    assert res["total_s"] >= sum(parts)  # the total covers every fit and predict it reports


def test_each_baselines_options_reach_its_builder_through_the_registry():
    """``model.k`` / ``model.ridge`` of the linear block change the fitted model; the other blocks have no knobs;
    a bad knob is refused by the block's dataclass, naming its key."""
    genes, _, ctrl, train, _ = _linear_world()
    options = baseline_options({"baseline_linear": {"k": 2, "ridge": 0.5}})
    assert [o.name for o in options] == list(BASELINES)
    linear = options[-1]
    assert (linear.k, linear.ridge) == (2, 0.5)
    assert fit_baseline(linear, train, ctrl, gene_names=genes).embedding.shape == (8, 2)
    assert fit_baseline(baseline_options()[-1], train, ctrl, gene_names=genes).embedding.shape == (8, 5)  # k=10 capped
    a, b = (fit_baseline(LinearBaseline(ridge=r), train, ctrl, gene_names=genes).predict(["G5+ctrl"])["G5+ctrl"]
            for r in (0.0, 10.0))
    assert not np.allclose(a, b)
    with pytest.raises(ConfigError, match="model.ridge"):
        baseline_options({"baseline_linear": {"ridge": -1.0}})
    with pytest.raises(TypeError):
        baseline_options({"baseline_mean": {"k": 3}})
