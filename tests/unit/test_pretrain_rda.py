"""`objective.read_depth: rda` (scFoundation's read-depth-aware objective) in `pertadapt pretrain`: the input is a
binomial thinning of the raw counts, the depth tokens carry the original (T) and the thinned (S) total, the
default `full` is what it was, an `rda` pretraining runs through the CLI and loads, and bad values are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pertadapt.cli import app
from pertadapt.config.components import ScFoundationBackbone
from pertadapt.config.errors import ConfigError
from pertadapt.config.pretrain import load_pretrain_config
from pertadapt.data.cells import downsample_counts, read_cells, read_depth_input
from pertadapt.models.backbones import build_backbone
from pertadapt.models.backbones.aido_cell import build_aido_cell
from pertadapt.models.backbones.scfoundation import build_scfoundation
from pertadapt.models.pretrain import MaskedValueModel
from pertadapt.train.pretrain import MODEL_CARD_JSON, _step_batch, masked_batch, pretrain, read_model_card

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "pretrain_demo.yaml"
SCF = ["backbone.name=scfoundation", "backbone.hidden_size=8", "backbone.layers=1", "backbone.heads=1",
       "backbone.random_init=true"]
runner = CliRunner()


def test_downsample_counts_thins_some_cells_binomially() -> None:
    own = np.random.default_rng(0).poisson(3.0, size=(4000, 50))
    rng = np.random.default_rng(1)
    thinned = downsample_counts(own, rng, 0.5, 2.0, 6.0)
    assert thinned.dtype == np.int64
    assert (thinned <= own).all()
    assert (thinned >= 0).all()
    changed = (thinned != own).any(axis=1)
    assert changed.mean() == pytest.approx(0.5, abs=0.03)  # rda_prob
    ratio = thinned[changed].sum(axis=1) / own[changed].sum(axis=1)
    assert ratio.mean() == pytest.approx(2.0 / 8.0, abs=0.02)  # E[Beta(2, 6)]
    assert ratio.max() < 1.0
    assert np.array_equal(downsample_counts(own, np.random.default_rng(1), 0.0, 2.0, 6.0), own)  # never
    assert (downsample_counts(own, np.random.default_rng(1), 1.0, 2.0, 6.0) != own).any(axis=1).mean() > 0.99
    uniform = downsample_counts(own, np.random.default_rng(1), 1.0, 1.0, 1.0)
    assert (uniform.sum(axis=1) / own.sum(axis=1)).mean() == pytest.approx(0.5, abs=0.02)  # E[Beta(1, 1)]
    # the same generator state draws the same thinning (resume stays bit-exact)
    assert np.array_equal(downsample_counts(own, np.random.default_rng(1), 0.5, 2.0, 6.0), thinned)
    # a cell thinned to nothing keeps its own counts (its source depth would be log10(0))
    single = np.array([[1, 0, 0], [0, 0, 0]])
    assert np.array_equal(downsample_counts(single, np.random.default_rng(0), 1.0, 1e-3, 1e3), single)


def test_read_depth_input_is_the_thinned_cell_normalised_like_x(demo_h5ad) -> None:
    import anndata as ad

    cells = read_cells(demo_h5ad, counts=True)
    assert cells.counts is not None
    assert cells.target_sum == pytest.approx(float(ad.read_h5ad(demo_h5ad).uns["pertadapt_prepare"]["target_sum"]))
    # X is log1p(counts / total · target_sum): the counts read back are the ones X was made of
    own = cells.counts.toarray()
    np.testing.assert_allclose(np.log1p(own / own.sum(axis=1, keepdims=True) * cells.target_sum), cells.x,
                               rtol=1e-5, atol=1e-6)
    rows = np.arange(0, 400, 3)
    x, source = read_depth_input(cells, rows, np.random.default_rng(5), 0.5, 1.0, 1.0)
    thinned = downsample_counts(own[rows], np.random.default_rng(5), 0.5, 1.0, 1.0)
    assert (thinned <= own[rows]).all()
    changed = (thinned != own[rows]).any(axis=1)
    assert 0.3 < changed.mean() < 0.7
    np.testing.assert_array_equal(source[changed], thinned[changed].sum(axis=1))  # S = the thinned total
    assert (source[changed] < cells.total_count[rows][changed]).all()
    np.testing.assert_array_equal(source[~changed], cells.total_count[rows][~changed])  # unchanged: S = T
    np.testing.assert_array_equal(x[~changed], cells.x[rows][~changed])
    expected = np.log1p(thinned[changed] / thinned[changed].sum(axis=1, keepdims=True) * cells.target_sum)
    np.testing.assert_allclose(x[changed], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without their counts"):
        read_depth_input(read_cells(demo_h5ad), rows, np.random.default_rng(5), 0.5, 1.0, 1.0)


def test_rda_changes_the_batch_and_full_keeps_it(demo_h5ad) -> None:
    cells = read_cells(demo_h5ad, counts=True)
    train = np.arange(360)
    full = load_pretrain_config(DEMO, [*SCF, "optim.batch_size=64", "optim.micro_batch_size=64"])
    rda = load_pretrain_config(DEMO, [*SCF, "optim.batch_size=64", "optim.micro_batch_size=64",
                                      "objective.read_depth=rda"])
    assert full.objective.read_depth == "full"
    a, b = _step_batch(full, cells, train, 3, 0.0), _step_batch(rda, cells, train, 3, 0.0)
    # full: the batch of before (the same draws, the cells themselves as input, no source depth)
    rng = np.random.default_rng([full.seed, 3])
    rows = rng.choice(train, size=64, replace=False)
    mask = rng.random((64, 240)) < full.objective.mask_ratio
    before = masked_batch(cells, rows, mask, 0.0)
    assert a.source_total is None
    for t_a, t_before in zip((a.x, a.total_count, a.target, a.mask), (before.x, before.total_count, before.target,
                                                                       before.mask), strict=True):
        assert torch.equal(t_a, t_before)
    # rda: the same cells, mask, target and T; the input is the down-sampled cell with its total S
    assert torch.equal(b.mask, a.mask)
    assert torch.equal(b.target, a.target)
    assert torch.equal(b.total_count, torch.from_numpy(cells.total_count[rows]))
    assert b.source_total is not None
    down = b.source_total < b.total_count
    assert 0.3 < float(down.float().mean()) < 0.7
    assert torch.equal(b.source_total[~down], b.total_count[~down])
    x_in, source = read_depth_input(cells, rows, rng, 0.5, 1.0, 1.0)  # the batch generator's next draws
    assert torch.equal(b.source_total, torch.from_numpy(source))
    assert torch.equal(b.x, torch.from_numpy(x_in).masked_fill(b.mask, 0.0))
    assert not torch.equal(b.x[down], a.x[down])
    # each unmasked input value is a thinned count of the cell: ≤ its own count, and sums to at most S
    counts_in = torch.expm1(b.x.double()) * b.source_total.double()[:, None] / cells.target_sum
    own = torch.from_numpy(cells.counts[rows].toarray()).double()
    keep = ~b.mask
    assert bool((counts_in[keep] <= own[keep] + 1e-3).all())
    torch.testing.assert_close(counts_in[keep], counts_in[keep].round(), atol=2e-3, rtol=0)
    assert bool(((counts_in * keep).sum(dim=1) <= b.source_total.double() + 1e-2).all())
    # the same (seed, step) draws the same down-sampling (a resumed run sees the same batches)
    again = _step_batch(rda, cells, train, 3, 0.0)
    assert torch.equal(again.x, b.x)
    assert torch.equal(again.source_total, b.source_total)
    assert not torch.equal(_step_batch(rda, cells, train, 4, 0.0).source_total, b.source_total)
    # rda_prob=0: nothing is down-sampled
    never = load_pretrain_config(DEMO, [*SCF, "optim.batch_size=64", "optim.micro_batch_size=64",
                                        "objective.read_depth=rda", "objective.rda_prob=0"])
    c = _step_batch(never, cells, train, 3, 0.0)
    assert torch.equal(c.x, a.x)
    assert torch.equal(c.source_total, c.total_count)


def test_scfoundation_input_tokens_carry_target_and_source_depth() -> None:
    genes = [f"G{i}" for i in range(6)]
    model = build_scfoundation(checkpoint=None, genes=genes, hidden_size=8, layers=1, heads=1).eval()
    x = torch.rand(3, 6)
    total, source = torch.tensor([1000.0, 250.0, 40.0]), torch.tensor([100.0, 250.0, 4.0])
    seq = model.model_input(x, total, source)
    torch.testing.assert_close(seq[:, -2], torch.log10(total), rtol=0, atol=0)  # T
    torch.testing.assert_close(seq[:, -1], torch.log10(source), rtol=0, atol=0)  # S
    assert torch.equal(seq[:, :-2], x)
    # the trial/embedding path: no source total, S = T, the same sequence as an explicit S = T
    plain = model.model_input(x, total)
    assert torch.equal(plain[:, -1], plain[:, -2])
    assert torch.equal(plain, model.model_input(x, total, total))
    with torch.no_grad():
        assert torch.equal(model.encode(x, total), model.encode(x, total, total))
        moved = model.encode(x, total, source)
        assert not torch.allclose(moved[0], model.encode(x, total)[0])  # the source token changes the output
        assert torch.equal(moved[1], model.encode(x, total)[1])  # S = T in the second cell
        net = MaskedValueModel(model).eval()
        assert not torch.equal(net.predict(x, total, source), net.predict(x, total))


def test_aido_cell_refuses_a_source_depth() -> None:
    model = build_aido_cell(checkpoint=None, genes=["A", "B", "C"], hidden_size=8, layers=1, heads=1).eval()
    x, total = torch.rand(2, 3), torch.tensor([100.0, 50.0])
    with pytest.raises(ValueError, match="source read depth is not supported"):
        model.model_input(x, total, total / 2)
    assert torch.equal(model.model_input(x, total, None), model.model_input(x, total))


def test_full_ignores_the_rda_options(demo_h5ad, tmp_path) -> None:
    losses = []
    for extra in ([], ["objective.read_depth=full", "objective.rda_prob=1", "objective.rda_alpha=5"]):
        cfg = load_pretrain_config(DEMO, [*SCF, f"data.path={demo_h5ad}", "steps=3", "objective.edge_cells=1",
                                          *extra])
        losses.append(pretrain(cfg, tmp_path / str(len(losses)), progress=False).card["loss_curve"])
    assert losses[0] == losses[1]


def test_rda_pretraining_runs_through_the_cli_and_its_checkpoint_loads(tmp_path, demo_h5ad) -> None:
    common = [*SCF, f"data.path={demo_h5ad}", "steps=4", "checkpoint_every=2", "objective.edge_cells=1"]
    args = [*common, "objective.read_depth=rda", "objective.rda_prob=0.8"]
    out = tmp_path / "pt"
    res = runner.invoke(app, ["pretrain", str(DEMO), *args, "--out", str(out), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["backbone"] == "scfoundation"
    assert summary["steps"] == 4
    card = read_model_card(out)
    assert card is not None
    assert card["config"]["objective"]["read_depth"] == "rda"
    assert card["config"]["objective"]["rda_prob"] == 0.8
    assert "read-depth-aware" in card["objective"]
    assert "Beta(1.0, 1.0)" in card["objective"]
    assert all(np.isfinite(card["loss_curve"]))
    assert len(card["loss_curve"]) == 4
    # the same config in-process gives the same weights: the checkpoint holds the rda-trained network
    own = pretrain(load_pretrain_config(DEMO, args), tmp_path / "again", progress=False).model.backbone.eval()
    cells = read_cells(demo_h5ad)
    loaded = build_backbone(ScFoundationBackbone(checkpoint=str(out)), genes=cells.genes, width=8).eval()
    x, total = torch.from_numpy(cells.x[:3]), torch.from_numpy(cells.total_count[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x, total), own.encode(x, total), rtol=0, atol=0)
    # the full objective trains other weights
    full = pretrain(load_pretrain_config(DEMO, common), tmp_path / "full", progress=False)
    assert full.card["loss_curve"] != card["loss_curve"]


def test_bad_read_depth_values_exit_2_naming_the_key(tmp_path, demo_h5ad) -> None:
    import anndata as ad

    adata = ad.read_h5ad(demo_h5ad)
    del adata.layers["counts"]
    no_counts = tmp_path / "no_counts.h5ad"
    adata.write_h5ad(no_counts)
    cases = {
        ("objective.read_depth=rda",): ("objective.read_depth", "only scfoundation takes"),
        ("objective.read_depth=half",): ("objective.read_depth", "not one of full, rda"),
        ("objective.rda_prob=1.5",): ("objective.rda_prob", "a probability in [0, 1]"),
        ("objective.rda_alpha=0",): ("objective.rda_alpha", "a Beta shape"),
        ("objective.rda_beta=-1",): ("objective.rda_beta", "a Beta shape"),
        (*SCF, "objective.read_depth=rda", f"data.path={no_counts}"): ("objective.read_depth",
                                                                       "has no layers['counts']"),
    }
    code = "from pertadapt.cli.main import main; main()"
    runs = {k: subprocess.Popen([sys.executable, "-c", code, "pretrain", str(DEMO), *k, "--out",
                                 str(tmp_path / f"o{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ})
            for i, k in enumerate(cases)}
    for key, proc in runs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        for part in cases[key]:
            assert part in err, err
    assert not any((tmp_path / f"o{i}" / MODEL_CARD_JSON).exists() for i in range(len(cases)))
    for backbone in ([], ["backbone.name=aido_cell", "backbone.random_init=true"]):
        with pytest.raises(ConfigError, match="objective.read_depth: 'rda'"):
            load_pretrain_config(DEMO, [*backbone, "objective.read_depth=rda"])
