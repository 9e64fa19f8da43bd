"""`pertadapt data prepare|validate|split` end to end, and every bad input with its exit code and message."""

from __future__ import annotations

import json
import os
import stat

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from pertadapt.cli.main import app
from pertadapt.data.keys import CONDITION, DE_KEY, GENE_NAME
from pertadapt.data.splits import split_conditions
from pertadapt.data.validate import validate_adata
from pertadapt.files import sha256_file

GENES = [f"G{i}" for i in range(10)]
CONDS = {"ctrl": 8, **{f"G{i}+ctrl": 4 for i in range(6)}, "G0+G1": 3, "G2+G3": 3, "G4+G5": 3}

runner = CliRunner()


def counts_file(path, conditions=CONDS, genes=GENES, edit=None):
    """Write a raw-counts .h5ad (cells x genes) and return its path; ``edit(adata)`` may break it first."""
    rng = np.random.default_rng(1)
    cond = np.repeat(list(conditions), list(conditions.values()))
    x = rng.poisson(3.0, size=(len(cond), len(genes))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({CONDITION: cond}, index=[f"c{i}" for i in range(len(cond))]),
                       var=pd.DataFrame({GENE_NAME: genes}, index=genes))
    if edit is not None:
        edit(adata)
    adata.write_h5ad(path)
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_prepare_validate_split_round_trip(tmp_path):
    src = counts_file(tmp_path / "raw.h5ad")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*GENES, "EXTRA"]) + "\n")
    out = tmp_path / "prepared.h5ad"
    code, output = run("data", "prepare", src, "--out", out, "--vocab", vocab, "--min-genes", "3")
    assert code == 0, output
    prepared = ad.read_h5ad(out)
    assert prepared.n_vars == 11
    assert set(prepared.uns[DE_KEY]) == {f"K562_{c}_1+1" for c in CONDS if c != "ctrl"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, output = run("data", "validate", out, "--expect", "log1p")
    assert code == 0, output
    assert "n_control_cells" in output
    split_path = tmp_path / "split.json"
    code, output = run("data", "split", out, "--kind", "simulation", "--seed", "2", "--out", split_path)
    assert code == 0, output
    doc = json.loads(split_path.read_text())
    assert {"train", "val", "test", "subgroups", "data_sha256", "seed", "kind"} <= set(doc)
    assert doc["data_sha256"] == sha256_file(out)
    assert doc["seed"] == 2
    assert doc["kind"] == "simulation"
    expected = split_conditions(list(CONDS), "simulation", seed=2)
    assert (doc["train"], doc["val"], doc["test"]) == (expected.train, expected.val, expected.test)
    assert not set(doc["test"]) & set(doc["train"] + doc["val"])
    assert "ctrl" in doc["train"]


def test_prepare_raw_layout(tmp_path):
    def relabel(adata):
        labels = {"ctrl": "non-targeting", "G0+G1": "G1|G0", "G2+G3": "G2|G3"}
        adata.obs["gene"] = [labels.get(c, c.split("+")[0]) for c in adata.obs.pop(CONDITION)]
        adata.obs.loc[adata.obs_names[-3:], "gene"] = "G5|G4"

    src = counts_file(tmp_path / "raw.h5ad", edit=relabel)
    out = tmp_path / "prepared.h5ad"
    code, output = run("data", "prepare", src, "--out", out, "--min-genes", "3", "--perturbation-column", "gene",
                       "--control-label", "non-targeting", "--delimiter", "|")
    assert code == 0, output
    conditions = set(ad.read_h5ad(out).obs[CONDITION])
    assert conditions == {"ctrl", "G0+G1", "G4+G5", "G2+G3"} | {f"G{i}+ctrl" for i in range(6)}


def _drop_control(a):
    a.obs[CONDITION] = a.obs[CONDITION].replace({"ctrl": "G9+ctrl"})


def _nan(a):
    a.X[2, 7] = np.nan


def _negative(a):
    a.X[2, 6] = -1.0


def _fraction(a):
    a.X[1, 5] = 0.25


def _unknown_gene(a):
    a.obs[CONDITION] = a.obs[CONDITION].replace({"G0+ctrl": "NOPE+ctrl"})


def _few_cells(a):
    a.obs[CONDITION] = a.obs[CONDITION].astype(str)
    a.obs.loc[a.obs_names[0], CONDITION] = "G8+ctrl"


def _duplicate_gene(a):
    a.var[GENE_NAME] = [*GENES[:-1], "G3"]


def _no_condition(a):
    del a.obs[CONDITION]


def _bad_name(a):
    a.obs[CONDITION] = a.obs[CONDITION].replace({"G0+ctrl": "G0+G1+G2"})


BAD = [
    (_drop_control, "no control cells"),
    (_nan, "G7"),
    (_negative, "negative values in genes G6"),
    (_fraction, "non-integer values found in genes G5"),
    (_unknown_gene, "perturbed genes missing from var: NOPE (in NOPE+ctrl)"),
    (_few_cells, "G8+ctrl (1)"),
    (_duplicate_gene, "duplicate gene names: G3"),
    (_no_condition, "obs['condition']"),
    (_bad_name, "G0+G1+G2"),
]


@pytest.mark.parametrize(("edit", "needle"), BAD, ids=[f.__name__.strip("_") for f, _ in BAD])
def test_bad_input(tmp_path, edit, needle):
    src = counts_file(tmp_path / "bad.h5ad", edit=edit)
    code, output = run("data", "validate", src, "--expect", "counts", "--min-cells", "2")
    assert code == 1, output
    assert needle in output
    assert needle in " ".join(map(str, validate_adata(ad.read_h5ad(src), expect="counts").errors))
    out = tmp_path / "out.h5ad"
    code, output = run("data", "prepare", src, "--out", out, "--min-genes", "1")
    if edit is not _few_cells:  # prepare drops conditions with one cell (with a warning) instead
        assert code == 1, output
        assert "error:" in output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.h5ad"] + (["out.h5ad"] if out.exists() else []))


def test_log1p_expected_but_counts(tmp_path):
    src = counts_file(tmp_path / "raw.h5ad")
    code, output = run("data", "validate", src, "--expect", "log1p")
    assert code == 1
    assert "obs['cell_type']" in output
    assert "raw counts?" in output


def test_uns_entry_missing(tmp_path):
    src = counts_file(tmp_path / "raw.h5ad")
    out = tmp_path / "prepared.h5ad"
    assert run("data", "prepare", src, "--out", out, "--min-genes", "1")[0] == 0
    adata = ad.read_h5ad(out)
    del adata.uns[DE_KEY]["K562_G2+ctrl_1+1"]
    adata.write_h5ad(out)
    code, output = run("data", "validate", out)
    assert code == 1
    assert "uns['rank_genes_groups_cov_all']: no entry for condition_name K562_G2+ctrl_1+1" in output


def test_split_errors(tmp_path):
    src = counts_file(tmp_path / "raw.h5ad", edit=_no_condition)
    out = tmp_path / "split.json"
    code, output = run("data", "split", src, "--seed", "1", "--out", out)
    assert code == 1
    assert "obs key 'condition' missing" in output
    assert not out.exists()
    src = counts_file(tmp_path / "raw.h5ad")
    code, output = run("data", "split", src, "--seed", "1", "--kind", "combo", "--out", out)
    assert code == 2
    assert "--kind: 'combo' is not one of simulation, single" in output
    assert not out.exists()
    code, output = run("data", "prepare", tmp_path / "missing.h5ad", "--out", tmp_path / "x.h5ad")
    assert code == 1
    assert "missing.h5ad: no such file" in output


def test_prepared_file_is_group_and_other_readable(tmp_path):
    """Under umask 022 the prepared file (written via a 0600 temporary) ends up 0644, like any output."""
    src = counts_file(tmp_path / "raw.h5ad")
    out = tmp_path / "prepared.h5ad"
    old = os.umask(0o022)
    try:
        code, output = run("data", "prepare", src, "--out", out, "--min-genes", "1")
    finally:
        os.umask(old)
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
