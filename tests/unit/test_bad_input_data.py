"""Every malformed input of `pertadapt data prepare|validate|split` and `pertadapt simulate`.

Each case checks the exit code (2 for a bad option or gene list, 1 for bad data), that the one-line
message names the file, option, key or gene, that no traceback is printed, and that nothing is left
behind (no output file, no temporary, no directory). Option errors are given an unreadable input
file as well: they must be reported first, which proves they are checked before any data is read.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from pertadapt.cli import app
from pertadapt.data.keys import CONDITION, GENE_NAME

GENES = [f"G{i}" for i in range(6)]
CONDS = {"ctrl": 6, "G0+ctrl": 4, "G1+ctrl": 4, "G2+G3": 3}

runner = CliRunner()


def _write_counts(path: Path, edit=None) -> None:
    """Raw Poisson counts (cells x genes) with ``obs['condition']``; ``edit(adata)`` may break them first."""
    cond = np.repeat(list(CONDS), list(CONDS.values()))
    x = np.random.default_rng(0).poisson(4.0, size=(len(cond), len(GENES))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({CONDITION: cond}, index=[f"c{i}" for i in range(len(cond))]),
                       var=pd.DataFrame({GENE_NAME: GENES}, index=GENES))
    if edit is not None:
        edit(adata)
    adata.write_h5ad(path)


def _nan(a: ad.AnnData) -> None:
    a.X[1, 4] = np.nan


def _negative(a: ad.AnnData) -> None:
    a.X[1, 5] = -2.0


def _no_condition(a: ad.AnnData) -> None:
    del a.obs[CONDITION]


def _no_control(a: ad.AnnData) -> None:
    a.obs[CONDITION] = a.obs[CONDITION].replace({"ctrl": "G5+ctrl"})


def _triple(a: ad.AnnData) -> None:
    a.obs[CONDITION] = a.obs[CONDITION].replace({"G2+G3": "G2+G3+G4"})


def _no_cells(a: ad.AnnData) -> None:
    a._inplace_subset_obs(np.zeros(a.n_obs, dtype=bool))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Every input file of the cases below, in ``tmp_path``."""
    edits = {"raw": None, "nan": _nan, "negative": _negative, "nocond": _no_condition, "noctrl": _no_control,
             "triple": _triple, "nocells": _no_cells}
    files = {name: tmp_path / f"{name}.h5ad" for name in edits}
    for name, edit in edits.items():
        _write_counts(files[name], edit)
    files["text"] = tmp_path / "text.h5ad"
    files["text"].write_text("this is not HDF5\n")
    files["empty"] = tmp_path / "empty.h5ad"
    files["empty"].write_bytes(b"")
    files["trunc"] = tmp_path / "trunc.h5ad"
    files["trunc"].write_bytes(files["raw"].read_bytes()[:2000])
    files["plain"] = tmp_path / "plain.h5ad"
    with h5py.File(files["plain"], "w") as f:
        f["numbers"] = np.arange(3)
    files["dir"] = tmp_path / "folder.h5ad"
    files["dir"].mkdir()
    files["missing"] = tmp_path / "missing.h5ad"
    for name, content in (("binvocab", b"\xff\xfe\x00\x81G1\n"), ("dupvocab", b"G0\nG1\nG1\n"),
                          ("emptyvocab", b"\n# nothing\n"), ("shortvocab", b"G1\nG2\nG3\n")):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_bytes(content)
    files["file"] = tmp_path / "plainfile"
    files["file"].write_text("x")
    return files


#: (id, argv with {placeholders} for ``inputs`` and {out}, exit code, text the message must hold).
CASES = [
    # prepare: options (exit 2), given an unreadable input to prove they are checked first
    ("prepare-target-sum-0", "data prepare {text} --out {out} --target-sum 0", 2, "--target-sum: expected a positive"),
    ("prepare-target-sum-neg", "data prepare {text} --out {out} --target-sum -100", 2, "got -100.0"),
    ("prepare-target-sum-nan", "data prepare {text} --out {out} --target-sum nan", 2, "--target-sum"),
    ("prepare-n-de-neg", "data prepare {text} --out {out} --n-de -5", 2, "--n-de: expected a positive integer, got -5"),
    ("prepare-n-de-0", "data prepare {text} --out {out} --n-de 0", 2, "--n-de"),
    ("prepare-min-genes-neg", "data prepare {text} --out {out} --min-genes -1", 2, "--min-genes"),
    ("prepare-cell-type-empty", "data prepare {text} --out {out} --cell-type ''", 2, "--cell-type"),
    ("prepare-delimiter-empty", "data prepare {text} --out {out} --perturbation-column gene --delimiter ''", 2,
     "--delimiter: expected a non-empty separator"),
    ("prepare-control-label-empty", "data prepare {text} --out {out} --perturbation-column gene --control-label ''",
     2, "--control-label"),
    ("prepare-out-dir", "data prepare {text} --out {dir}", 2, "folder.h5ad is a directory"),
    ("prepare-out-under-file", "data prepare {text} --out {file}/x.h5ad", 2, "plainfile is a file"),
    ("prepare-vocab-binary", "data prepare {text} --out {out} --vocab {binvocab}", 2, "binvocab.txt: not a UTF-8"),
    ("prepare-vocab-dup", "data prepare {text} --out {out} --vocab {dupvocab}", 2, "dupvocab.txt: duplicate gene names G1"),
    ("prepare-vocab-empty", "data prepare {text} --out {out} --vocab {emptyvocab}", 2, "emptyvocab.txt: the gene list is empty"),
    ("prepare-vocab-missing", "data prepare {text} --out {out} --vocab {missing}", 2, "missing.h5ad: no such gene list"),
    ("prepare-vocab-dir", "data prepare {text} --out {out} --vocab {dir}", 2, "folder.h5ad: no such gene list"),
    # prepare: data (exit 1)
    ("prepare-not-hdf5", "data prepare {text} --out {out}", 1, "text.h5ad: not a readable .h5ad file"),
    ("prepare-empty-file", "data prepare {empty} --out {out}", 1, "empty.h5ad: not a readable .h5ad file"),
    ("prepare-truncated", "data prepare {trunc} --out {out}", 1, "trunc.h5ad: not a readable .h5ad file"),
    ("prepare-not-anndata", "data prepare {plain} --out {out}", 1, "plain.h5ad: not a readable .h5ad file"),
    ("prepare-dir", "data prepare {dir} --out {out}", 1, "folder.h5ad: not a file"),
    ("prepare-missing", "data prepare {missing} --out {out}", 1, "missing.h5ad: no such file"),
    ("prepare-nan", "data prepare {nan} --out {out} --min-genes 1", 1, "non-finite values (NaN/inf) in genes G4"),
    ("prepare-negative", "data prepare {negative} --out {out} --min-genes 1", 1, "negative values in genes G5"),
    ("prepare-no-condition", "data prepare {nocond} --out {out} --min-genes 1", 1, "obs['condition']"),
    ("prepare-bad-condition", "data prepare {triple} --out {out} --min-genes 1", 1, "triple.h5ad: "),
    ("prepare-no-cells", "data prepare {nocells} --out {out} --min-genes 1", 1, "nocells.h5ad: "),
    ("prepare-no-control", "data prepare {noctrl} --out {out} --min-genes 1", 1, "no control cells"),
    ("prepare-no-column", "data prepare {raw} --out {out} --perturbation-column guide", 1, "obs key 'guide'"),
    ("prepare-vocab-misses-target", "data prepare {raw} --out {out} --vocab {shortvocab} --min-genes 1", 1,
     "perturbed genes missing from the vocabulary: G0"),
    ("prepare-min-genes-too-high", "data prepare {raw} --out {out} --min-genes 100", 1, "no cell has >= 100"),
    # validate
    ("validate-min-cells-0", "data validate {text} --min-cells 0", 2, "--min-cells: expected a positive integer"),
    ("validate-expect", "data validate {text} --expect raw", 2, "--expect: 'raw' is not one of counts, log1p"),
    ("validate-not-hdf5", "data validate {text}", 1, "text.h5ad: not a readable .h5ad file"),
    ("validate-truncated", "data validate {trunc}", 1, "trunc.h5ad: not a readable .h5ad file"),
    ("validate-not-anndata", "data validate {plain}", 1, "plain.h5ad: not a readable .h5ad file"),
    ("validate-dir", "data validate {dir}", 1, "folder.h5ad: not a file"),
    ("validate-missing", "data validate {missing}", 1, "missing.h5ad: no such file"),
    ("validate-nan", "data validate {nan}", 1, "non-finite values (NaN/inf) in genes G4"),
    ("validate-no-cells", "data validate {nocells}", 1, "empty matrix (0 cells x 6 genes)"),
    ("validate-bad-condition", "data validate {triple}", 1, "G2+G3+G4"),
    # split
    ("split-seed-neg", "data split {text} --seed -1 --out {out}", 2, "--seed: expected an integer in [0, 4294967295]"),
    ("split-seed-big", "data split {text} --seed 4294967296 --out {out}", 2, "--seed"),
    ("split-kind", "data split {text} --seed 1 --kind combo --out {out}", 2, "--kind: 'combo'"),
    ("split-train-frac", "data split {text} --seed 1 --train-gene-frac 1 --out {out}", 2, "--train-gene-frac"),
    ("split-seen2-frac", "data split {text} --seed 1 --combo-seen2-train-frac -0.5 --out {out}", 2,
     "--combo-seen2-train-frac"),
    ("split-test-frac", "data split {text} --seed 1 --kind single --test-frac 2 --out {out}", 2, "--test-frac"),
    ("split-out-dir", "data split {text} --seed 1 --out {dir}", 2, "folder.h5ad is a directory"),
    ("split-not-hdf5", "data split {text} --seed 1 --out {out}", 1, "text.h5ad: not a readable .h5ad file"),
    ("split-truncated", "data split {trunc} --seed 1 --out {out}", 1, "trunc.h5ad: not a readable .h5ad file"),
    ("split-not-anndata", "data split {plain} --seed 1 --out {out}", 1, "plain.h5ad: not a readable .h5ad file"),
    ("split-dir", "data split {dir} --seed 1 --out {out}", 1, "folder.h5ad: not a file"),
    ("split-bad-condition", "data split {triple} --seed 1 --out {out}", 1, "triple.h5ad: condition 'G2+G3+G4'"),
    ("split-no-condition", "data split {nocond} --seed 1 --out {out}", 1, "nocond.h5ad: obs key 'condition' missing"),
    # simulate: every mistake is an option error
    ("simulate-out-dir", "simulate --out {dir}", 2, "folder.h5ad is a directory"),
    ("simulate-out-under-file", "simulate --out {file}/x.h5ad", 2, "plainfile is a file"),
    ("simulate-seed-neg", "simulate --out {out} --seed -1", 2, "--seed"),
    ("simulate-preset", "simulate --out {out} --preset huge", 2, "unknown preset 'huge'"),
    ("simulate-set-unknown", "simulate --out {out} --set n_cells=5", 2, "n_cells: unknown simulator parameter"),
    ("simulate-set-malformed", "simulate --out {out} --set n_genes", 2, "expected key=value"),
    ("simulate-set-type", "simulate --out {out} --set n_genes=many", 2, "n_genes: cannot read 'many' as int"),
    ("simulate-set-range", "simulate --out {out} --set n_genes=-3", 2, "n_genes: expected a positive integer"),
    ("simulate-set-tuple-length", "simulate --out {out} --set kd_efficiency=0.5", 2,
     "kd_efficiency: expected 2 comma-separated numbers"),
    ("simulate-set-tuple-type", "simulate --out {out} --set gi_mix=a,b,c,d,e", 2, "gi_mix: expected 5"),
]


def _argv(template: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return shlex.split(template.format(out=out, **{k: str(v) for k, v in inputs.items()}))


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("template", "code", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input(inputs, tmp_path, template, code, needle):
    out = tmp_path / "out" / "result.h5ad"
    before = _listing(tmp_path)
    result = runner.invoke(app, _argv(template, inputs, out))
    output = result.output
    assert result.exit_code == code, output
    assert needle in output, output
    assert "Traceback" not in output
    assert isinstance(result.exception, SystemExit), result.exception  # an exit, not an escaped exception
    assert _listing(tmp_path) == before  # no output, no temporary, no directory


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("template", "code", "needle"), [
    ("data prepare {text} --out {out} --n-de -5", 2, "--n-de: expected a positive integer, got -5"),
    ("data prepare {trunc} --out {out}", 1, "trunc.h5ad: not a readable .h5ad file"),
], ids=["option", "data"])
def test_console_script_exit_codes(inputs, tmp_path, template, code, needle):
    """The real entry point (``pertadapt.cli.main:main``): exit code, message on stderr, no traceback."""
    out = tmp_path / "out.h5ad"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "pertadapt.cli", *_argv(template, inputs, out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()
