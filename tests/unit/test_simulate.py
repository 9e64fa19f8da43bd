"""Simulator API: presets, layout, determinism, bad input, truth scoring and the CLI (real runs)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest

from pertadapt.data.io import write_h5ad_atomic
from pertadapt.data.keys import CONDITION, CONTROL, COUNTS_LAYER, DE_KEY, GENE_NAME, TOTAL_COUNT
from pertadapt.data.simulate import GI_TYPES, PRESETS, SIM_KEY, SimParams, sim_truth, simulate
from pertadapt.data.splits import SUBGROUPS, split_conditions
from pertadapt.eval import score_against_truth
from pertadapt.files import sha256_file

TINY = {"n_genes": 80, "n_singles": 6, "n_doubles": 3, "cells_per_condition": 8, "n_control": 40}


@pytest.fixture(scope="module")
def demo():
    t0 = time.perf_counter()
    adata = simulate("demo", seed=0)
    return adata, time.perf_counter() - t0


def _matrix_hash(adata) -> str:
    x = adata.layers[COUNTS_LAYER]
    h = hashlib.sha256()
    for part in (x.data, x.indices, x.indptr):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def test_demo_sizes_layout_and_speed(demo):
    adata, seconds = demo
    p = PRESETS["demo"]
    assert 200 <= p.n_genes <= 300
    assert 16 <= p.n_singles <= 24
    assert 10 <= p.n_doubles <= 16
    assert seconds < 15, f"demo took {seconds:.1f} s"
    assert adata.n_vars == p.n_genes
    conds = adata.obs[CONDITION].astype(str)
    assert (conds == CONTROL).sum() == p.n_control
    assert conds.nunique() == 1 + p.n_singles + p.n_doubles
    assert set(conds.value_counts().drop(CONTROL)) == {p.cells_per_condition}
    assert list(adata.var[GENE_NAME]) == list(adata.var_names)
    counts = adata.layers[COUNTS_LAYER]
    assert np.array_equal(counts.data, np.round(counts.data))
    assert np.allclose(adata.obs[TOTAL_COUNT], np.asarray(counts.sum(1)).ravel())
    assert len(adata.uns[DE_KEY]) == p.n_singles + p.n_doubles
    sim = adata.uns[SIM_KEY]
    assert sim["true_mean"].shape == (len(sim["conditions"]), adata.n_vars)
    assert set(sim["gi_type"]) == set(GI_TYPES)
    for target in sim["targets"]:
        assert f"{target}+{CONTROL}" in set(conds)


@pytest.mark.parametrize("split_seed", [1, 2, 3])
def test_demo_gives_every_gears_test_group(demo, split_seed):
    split = split_conditions(sorted(set(demo[0].obs[CONDITION].astype(str))), seed=split_seed)
    assert all(split.subgroups[g] for g in SUBGROUPS), split.subgroups
    assert split.val


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo):
    again = simulate("demo", seed=0)
    assert _matrix_hash(again) == _matrix_hash(demo[0])
    write_h5ad_atomic(again, tmp_path / "a.h5ad")
    write_h5ad_atomic(demo[0], tmp_path / "b.h5ad")
    assert sha256_file(tmp_path / "a.h5ad") == sha256_file(tmp_path / "b.h5ad")
    assert _matrix_hash(simulate("demo", seed=1, **TINY)) != _matrix_hash(simulate("demo", seed=2, **TINY))


def test_truth_is_the_large_sample_limit(demo):
    adata = demo[0]
    sim = adata.uns[SIM_KEY]
    conds = [str(c) for c in sim["conditions"]]
    x = adata.X.toarray()
    labels = adata.obs[CONDITION].astype(str).to_numpy()
    observed = {c: x[labels == c].mean(0) for c in conds if c != CONTROL}
    truth = {c: sim["true_mean"][i] for i, c in enumerate(conds) if c != CONTROL}
    st = sim_truth(adata)
    perfect = score_against_truth(truth, st).overall
    assert perfect["mse"] == 0.0
    assert perfect["pearson_delta"] == pytest.approx(1.0)
    noisy = score_against_truth(observed, st).overall
    ctrl_obs = x[labels == CONTROL].mean(0)
    nochange = score_against_truth(dict.fromkeys(observed, ctrl_obs), st).overall
    # Observed means carry only sampling noise (~0.5 / sqrt(40) per gene) and track the truth.
    assert noisy["mse"] < 0.01
    assert noisy["pearson_delta_de"] > 0.7
    assert nochange["mse_de"] > 5 * noisy["mse_de"]
    assert abs(nochange["pearson_delta"]) < 0.2
    # Control: no systematic bias of the analytic expectation (mean signed error ~ 0).
    assert abs(np.mean(ctrl_obs - sim["true_mean"][0])) < 0.01
    assert set(score_against_truth(truth, st).per_perturbation) == set(observed)
    # the same metric functions as everything else: a constant prediction has PearsonΔ 0, not NaN
    assert score_against_truth(dict.fromkeys(observed, st.mean_of(CONTROL)), st).overall["pearson_delta"] == 0.0


def test_nb_expectation_equals_the_sum_over_scipys_pmf():
    from scipy.stats import nbinom

    from pertadapt.data.simulate import _nb_expected_log1p

    mean = np.array([1e-4, 0.05, 0.7, 3.0, 12.0, 29.0, 29.0])
    phi = np.array([0.5, 10.0, 0.1, 0.01, 0.3, 1e-3, 1.0])  # the model: phi 0.01-1, more at low means
    scale = np.array([10.0, 0.3, 1.0, 2.5, 0.05, 0.7, 1.3])
    r = 1.0 / phi
    k = np.arange(20000.0)
    want = [(nbinom.pmf(k, ri, ri / (ri + mi)) * np.log1p(si * k)).sum() for mi, ri, si in zip(mean, r, scale, strict=True)]
    np.testing.assert_allclose(_nb_expected_log1p(mean, phi, scale), want, rtol=1e-9, atol=1e-14)


def test_score_rejects_bad_predictions(demo):
    adata = demo[0]
    first = next(c for c in adata.uns[SIM_KEY]["conditions"] if c != CONTROL)
    with pytest.raises(ValueError, match="not a simulated condition"):
        score_against_truth({"NOPE+ctrl": np.zeros(adata.n_vars)}, sim_truth(adata))
    with pytest.raises(ValueError, match="expected shape"):
        score_against_truth({first: np.zeros(3)}, sim_truth(adata))


def test_presets_have_the_promised_scale():
    bench = PRESETS["benchmark"]
    assert bench.n_genes >= 2000
    assert bench.n_singles >= 150
    assert bench.n_doubles >= 100
    assert PRESETS["norman_like"].modality == "crispra"
    assert PRESETS["norman_like"].n_doubles > 100
    assert PRESETS["replogle_like"].modality == "crispri"
    assert PRESETS["replogle_like"].n_doubles == 0
    assert all(isinstance(p, SimParams) for p in PRESETS.values())


@pytest.mark.parametrize(("overrides", "name"), [
    ({"n_singles": 300}, "n_singles"),
    ({"n_singles": 4, "n_doubles": 7}, "n_doubles"),
    ({"go_signal": 1.5}, "go_signal"),
    ({"nonresponder_frac": -0.1}, "nonresponder_frac"),
    ({"p_activation": 2.0}, "p_activation"),
    ({"n_control": 0}, "n_control"),
    ({"cells_per_condition": 0}, "cells_per_condition"),
    ({"gi_mix": (0.5, 0.5, 0.5, 0.0, 0.0)}, "gi_mix"),
    ({"modality": "knockout"}, "modality"),
    ({"cell_noise_sd": -0.5}, "cell_noise_sd"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_bad_input_names_the_parameter(overrides, name):
    with pytest.raises(ValueError, match=name):
        simulate("demo", 0, **overrides)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="demo, benchmark, norman_like, replogle_like"):
        simulate("nope")


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "from pertadapt.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_cli_writes_file_and_exits_2_on_bad_input(tmp_path):
    import anndata as ad

    out = tmp_path / "sim.h5ad"
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    done = _cli("simulate", "--preset", "demo", "--seed", "3", "--out", str(out), *sets,
                "--set", "gi_mix=0.2,0.2,0.2,0.2,0.2")
    assert done.returncode == 0, done.stderr
    back = ad.read_h5ad(out)
    assert back.n_vars == TINY["n_genes"]
    assert back.uns[SIM_KEY]["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["sim.h5ad"]
    bad = _cli("simulate", "--out", str(tmp_path / "bad.h5ad"), "--set", "go_signal=2")
    assert bad.returncode == 2
    assert "go_signal" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad.h5ad").exists()
    typo = _cli("simulate", "--out", str(tmp_path / "bad.h5ad"), "--set", "n_genes=many")
    assert typo.returncode == 2
    assert "n_genes" in typo.stdout + typo.stderr
