"""`pertadapt go` on bad input: one message naming the file, exit 2 for options and gene lists, 1 for data."""

from __future__ import annotations

from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pertadapt.cli.main import app


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # rich does not wrap the one-line messages


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    obs = pd.DataFrame({"condition": ["ctrl", "TP53+ctrl"]}, index=["a", "b"])
    var = pd.DataFrame({"gene_name": ["TP53", "KRAS", "NRAS"]}, index=["e1", "e2", "e3"])
    good = tmp_path / "good.h5ad"
    anndata.AnnData(np.zeros((2, 3), dtype=np.float32), obs=obs, var=var).write_h5ad(good)
    out = {"good": good, "text": tmp_path / "text.h5ad", "truncated": tmp_path / "truncated.h5ad",
           "plain_hdf5": tmp_path / "plain.h5ad", "genes": tmp_path / "genes.txt", "binary": tmp_path / "binary.txt"}
    out["text"].write_text("condition,gene\nctrl,TP53\n")
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with h5py.File(out["plain_hdf5"], "w") as f:
        f["x"] = np.arange(3)
    out["genes"].write_text("TP53\nKRAS\nNRAS\n")
    out["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    return out


def _run(args: list[str]) -> tuple[int, list[str], str]:
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, SystemExit), res.exception  # no other exception escaped
    errors = [line for line in res.output.splitlines() if "ERROR" in line]
    return res.exit_code, errors, res.output


@pytest.mark.parametrize("bad", ["text", "truncated", "plain_hdf5"])
@pytest.mark.parametrize("command", ["coverage", "build"])
def test_unreadable_h5ad_is_a_data_error(files: dict[str, Path], tmp_path: Path, bad: str, command: str) -> None:
    out = tmp_path / "out"
    args = ["go", "coverage", str(files[bad])] if command == "coverage" else \
        ["go", "build", "--from-data", str(files[bad]), "--out", str(out)]
    code, errors, output = _run(args)
    assert code == 1
    assert len(errors) == 1
    assert str(files[bad]) in errors[0]
    assert "not a readable .h5ad" in errors[0]
    assert "Traceback" not in output
    assert not out.exists()


def test_missing_h5ad_is_a_data_error(tmp_path: Path) -> None:
    code, errors, _ = _run(["go", "coverage", str(tmp_path / "absent.h5ad")])
    assert code == 1
    assert len(errors) == 1
    assert "absent.h5ad: no such h5ad file" in errors[0]


@pytest.mark.parametrize(("extra", "match"), [
    (["--mask-kind", "dense"], "mask kind 'dense'"),
    (["--threshold", "1.5"], "threshold must be in [0, 1)"),
    (["--top-k", "0"], "top_k must be a positive integer"),
    (["--source", "obo"], "needs both an OBO file"),
    (["--source", "internet"], "unknown GO source 'internet'"),
])
def test_bad_options_are_config_errors_checked_first(tmp_path: Path, extra: list[str], match: str) -> None:
    # the gene list does not exist: the option error is reported before any file is read
    code, errors, _ = _run(["go", "build", "--genes", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o"),
                            *extra])
    assert code == 2
    assert len(errors) == 1
    assert match in errors[0]
    assert not (tmp_path / "o").exists()


def test_genes_and_data_together_is_a_config_error(files: dict[str, Path], tmp_path: Path) -> None:
    code, errors, _ = _run(["go", "build", "--genes", str(files["genes"]), "--from-data", str(files["good"]),
                            "--out", str(tmp_path / "o")])
    assert code == 2
    assert "exactly one of" in errors[0]


def test_binary_gene_list_is_a_config_error(files: dict[str, Path], tmp_path: Path) -> None:
    code, errors, output = _run(["go", "build", "--genes", str(files["binary"]), "--out", str(tmp_path / "o")])
    assert code == 2
    assert len(errors) == 1
    assert f"{files['binary']}: not a UTF-8 text gene list" in errors[0]
    assert "Traceback" not in output
    code, errors, _ = _run(["go", "coverage", str(files["good"]), "--vocab", str(files["binary"])])
    assert code == 2
    assert str(files["binary"]) in errors[0]


def test_malformed_gaf_is_a_data_error(files: dict[str, Path], tmp_path: Path) -> None:
    obo, gaf = tmp_path / "go.obo", tmp_path / "a.gaf"
    obo.write_text("format-version: 1.2\n\n[Term]\nid: GO:0000001\nname: root\nnamespace: biological_process\n")
    gaf.write_text("!gaf-version: 2.2\nUniProtKB\tP1\tTP53\n")
    code, errors, _ = _run(["go", "build", "--genes", str(files["genes"]), "--out", str(tmp_path / "o"),
                            "--source", "obo", "--obo", str(obo), "--gaf", str(gaf)])
    assert code == 1
    assert f"{gaf}:2:" in errors[0]
    code, errors, _ = _run(["go", "build", "--genes", str(files["genes"]), "--out", str(tmp_path / "o"),
                            "--source", "obo", "--obo", str(tmp_path / "absent.obo"), "--gaf", str(gaf)])
    assert code == 1
    assert "absent.obo: no such file" in errors[0]
    assert not (tmp_path / "o").exists()


def test_out_is_an_existing_file(files: dict[str, Path]) -> None:
    code, errors, _ = _run(["go", "build", "--genes", str(files["genes"]), "--out", str(files["genes"])])
    assert code == 2
    assert f"--out {files['genes']}: an existing file" in errors[0]
    assert files["genes"].read_text() == "TP53\nKRAS\nNRAS\n"
