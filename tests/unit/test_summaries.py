"""AnnData summaries, prediction files, and the `eval` / `baselines` commands on a tiny dataset."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from pertadapt.cli import app
from pertadapt.data.dataset import load_perturb_data, read_perturb_data
from pertadapt.data.io import DataError
from pertadapt.data.summaries import read_predictions, write_predictions

GENES = ["G0", "G1", "G2"]
#: cells per condition, each row a cell of ``X`` (3 genes)
CELLS = {
    "ctrl": [[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]],  # mean (2, 2, 0)
    "G0+ctrl": [[4.0, 2.0, 1.0]],
    "G1+ctrl": [[2.0, 0.0, 0.0], [2.0, 1.0, 0.0]],  # mean (2, 0.5, 0)
    "G0+G1": [[5.0, 1.0, 1.0]],
}


def _name(cond: str) -> str:
    return f"K562_{cond}_{'1+1' if '+' in cond else '1'}"


def make_adata() -> ad.AnnData:
    conds = [c for c, rows in CELLS.items() for _ in rows]
    x = np.array([r for rows in CELLS.values() for r in rows], dtype=np.float32)
    obs = pd.DataFrame({"condition": conds, "cell_type": "K562", "condition_name": [_name(c) for c in conds]},
                       index=[f"cell{i}" for i in range(len(conds))])
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=GENES))
    adata.uns["rank_genes_groups_cov_all"] = {
        _name("G0+ctrl"): np.array(["G0", "G2", "G1"]),
        _name("G1+ctrl"): np.array(["G1", "G0", "G2"]),
        _name("G0+G1"): np.array(["G2", "G0", "G1"]),
    }
    adata.uns["top_non_dropout_de_20"] = {_name("G0+ctrl"): np.array(["G0", "G1"])}
    return adata


def test_condition_and_control_means():
    data = load_perturb_data(make_adata(), for_training=False)
    assert data.conditions == ("G0+G1", "G0+ctrl", "G1+ctrl", "ctrl")
    np.testing.assert_allclose(data.condition_means["G1+ctrl"], [2.0, 0.5, 0.0])
    np.testing.assert_allclose(data.ctrl_mean, [2.0, 2.0, 0.0])


def test_de_indices_rank_order_keyed_by_condition():
    data = load_perturb_data(make_adata(), for_training=False)
    assert set(data.de_idx) == {"G0+ctrl", "G1+ctrl", "G0+G1"}
    assert data.de_idx["G0+G1"][:2].tolist() == [2, 0]
    assert data.de_idx["G0+ctrl"].tolist() == [0, 2, 1]
    assert data.non_dropout_de_idx == {"G0+ctrl": pytest.approx(np.array([0, 1]))}


def test_missing_de_key_says_to_prepare(tmp_path):
    adata = make_adata()
    del adata.uns["rank_genes_groups_cov_all"]
    adata.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(DataError, match=r"d\.h5ad.*rank_genes_groups_cov_all.*pertadapt data prepare"):
        read_perturb_data(tmp_path / "d.h5ad", for_training=False)


def test_training_needs_total_counts_evaluation_does_not(tmp_path):
    make_adata().write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(DataError, match=r"obs\['total_count'\] is missing"):
        read_perturb_data(tmp_path / "d.h5ad")
    assert read_perturb_data(tmp_path / "d.h5ad", for_training=False).total_count is None


@pytest.mark.parametrize("content", [b"not an hdf5 file at all", b"\x89HDF\r\n\x1a\n" + b"\0" * 64])
def test_unreadable_file_is_a_data_error_naming_it(tmp_path, content):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.h5ad: not a readable \.h5ad file"):
        read_perturb_data(bad, for_training=False)


def test_prediction_roundtrip_per_cell_and_reordered(tmp_path):
    path = tmp_path / "p.h5ad"
    write_predictions(path, ["A+ctrl", "ctrl"], np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]), GENES)
    conds, mat = read_predictions(path, GENES)
    assert conds == ["A+ctrl", "ctrl"]
    np.testing.assert_array_equal(mat, [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    # per-cell file, genes in another order: rows are averaged per condition and columns re-ordered
    cells = ad.AnnData(X=np.array([[3.0, 1.0, 2.0], [5.0, 3.0, 2.0]]),
                       obs=pd.DataFrame({"condition": ["A+ctrl", "A+ctrl"]}, index=["a", "b"]),
                       var=pd.DataFrame(index=["G2", "G0", "G1"]))
    cells.write_h5ad(path)
    conds, mat = read_predictions(path, GENES)
    assert conds == ["A+ctrl"]
    np.testing.assert_allclose(mat, [[2.0, 2.0, 4.0]])


def test_prediction_errors_name_genes_and_non_finite(tmp_path):
    path = tmp_path / "p.h5ad"
    write_predictions(path, ["A+ctrl"], np.array([[1.0, 2.0, 3.0]]), ["G0", "G1", "XX"])
    with pytest.raises(DataError, match=r"missing, e.g. G2.*unknown gene\(s\), e.g. XX"):
        read_predictions(path, GENES)
    write_predictions(path, ["A+ctrl", "B+ctrl"], np.array([[1.0, 2.0, 3.0], [np.nan, 1.0, np.inf]]), GENES)
    with pytest.raises(DataError, match=r"2 non-finite .* 'B\+ctrl', gene 'G0'"):
        read_predictions(path, GENES)


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data.h5ad"
    make_adata().write_h5ad(data)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["ctrl", "G0+ctrl", "G1+ctrl"], "val": [], "test": ["G0+G1"],
                                 "subgroups": {"combo_seen2": ["G0+G1"]}}))
    return tmp_path, data, split


def test_eval_command_writes_metrics(files):
    tmp, data, split = files
    pred = tmp / "pred.h5ad"
    # additive prediction of G0+G1: ctrl + (2, 0, 1) + (0, -1.5, 0) = (4, 0.5, 1); truth (5, 1, 1)
    write_predictions(pred, ["G0+G1", "G0+ctrl"], np.array([[4.0, 0.5, 1.0], [4.0, 2.0, 1.0]]), GENES)
    result = CliRunner().invoke(app, ["eval", "--pred", str(pred), "--data", str(data), "--split", str(split),
                                      "--out", str(tmp / "m.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp / "m.json").read_text())
    assert set(doc) == {"overall", "subgroups", "per_perturbation"}
    assert list(doc["per_perturbation"]) == ["G0+G1"]  # train conditions in PRED are not scored
    assert doc["overall"]["mse"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert doc["subgroups"]["combo_seen2"]["mse"] == pytest.approx(doc["overall"]["mse"])


@pytest.mark.parametrize(("case", "message"), [
    ("outside", "not in the split"),
    ("nonfinite", "non-finite"),
    ("no_de", "pertadapt data prepare"),
])
def test_eval_command_rejects_bad_input(files, case, message):
    tmp, data, split = files
    pred = tmp / "pred.h5ad"
    rows = {"outside": (["G0+G1", "G9+ctrl"], [[4.0, 0.5, 1.0], [1.0, 1.0, 1.0]]),
            "nonfinite": (["G0+G1"], [[np.nan, 0.5, 1.0]]),
            "no_de": (["G0+G1"], [[4.0, 0.5, 1.0]])}[case]
    write_predictions(pred, rows[0], np.array(rows[1]), GENES)
    if case == "no_de":
        adata = make_adata()
        del adata.uns["rank_genes_groups_cov_all"]
        adata.write_h5ad(data)
    result = CliRunner().invoke(app, ["eval", "--pred", str(pred), "--data", str(data), "--split", str(split),
                                      "--out", str(tmp / "m.json")])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert not (tmp / "m.json").exists()


def test_baselines_command_writes_predictions_and_metrics(files):
    tmp, data, split = files
    out = tmp / "out"
    result = CliRunner().invoke(app, ["baselines", str(data), "--split", str(split), "--out", str(out),
                                      "--linear-k", "2"])
    assert result.exit_code == 0, result.output
    for name in ("baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear"):
        conds, _ = read_predictions(out / f"{name}.h5ad", GENES)
        assert conds == ["G0+G1", "G0+ctrl", "G1+ctrl"]
        assert "mse_de" in json.loads((out / f"{name}.metrics.json").read_text())["overall"]
    additive = json.loads((out / "baseline_additive.metrics.json").read_text())
    assert additive["overall"]["mse"] == pytest.approx((1 + 0.25 + 0) / 3)
