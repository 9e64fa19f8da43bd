"""Paired tests of the report: verdicts on arms with known effects, scipy/statsmodels equality, bootstrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from fixtures.synthetic_sweep import write_synthetic_sweep
from pertadapt.report.bootstrap import hierarchical_bootstrap
from pertadapt.report.stats import paired_tests, sentence
from pertadapt.report.tables import load_sweep, lower_is_better

ARMS = {"full": 0.0, "worse": 0.10, "better": -0.10, "same": None, "noisy": 0.0}
METRICS = ["mse_de", "mse", "pearson_delta", "pearson_delta_de"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_sweep(tmp_path_factory.mktemp("sweep") / "toggles", arms=ARMS, seeds=(1, 2, 3),
                                 n_conditions=40, noise=0.05, baselines=())


@pytest.fixture(scope="module")
def tests(sweep: Path) -> pd.DataFrame:
    data = load_sweep(sweep)
    return paired_tests(data.per_condition, data.reference, METRICS)


def _row(tests: pd.DataFrame, arm: str, metric: str) -> pd.Series:
    return tests[(tests["arm"] == arm) & (tests["metric"] == metric)].iloc[0]


def test_worse_arm_is_worse_after_holm_and_its_ci_covers_the_true_margin(sweep: Path, tests: pd.DataFrame) -> None:
    for metric in METRICS:
        r = _row(tests, "worse", metric)
        assert r["verdict"] == "worse", metric
        assert r["p_holm"] < 0.05
        assert (r["n_pairs"], r["n_conditions"], r["n_seeds"]) == (120, 40, 3)
        # The synthetic effect multiplies every reference value by 1 ± 0.10: the true mean difference.
        margin = (0.10 if lower_is_better(metric) else -0.10) * r["reference_mean"]
        assert r["ci_low"] < margin < r["ci_high"], (metric, margin, r["ci_low"], r["ci_high"])
        assert r["ci_low"] < r["mean_diff"] < r["ci_high"]
    assert (tests.loc[tests["arm"] == "better", "verdict"] == "better").all()


def test_identical_and_equal_arms_show_no_difference(tests: pd.DataFrame) -> None:
    same = tests[tests["arm"] == "same"]
    assert (same["verdict"] == "no difference").all()
    assert (same["mean_diff"] == 0).all()
    assert (same["ci_low"] == 0).all()
    assert (same["ci_high"] == 0).all()
    assert (same["p"] == 1.0).all()
    noisy = tests[tests["arm"] == "noisy"]
    assert (noisy["verdict"] == "no difference").all()
    assert (noisy["ci_low"] < 0).all()
    assert (noisy["ci_high"] > 0).all()


def test_p_values_equal_scipy_wilcoxon_and_statsmodels_holm(sweep: Path, tests: pd.DataFrame) -> None:
    pc = load_sweep(sweep).per_condition
    expected_p = []
    for _, r in tests.iterrows():
        sel = pc[pc["metric"] == r["metric"]]
        a = sel[sel["arm"] == r["arm"]].set_index(["seed", "condition"])["value"]
        b = sel[sel["arm"] == "full"].set_index(["seed", "condition"])["value"]
        d = (a - b.reindex(a.index)).to_numpy()
        assert len(d) == r["n_pairs"]
        if not d.any():  # identical arms: nothing to rank, the report says p = 1
            expected_p.append(1.0)
            continue
        res = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        assert r["statistic"] == pytest.approx(res.statistic, abs=0)
        expected_p.append(res.pvalue)
    np.testing.assert_allclose(tests["p"], expected_p, rtol=1e-12, atol=0)
    np.testing.assert_allclose(tests["p_holm"], multipletests(expected_p, method="holm")[1], rtol=1e-12, atol=0)


def test_pairs_are_only_conditions_and_seeds_present_in_both_arms(sweep: Path) -> None:
    data = load_sweep(sweep)
    pc = data.per_condition
    drop = (pc["arm"] == "worse") & (pc["seed"] == 3) | (pc["arm"] == "full") & (pc["condition"] == "G0+G1")
    t = paired_tests(pc[~drop], "full", ["mse_de"], arms=["worse"])
    assert t.iloc[0]["n_pairs"] == 2 * 39
    assert (t.iloc[0]["n_seeds"], t.iloc[0]["n_conditions"]) == (2, 39)


def test_hierarchical_bootstrap_resamples_seeds_then_conditions() -> None:
    # Two seeds with constant values 0 and 1: resampling seeds gives pooled means 0, 0.5, 1
    # (probabilities 1/4, 1/2, 1/4), so the 95% interval is [0, 1]; resampling conditions alone would
    # give the zero-width [0.5, 0.5].
    assert hierarchical_bootstrap([np.zeros(5), np.ones(5)]) == (0.0, 1.0)
    # One seed: the ordinary percentile bootstrap of the mean of [0, 1] (n = 2): means 0, .5, 1.
    assert hierarchical_bootstrap([np.array([0.0, 1.0])]) == (0.0, 1.0)
    assert hierarchical_bootstrap([np.full(4, 0.25)]) == (0.25, 0.25)
    assert np.isnan(hierarchical_bootstrap([]) + hierarchical_bootstrap([np.array([])])).all()


def test_hierarchical_bootstrap_options_change_the_interval() -> None:
    rng = np.random.default_rng(3)
    groups = [rng.normal(0.1 * i, 1.0, 30) for i in range(4)]
    base = hierarchical_bootstrap(groups)
    assert hierarchical_bootstrap(groups) == base  # fixed seed: reproducible
    assert hierarchical_bootstrap(groups, seed=1) != base
    lo50, hi50 = hierarchical_bootstrap(groups, confidence=0.5)
    assert base[0] < lo50 < hi50 < base[1]
    few = hierarchical_bootstrap(groups, n_resamples=50)
    assert few != base
    assert few[0] < np.mean(np.concatenate(groups)) < few[1]


def test_sentence_reports_relative_error_change_and_evidence(tests: pd.DataFrame) -> None:
    r = _row(tests, "worse", "mse_de")
    text = sentence(r, "adapter.enabled: False")
    pct = 100 * r["mean_diff"] / r["reference_mean"]
    assert text.startswith("`worse` (adapter.enabled: False) worsens test mse_de on sim by ")
    assert f"+{pct:.2g}%" in text
    assert "40 conditions × 3 seeds" in text
    assert f"Holm {r['p_holm']:.2g}" in text
    corr = sentence(_row(tests, "better", "pearson_delta"))
    assert "improves test pearson_delta" in corr
    assert "%" not in corr.split("(")[0]
    assert "no significant difference" in sentence(_row(tests, "same", "mse_de"))
