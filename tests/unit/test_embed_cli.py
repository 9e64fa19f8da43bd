"""`pertadapt embed` end to end: random checkpoints saved in the published layouts, a tiny h5ad, the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from pertadapt.cli import app
from pertadapt.data.embed_io import read_counts_for_vocab
from pertadapt.models.backbones.aido_cell import AIDOCell, build_aido_cell
from pertadapt.models.backbones.scfoundation import SCFoundation, build_scfoundation

VOCAB = [f"GENE{i}" for i in range(20)]
runner = CliRunner()


def _text(output: str) -> str:
    """CLI output with rich's line wrapping and box drawing undone."""
    return " ".join(output.replace("│", " ").split())


def _h5ad(path, *, layer: bool, with_total: bool, gene_column: bool) -> tuple[np.ndarray, np.ndarray]:
    """5 cells over 17 vocabulary genes (shuffled) + 2 genes outside it; returns aligned counts and totals."""
    rng = np.random.default_rng(0)
    data_genes = [*VOCAB[3:], "OTHER1", "OTHER2"]
    rng.shuffle(data_genes)
    counts = rng.poisson(2.0, size=(5, len(data_genes))).astype(np.float32)
    counts[1] = 0.0
    counts[1, 0] = 4.0
    var = pd.DataFrame(index=[f"ENSG{i}" for i in range(len(data_genes))] if gene_column else data_genes)
    if gene_column:
        var["gene_name"] = data_genes
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(5)])
    totals = counts.sum(1) + (100.0 if with_total else 0.0)
    if with_total:
        obs["total_count"] = totals
    if layer:
        adata = ad.AnnData(X=np.log1p(counts), obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})
    else:
        adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.write_h5ad(path)
    aligned = np.zeros((5, len(VOCAB)), dtype=np.float32)
    for j, g in enumerate(data_genes):
        if g in VOCAB:
            aligned[:, VOCAB.index(g)] = counts[:, j]
    return aligned, totals


def _expected(model, aligned: np.ndarray, totals: np.ndarray) -> np.ndarray:
    x = np.log1p(aligned / np.maximum(totals, 1.0)[:, None] * 1e4).astype(np.float32)
    with torch.no_grad():
        return model.eval().encode(torch.from_numpy(x), torch.from_numpy(totals.astype(np.float32))).numpy()


def test_read_counts_aligns_by_name(tmp_path) -> None:
    aligned, totals = _h5ad(tmp_path / "d.h5ad", layer=True, with_total=True, gene_column=True)
    cells = read_counts_for_vocab(tmp_path / "d.h5ad", VOCAB)
    assert cells.source == "layers['counts']"
    assert cells.missing == ("GENE0", "GENE1", "GENE2")
    assert cells.n_dropped == 2
    np.testing.assert_array_equal(cells.counts.toarray(), aligned)
    np.testing.assert_array_equal(cells.total_count, totals)


def test_embed_aido_cell_counts_layer(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_aido_cell(checkpoint=None, genes=VOCAB, hidden_size=16, layers=2, heads=2)
    model.save_pretrained_dir(tmp_path / "ckpt")
    aligned, totals = _h5ad(tmp_path / "d.h5ad", layer=True, with_total=True, gene_column=True)
    out = tmp_path / "emb" / "aido.npy"
    res = runner.invoke(app, ["embed", "--backbone", "aido_cell", "--checkpoint", str(tmp_path / "ckpt"),
                              "--data", str(tmp_path / "d.h5ad"), "--out", str(out), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    emb = np.load(out)
    assert emb.dtype == np.float32
    assert emb.shape == (5, len(VOCAB), 16)
    loaded = AIDOCell.from_pretrained_dir(tmp_path / "ckpt")
    np.testing.assert_allclose(emb, _expected(loaded, aligned, totals), atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ["aido.npy"]  # no temporary left behind


def test_embed_aido_cell_intended_mode(tmp_path) -> None:
    torch.manual_seed(0)
    build_aido_cell(checkpoint=None, genes=VOCAB, hidden_size=16, layers=1, heads=2).save_pretrained_dir(tmp_path / "c")
    aligned, totals = _h5ad(tmp_path / "d.h5ad", layer=False, with_total=False, gene_column=False)
    out = tmp_path / "e.npy"
    res = runner.invoke(app, ["embed", "--backbone", "aido_cell", "--checkpoint", str(tmp_path / "c"), "--data",
                              str(tmp_path / "d.h5ad"), "--out", str(out), "--input-mode", "intended"])
    assert res.exit_code == 0, res.output
    loaded = AIDOCell.from_pretrained_dir(tmp_path / "c", input_mode="intended")
    np.testing.assert_allclose(np.load(out), _expected(loaded, aligned, totals), atol=1e-5)


def test_embed_scfoundation_raw_x(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_scfoundation(checkpoint=None, genes=VOCAB, hidden_size=16, layers=2, heads=2)
    model.save_pretrained_dir(tmp_path / "ckpt")
    aligned, totals = _h5ad(tmp_path / "d.h5ad", layer=False, with_total=False, gene_column=False)
    out = tmp_path / "sf.npy"
    res = runner.invoke(app, ["embed", "--backbone", "scfoundation", "--checkpoint",
                              str(tmp_path / "ckpt" / "models.ckpt"), "--data", str(tmp_path / "d.h5ad"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    loaded = SCFoundation.from_pretrained_dir(tmp_path / "ckpt")
    np.testing.assert_allclose(np.load(out), _expected(loaded, aligned, totals), atol=1e-5)


@pytest.mark.parametrize(("problem", "message", "code"), [
    ("vocab", "none of its", 1), ("normalised", "does not hold raw counts", 1),
    ("backbone", "no checkpoint loader", 2), ("not_h5ad", "not a readable .h5ad", 1)])
def test_embed_errors_leave_no_output(tmp_path, problem: str, message: str, code: int) -> None:
    torch.manual_seed(0)
    build_aido_cell(checkpoint=None, genes=VOCAB, hidden_size=8, layers=1, heads=1).save_pretrained_dir(tmp_path / "c")
    genes = ["X1", "X2"] if problem == "vocab" else VOCAB[:2]
    values = np.array([[0.5, 1.5], [2.0, 0.0]], dtype=np.float32) if problem == "normalised" else np.ones((2, 2))
    ad.AnnData(X=values.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "d.h5ad")
    if problem == "not_h5ad":
        (tmp_path / "d.h5ad").write_text("cell,GENE0\nc1,3\n")
    out = tmp_path / "e.npy"
    name = "learned" if problem == "backbone" else "aido_cell"  # tiny has a loader (pertadapt pretrain)
    res = runner.invoke(app, ["embed", "--backbone", name, "--checkpoint", str(tmp_path / "c"), "--data",
                              str(tmp_path / "d.h5ad"), "--out", str(out)])
    assert res.exit_code == code, res.output
    assert message in _text(res.output)
    assert "Traceback" not in res.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Payload:
    """Unpickling this creates ``path``: stands for arbitrary code in a crafted checkpoint."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_embed_refuses_pickle_only_checkpoint(tmp_path) -> None:
    """A pytorch_model.bin whose unpickling would run code: one-line refusal, exit 1, the code never runs."""
    torch.manual_seed(0)
    build_aido_cell(checkpoint=None, genes=VOCAB, hidden_size=8, layers=1, heads=1).save_pretrained_dir(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"encoder.ln.weight": _Payload(marker)}, tmp_path / "c" / "pytorch_model.bin")
    _h5ad(tmp_path / "d.h5ad", layer=True, with_total=True, gene_column=True)
    out = tmp_path / "e.npy"
    res = runner.invoke(app, ["embed", "--backbone", "aido_cell", "--checkpoint", str(tmp_path / "c"), "--data",
                              str(tmp_path / "d.h5ad"), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "pytorch_model.bin: refused to load: it refers to io.open; only tensors" in _text(res.output)
    assert "Traceback" not in res.output
    assert "UnpicklingError" not in res.output
    assert not marker.exists()
    assert not out.exists()


def test_embed_out_directory_is_a_usage_error(tmp_path) -> None:
    torch.manual_seed(0)
    build_aido_cell(checkpoint=None, genes=VOCAB, hidden_size=8, layers=1, heads=1).save_pretrained_dir(tmp_path / "c")
    _h5ad(tmp_path / "d.h5ad", layer=True, with_total=True, gene_column=True)
    (tmp_path / "out.npy").mkdir()
    res = runner.invoke(app, ["embed", "--backbone", "aido_cell", "--checkpoint", str(tmp_path / "c"), "--data",
                              str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "out.npy")])
    assert res.exit_code == 2, res.output
    assert "is a directory" in _text(res.output)
    assert list((tmp_path / "out.npy").iterdir()) == []
