"""prepare_adata and read_raw on small files written in both layouts; GEARS uns structures by hand."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertadapt.config import ConfigError
from pertadapt.data.io import DataError, ParamError, read_raw, write_h5ad_atomic
from pertadapt.data.keys import (
    CELL_TYPE,
    CONDITION,
    CONDITION_NAME,
    CONTROL_FLAG,
    COUNTS_LAYER,
    DE_KEY,
    DOSE_VAL,
    GENE_NAME,
    NON_DROPOUT_KEY,
    NON_ZERO_KEY,
    TOP_NON_DROPOUT_DE_KEY,
    TOP_NON_ZERO_DE_KEY,
    TOTAL_COUNT,
)
from pertadapt.data.prepare import add_de_genes, prepare_adata
from pertadapt.data.validate import validate_adata
from pertadapt.files import sha256_file

GENES = [f"G{i}" for i in range(8)]


def counts_adata(conditions: dict[str, int], seed: int = 0, genes: list[str] = GENES) -> ad.AnnData:
    """Poisson counts (cells x genes) with ``conditions`` -> number of cells; G3 all zero; G4 zero outside ctrl."""
    rng = np.random.default_rng(seed)
    cond = np.repeat(list(conditions), list(conditions.values()))
    x = rng.poisson(5.0, size=(len(cond), len(genes))).astype(np.float32)
    x[:, 3] = 0
    x[cond != "ctrl", 4] = 0
    x[cond == "G0+ctrl", 0] += 40
    return ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({CONDITION: cond}, index=[f"c{i}" for i in range(len(cond))]),
                      var=pd.DataFrame({GENE_NAME: genes}, index=[f"ENSG{i}" for i in range(len(genes))]))


def welch_abs_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|t| of Welch's test per gene (what scanpy's t-test computes), NaN -> 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return np.abs(np.nan_to_num(t))


def test_prepare_gears_layout_by_hand():
    raw = counts_adata({"ctrl": 6, "G0+ctrl": 5, "G1+G2": 4})
    out = prepare_adata(raw, min_genes=1)
    assert sp.isspmatrix_csr(out.X)
    assert out.X.dtype == np.float32
    assert list(out.var_names) == GENES
    assert list(out.var[GENE_NAME]) == GENES
    np.testing.assert_array_equal(out.layers[COUNTS_LAYER].toarray(), raw.X.toarray())
    totals = raw.X.toarray().sum(1)
    np.testing.assert_allclose(out.obs[TOTAL_COUNT], totals)
    median = np.median(totals)
    np.testing.assert_allclose(out.X.toarray(), np.log1p(raw.X.toarray() / totals[:, None] * median), rtol=1e-5)
    assert out.uns["pertadapt_prepare"]["target_sum"] == median
    # GEARS obs columns: dose '1+1' for anything with '+', control flag 1 only for ctrl.
    row = out.obs.drop_duplicates(CONDITION).set_index(CONDITION)
    assert row.loc["G0+ctrl", DOSE_VAL] == "1+1"
    assert row.loc["ctrl", DOSE_VAL] == "1"
    assert row.loc["ctrl", CONTROL_FLAG] == 1
    assert row.loc["G1+G2", CONTROL_FLAG] == 0
    assert row.loc["G1+G2", CONDITION_NAME] == "K562_G1+G2_1+1"
    assert (out.obs[CELL_TYPE] == "K562").all()
    names = {"K562_G0+ctrl_1+1", "K562_G1+G2_1+1"}
    for key in (DE_KEY, NON_ZERO_KEY, NON_DROPOUT_KEY, TOP_NON_DROPOUT_DE_KEY, TOP_NON_ZERO_DE_KEY):
        assert set(out.uns[key]) == names, key
    x = out.X.toarray()
    is_ctrl = (out.obs[CONDITION] == "ctrl").to_numpy()
    for cond in ("G0+ctrl", "G1+G2"):
        name = f"K562_{cond}_1+1"
        ranked = out.uns[DE_KEY][name]
        assert sorted(ranked) == GENES
        t = welch_abs_t(x[(out.obs[CONDITION] == cond).to_numpy()], x[is_ctrl])
        np.testing.assert_allclose(t[[GENES.index(g) for g in ranked]], np.sort(t)[::-1], rtol=1e-4)
        # G3 is zero everywhere (a true zero), G4 is zero here but expressed in ctrl (a dropout).
        assert list(out.uns[NON_ZERO_KEY][name]) == [0, 1, 2, 5, 6, 7]
        assert list(out.uns[NON_DROPOUT_KEY][name]) == [0, 1, 2, 3, 5, 6, 7]
        assert out.uns[NON_ZERO_KEY][name].dtype == np.int64
        assert list(out.uns[TOP_NON_ZERO_DE_KEY][name]) == [g for g in ranked if g not in ("G3", "G4")]
        assert list(out.uns[TOP_NON_DROPOUT_DE_KEY][name]) == [g for g in ranked if g != "G4"]
    assert out.uns[DE_KEY]["K562_G0+ctrl_1+1"][0] == "G0"
    assert validate_adata(out, expect="log1p").ok


def test_prepare_vocabulary_filter_and_round_trip(tmp_path):
    raw = counts_adata({"ctrl": 6, "G0+ctrl": 5, "G2+G1": 3, "G1+G2": 3})
    raw.layers[COUNTS_LAYER] = raw.X.copy()
    raw.X = sp.csr_matrix(np.log1p(raw.X.toarray()))
    raw.obs[CELL_TYPE] = "RPE1"
    raw.X[0, 0] = 0.5  # X is ignored in favour of layers['counts']
    vocab = ["NEW1", *reversed(GENES[:6]), "NEW2"]
    out = prepare_adata(raw, vocabulary=vocab, min_genes=4, n_de=3)
    assert list(out.var_names) == vocab
    counts = out.layers[COUNTS_LAYER].toarray()
    assert counts[:, [0, -1]].sum() == 0
    src = raw.layers[COUNTS_LAYER].toarray()
    kept = src[:, :6] > 0
    keep_cells = kept.sum(1) - kept[:, 3] >= 4
    np.testing.assert_array_equal(counts[:, 1:7], src[keep_cells][:, 5::-1])
    assert out.uns["pertadapt_prepare"]["n_genes_zero_filled"] == 2
    # B+A and A+B were merged into one canonical condition.
    assert set(out.obs[CONDITION]) <= {"ctrl", "G0+ctrl", "G1+G2"}
    assert all(name.startswith("RPE1_") for name in out.uns[DE_KEY])
    assert all(len(v) <= 3 for v in out.uns[TOP_NON_ZERO_DE_KEY].values())
    path = tmp_path / "prepared.h5ad"
    write_h5ad_atomic(out, path)
    back = ad.read_h5ad(path)
    assert list(back.uns[DE_KEY]["RPE1_G0+ctrl_1+1"]) == list(out.uns[DE_KEY]["RPE1_G0+ctrl_1+1"])
    assert sp.isspmatrix_csr(back.X)
    assert validate_adata(back, expect="log1p").ok
    assert len(sha256_file(path)) == 64


def test_prepare_rejects_bad_input():
    raw = counts_adata({"ctrl": 4, "G0+ctrl": 4})
    with pytest.raises(ParamError, match="vocabulary: duplicate gene names NEW"):
        prepare_adata(raw, vocabulary=["G0", "G1", "NEW", "NEW"])
    with pytest.raises(DataError, match="perturbed genes missing from the vocabulary: G0"):
        prepare_adata(raw, vocabulary=["G1", "G2"])
    with pytest.raises(DataError, match="min_genes"):
        prepare_adata(raw, min_genes=100)
    raw.X = sp.csr_matrix(raw.X.toarray() + 0.5)
    with pytest.raises(DataError, match="non-integer values found in genes G0"):
        prepare_adata(raw, min_genes=1)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"target_sum": 0}, "target_sum: expected a positive number"),
    ({"target_sum": -100.0}, "target_sum: expected a positive number"),
    ({"target_sum": float("nan")}, "got nan"),
    ({"target_sum": float("inf")}, "got inf"),
    ({"n_de": 0}, "n_de: expected a positive integer, got 0"),
    ({"n_de": -5}, "n_de: expected a positive integer, got -5"),
    ({"min_genes": -1}, "min_genes: expected a non-negative integer, got -1"),
    ({"cell_type_default": " "}, "cell_type_default: expected a non-empty name"),
    ({"vocabulary": []}, "vocabulary: no gene names"),
])
def test_prepare_rejects_bad_parameters(kwargs, needle):
    """Out-of-range parameters raise ParamError (a ConfigError) before any step runs."""
    steps = []
    with pytest.raises(ParamError) as info:
        prepare_adata(counts_adata({"ctrl": 4, "G0+ctrl": 4}), min_genes=kwargs.pop("min_genes", 1),
                      on_step=steps.append, **kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ConfigError)
    assert steps == []


def test_add_de_genes_rejects_non_positive_n_de():
    out = prepare_adata(counts_adata({"ctrl": 4, "G0+ctrl": 4}), min_genes=1)
    with pytest.raises(ParamError, match="n_de: expected a positive integer, got -5"):
        add_de_genes(out, n_de=-5)


def test_target_sum_and_n_de_change_the_output():
    raw = counts_adata({"ctrl": 6, "G0+ctrl": 5, "G1+G2": 4})
    out = prepare_adata(raw, min_genes=1, target_sum=1e4, n_de=2)
    np.testing.assert_allclose(np.expm1(out.X.toarray()).sum(1), 1e4, rtol=1e-4)
    assert out.uns["pertadapt_prepare"]["target_sum"] == 1e4
    assert {len(v) for v in out.uns[TOP_NON_ZERO_DE_KEY].values()} == {2}
    wide = prepare_adata(raw, min_genes=1, target_sum=10.0, n_de=5)
    np.testing.assert_allclose(np.expm1(wide.X.toarray()).sum(1), 10.0, rtol=1e-4)
    assert max(len(v) for v in wide.uns[TOP_NON_ZERO_DE_KEY].values()) == 5


def test_prepare_drops_singleton_conditions(caplog):
    out = prepare_adata(counts_adata({"ctrl": 4, "G0+ctrl": 4, "G5+ctrl": 1}), min_genes=1)
    assert "G5+ctrl" not in set(out.obs[CONDITION])
    assert "G5+ctrl" in caplog.text


@pytest.mark.parametrize(("delimiter", "double", "reverse"), [("_", "G0_G1", "G1_G0"), ("|", "G0|G1", "G1|G0")])
def test_read_raw_layout(tmp_path, delimiter, double, reverse):
    raw = counts_adata({"ctrl": 4, "G0+ctrl": 4, "G1+G2": 4})
    raw.obs["gene"] = np.repeat(["non-targeting", "G0", double], 4)
    raw.obs.loc[raw.obs_names[-2:], "gene"] = reverse
    del raw.obs[CONDITION]
    path = tmp_path / "raw.h5ad"
    raw.write_h5ad(path)
    back = read_raw(path, perturbation_column="gene", control_labels=["non-targeting"], delimiter=delimiter)
    assert list(back.obs[CONDITION]) == ["ctrl"] * 4 + ["G0+ctrl"] * 4 + ["G0+G1"] * 4
    with pytest.raises(DataError, match="'guide'"):
        read_raw(path, perturbation_column="guide", control_labels=["non-targeting"], delimiter=delimiter)
