"""``model.gene_space``: measured genes vs the whole vocabulary, on the demo preset in a made-up vocabulary.

The vocabulary file is the demo preset prepared against its genes interleaved with two zero-filled genes
each (``data prepare --vocab`` in small): 240 measured genes out of 720.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from pertadapt.config import ConfigError, load_run_config
from pertadapt.data.dataset import read_perturb_data
from pertadapt.data.keys import MEASURED
from pertadapt.data.prepare import prepare_adata
from pertadapt.data.simulate import SIM_KEY, sim_truth, simulate
from pertadapt.models.build import build_loss
from pertadapt.train.run import build_run_engine, run
from pertadapt.train.setup import prepare_run_data

REPO = Path(__file__).resolve().parents[2]


def _cfg(path: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={path}", *overrides])


@pytest.fixture(scope="module")
def vocab_h5ad(demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    a = ad.read_h5ad(demo_h5ad)
    genes = list(map(str, a.var_names))
    vocab = [g for i, gene in enumerate(genes) for g in (gene, f"ZF{i}a", f"ZF{i}b")]
    raw = ad.AnnData(X=a.layers["counts"], obs=a.obs[["condition"]].copy(), var=a.var[[]].copy())
    out = tmp_path_factory.mktemp("vocab") / "demo_vocab.h5ad"
    prepare_adata(raw, vocabulary=vocab, min_genes=0).write_h5ad(out)
    return out


def test_prepared_file_flags_measured_genes(vocab_h5ad: Path, demo_h5ad: Path) -> None:
    var = ad.read_h5ad(vocab_h5ad, backed="r").var
    assert var[MEASURED].dtype == bool
    assert var.index[var[MEASURED]].tolist() == list(map(str, ad.read_h5ad(demo_h5ad, backed="r").var_names))
    assert not var[MEASURED][var.index.str.startswith("ZF")].any()
    data = read_perturb_data(vocab_h5ad)
    assert data.measured is not None
    assert int(data.measured.sum()) == 240
    assert len(data.genes) == 720
    assert read_perturb_data(demo_h5ad).measured is None  # every gene measured: no flags kept


def test_measured_view_is_the_measured_columns(vocab_h5ad: Path) -> None:
    full = read_perturb_data(vocab_h5ad)
    view = full.measured_only()
    cols = full.measured_positions
    assert view.genes == tuple(full.genes[i] for i in cols)
    cells = np.array([5, 1, 5, 40])
    np.testing.assert_array_equal(view.rows(cells).toarray(), full.rows(cells).toarray()[:, cols])
    np.testing.assert_array_equal(view.input_rows(cells).toarray(), full.rows(cells).toarray())
    np.testing.assert_allclose(view.ctrl_mean, full.ctrl_mean[cols])
    for c, idx in full.de_idx.items():  # DE rankings keep their order among the measured genes
        ranked = [full.genes[i] for i in idx if full.measured[i]]
        assert [view.genes[i] for i in view.de_idx[c]] == ranked


def test_fm_output_on_measured_genes_same_in_both_spaces(vocab_h5ad: Path) -> None:
    outs = {}
    for space in ("measured", "vocabulary"):
        cfg = _cfg(vocab_h5ad, f"model.gene_space={space}", "backbone.embedding_cache=off")
        rd = prepare_run_data(cfg)
        engine, _ = build_run_engine(cfg, rd)
        model = engine.model
        batch = rd.train.batch(np.arange(8))
        with torch.no_grad():
            outs[space] = (model._embed(batch), batch, model(batch), rd)
    e_m, b_m, pred_m, rd_m = outs["measured"]
    e_v, b_v, pred_v, rd_v = outs["vocabulary"]
    cols = rd_v.data.measured_positions
    assert e_m.shape[1] == 240
    assert e_v.shape[1] == 720
    torch.testing.assert_close(e_m, e_v[:, cols], rtol=0, atol=0)
    # predictions, targets and the loss's inputs are over the measured genes only
    assert pred_m.shape == (8, 240)
    assert b_m.y.shape == (8, 240)
    assert b_m.nz_mask.shape == (8, 240)
    assert b_m.x_input.shape == (8, 720)
    assert b_v.x_input is None
    torch.testing.assert_close(b_m.y, b_v.y[:, cols])
    assert int(b_m.de_idx.max()) < 240
    assert rd_m.inputs.genes == rd_m.data.genes
    assert len(rd_m.inputs.genes) == 240
    assert len(rd_m.inputs.ctrl_mean) == 240
    assert rd_m.inputs.mask_indptr.shape == (241,)
    loss = build_loss(_cfg(vocab_h5ad), rd_m.inputs)(pred_m, b_m)
    assert torch.isfinite(loss.total)



def test_embedding_cache_stores_the_measured_rows(vocab_h5ad: Path, tmp_path: Path) -> None:
    embedded = {}
    for cache in ("on", "off"):
        cfg = _cfg(vocab_h5ad, f"backbone.embedding_cache={cache}")
        rd = prepare_run_data(cfg)
        engine, info = build_run_engine(cfg, rd, cache_root=tmp_path)
        with torch.no_grad():
            embedded[cache] = engine.model._embed(rd.train.batch(np.arange(8)))
    assert info["used"] is False
    table = np.load(next(tmp_path.rglob("*.npy")), mmap_mode="r")
    assert table.shape[1] == 240  # the measured genes' rows only
    torch.testing.assert_close(embedded["on"], embedded["off"])


def test_runs_report_measured_metrics_and_vocabulary_numbers(vocab_h5ad: Path, tmp_path: Path) -> None:
    measured = run(_cfg(vocab_h5ad), tmp_path / "m")
    vocab = run(_cfg(vocab_h5ad, "model.gene_space=vocabulary"), tmp_path / "v")
    assert not any("vocab_" in k for k in measured)
    assert {"test_vocab_mse", "test_vocab_mse_de", "val_vocab_mse"} <= set(vocab)
    assert vocab["test_vocab_mse"] < vocab["test_mse"]  # the zero-filled genes are predicted ~0: easy
    pred = ad.read_h5ad(tmp_path / "m" / "test_predictions.h5ad")
    assert pred.n_vars == 240
    assert not pred.var_names.str.startswith("ZF").any()
    assert ad.read_h5ad(tmp_path / "v" / "test_predictions.h5ad").n_vars == 720
    for name, space in (("m", "measured"), ("v", "vocabulary")):
        assert json.loads((tmp_path / name / "provenance.json").read_text())["gene_space"] == space


def test_without_zero_filled_genes_both_spaces_give_identical_metrics(demo_h5ad: Path, tmp_path: Path) -> None:
    measured = run(_cfg(demo_h5ad), tmp_path / "m")
    vocab = run(_cfg(demo_h5ad, "model.gene_space=vocabulary"), tmp_path / "v")
    assert measured == vocab
    assert not any("vocab_" in k for k in vocab)


def test_unknown_gene_space_is_a_config_error(demo_h5ad: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.gene_space: expected one of measured, vocabulary, got 'all'"):
        _cfg(demo_h5ad, "model.gene_space=all")


def test_simulate_in_a_vocabulary_layout() -> None:
    plain = simulate("demo", 0, n_control=60, cells_per_condition=8)
    vocab = ["ZZ1", *map(str, plain.var_names), "ZZ2"]
    laid = simulate("demo", 0, vocabulary=vocab, n_control=60, cells_per_condition=8)
    assert list(laid.var_names) == vocab
    assert laid.var[MEASURED].tolist() == [False, *[True] * plain.n_vars, False]
    assert bool(plain.var[MEASURED].all())
    np.testing.assert_allclose(laid.X[:, 1:-1].toarray(), plain.X.toarray(), rtol=1e-6)
    assert SIM_KEY in laid.uns
    truth = sim_truth(laid, laid.var_names[laid.var[MEASURED].to_numpy()])
    np.testing.assert_allclose(truth.true_mean, sim_truth(plain).true_mean)
    with pytest.raises(ValueError, match="'ZZ1' was not simulated"):
        sim_truth(laid)


def test_baseline_scores_the_measured_genes_in_both_spaces(vocab_h5ad: Path, tmp_path: Path) -> None:
    measured = run(_cfg(vocab_h5ad, "model.name=baseline_mean"), tmp_path / "m")
    vocab = run(_cfg(vocab_h5ad, "model.name=baseline_mean", "model.gene_space=vocabulary"), tmp_path / "v")
    # per-gene means: the same predictions on the measured genes, so the same metrics there
    assert {k: v for k, v in vocab.items() if "vocab_" not in k} == pytest.approx(measured, rel=1e-6)
    assert "test_vocab_mse" in vocab
