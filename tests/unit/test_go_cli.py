"""`pertadapt go build` / `go coverage` on real bundled GO, with bad input exiting 2."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pertadapt.cli.main import app
from pertadapt.go import load_gene_graph, load_go_mask

GENES = ["TP53", "MDM2", "MDM4", "KRAS", "NRAS", "HRAS", "HK1", "HK2", "GPI", "ARNTL"]


@pytest.fixture
def h5ad(tmp_path: Path) -> Path:
    obs = pd.DataFrame({"condition": ["ctrl", "TP53+ctrl", "KRAS+NRAS", "MT-TL1+ctrl"]},
                       index=[f"c{i}" for i in range(4)])
    var = pd.DataFrame({"gene_name": GENES}, index=[f"ENSG{i}" for i in range(len(GENES))])
    path = tmp_path / "toy.h5ad"
    anndata.AnnData(np.zeros((4, len(GENES)), dtype=np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def test_build_from_genes_and_data(tmp_path: Path, h5ad: Path) -> None:
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(GENES) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["go", "build", "--genes", str(genes), "--out", str(tmp_path / "o"), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    graph, mask = load_gene_graph(tmp_path / "o" / "gene_graph"), load_go_mask(tmp_path / "o" / "go_mask")
    assert graph.genes == tuple(GENES)
    assert mask.genes == tuple(GENES)
    assert graph.n_edges <= len(GENES) * 4
    res = runner.invoke(app, ["go", "build", "--from-data", str(h5ad), "--out", str(tmp_path / "d"),
                              "--mask-kind", "none"])
    assert res.exit_code == 0, res.output
    assert load_go_mask(tmp_path / "d" / "go_mask").csr is None


def test_build_bad_input_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    dup = tmp_path / "dup.txt"
    dup.write_text("TP53\nKRAS\nTP53\n")
    res = runner.invoke(app, ["go", "build", "--genes", str(dup), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("TP53\ntp53\nNOT_A_GENE_7\n")
    res = runner.invoke(app, ["go", "build", "--genes", str(unknown), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["go", "build", "--genes", str(unknown), "--out", str(tmp_path / "x"),
                              "--allow-unknown"])
    assert res.exit_code == 0, res.output
    nogo = tmp_path / "nogo.txt"
    nogo.write_text("MT-TL1\nNOT_A_GENE_7\n")
    res = runner.invoke(app, ["go", "build", "--genes", str(nogo), "--out", str(tmp_path / "x"), "--allow-unknown"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["go", "build", "--genes", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2


def test_coverage_table(h5ad: Path) -> None:
    res = CliRunner().invoke(app, ["go", "coverage", str(h5ad)])
    assert res.exit_code == 0, res.output
    assert "10 / 10" in res.output  # all vocabulary genes (ARNTL via its alias BMAL1)
    assert "3 / 4" in res.output  # TP53, KRAS, NRAS yes; MT-TL1 no
    assert "MT-TL1" in res.output


@pytest.mark.parametrize("cmd", [["go", "--help"], ["go", "build", "--help"], ["go", "coverage", "--help"]])
def test_help(cmd: list[str]) -> None:
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 0
