"""`pertadapt pretrain`: checkpoints that load where trials and `pertadapt embed` load them, resume after SIGKILL,
the demo config's figures, the cache of `pretrained_checkpoint`, and bad input refused with exit 2."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fixtures.wandb_offline import find_offline_runs, read_offline_run
from pertadapt.cli import app
from pertadapt.config.components import AidoCellBackbone, TinyBackbone
from pertadapt.config.errors import ConfigError
from pertadapt.config.pretrain import load_pretrain_config
from pertadapt.data.cells import read_cells
from pertadapt.data.embed_io import read_counts_for_vocab
from pertadapt.models.backbones import build_backbone
from pertadapt.train.pretrain import (
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    RESUME_DIR,
    pretrain,
    pretrained_checkpoint,
    read_model_card,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "pretrain_demo.yaml"
runner = CliRunner()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    code = "from pertadapt.cli.main import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def test_tiny_checkpoint_loads_as_backbone_and_in_embed_with_the_same_embeddings(tmp_path, demo_h5ad) -> None:
    cfg = load_pretrain_config(DEMO, [f"data.path={demo_h5ad}", "steps=12", "checkpoint_every=5",
                                      "logging.wandb=offline", "objective.edge_cells=2"])
    result = pretrain(cfg, tmp_path / "pt", progress=False)
    out = tmp_path / "pt"
    assert {"config.json", "model.safetensors", "genes.txt", MODEL_CARD_JSON, MODEL_CARD_MD} <= {
        p.name for p in out.iterdir()}
    assert not (out / RESUME_DIR).exists()  # the resumable state goes once the run is complete
    card = read_model_card(out)
    assert card is not None
    assert card["steps"] == 12
    assert len(card["loss_curve"]) == 12
    assert card["data"]["n_train"] + card["data"]["n_heldout"] == 400
    assert card["data"]["cells"] == "control"
    assert card["genes"]["n"] == 240
    assert len(card["data"]["sha256"]) == 64
    assert card["provenance"]["git_sha"]
    assert "heldout_masked_mse" in card["scores"]
    cells = read_cells(demo_h5ad)
    own = result.model.backbone.eval()
    # through the trials' backbone registry: the data's gene order equals the checkpoint's
    loaded = build_backbone(TinyBackbone(checkpoint=str(out)), genes=cells.genes, width=32).eval()
    assert loaded.genes == cells.genes
    x, total = torch.from_numpy(cells.x[:5]), torch.from_numpy(cells.total_count[:5])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x, total), own.encode(x, total), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match the checkpoint vocabulary"):
        build_backbone(TinyBackbone(checkpoint=str(out)), genes=cells.genes[::-1], width=32)
    # through `pertadapt embed` (its input: log1p(counts / total · 1e4) of the raw counts)
    res = runner.invoke(app, ["embed", "--backbone", "tiny", "--checkpoint", str(out), "--data", str(demo_h5ad),
                              "--out", str(tmp_path / "e.npy")])
    assert res.exit_code == 0, res.output
    raw = read_counts_for_vocab(demo_h5ad, cells.genes)
    xe, te = raw.log1p_batch(0, 3)
    with torch.no_grad():
        expected = own.encode(torch.from_numpy(xe), torch.from_numpy(te)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "e.npy")[:3], expected, atol=1e-5)
    # the W&B run (offline), read back with wandb's own tool
    (run,) = find_offline_runs(out)
    summary = read_offline_run(run)["summary"]
    assert summary["pretrain/heldout_masked_mse"] == pytest.approx(result.summary["heldout_masked_mse"])
    assert summary["pretrain/steps"] == 12


def test_aido_cell_checkpoint_loads_through_backbone_checkpoint(tmp_path, demo_h5ad) -> None:
    cfg = load_pretrain_config(DEMO, [f"data.path={demo_h5ad}", "steps=2", "backbone.name=aido_cell",
                                      "backbone.hidden_size=8", "backbone.layers=1", "backbone.heads=1",
                                      "backbone.random_init=true", "objective.edge_cells=1"])
    result = pretrain(cfg, tmp_path / "aido", progress=False)
    assert result.summary["backbone"] == "aido_cell"
    cells = read_cells(demo_h5ad)
    loaded = build_backbone(AidoCellBackbone(checkpoint=str(tmp_path / "aido")), genes=cells.genes, width=8).eval()
    x, total = torch.from_numpy(cells.x[:3]), torch.from_numpy(cells.total_count[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x, total), result.model.backbone.eval().encode(x, total),
                                   rtol=0, atol=0)


def test_resume_after_sigkill_gives_the_uninterrupted_loss_curve(tmp_path, demo_h5ad) -> None:
    args = ["pretrain", str(DEMO), f"data.path={demo_h5ad}", "steps=24", "checkpoint_every=8", "optim.batch_size=8",
            "optim.micro_batch_size=4", "objective.edge_cells=1"]
    whole = _cli(*args, "--out", str(tmp_path / "whole"))
    killed = _cli(*args, "--out", str(tmp_path / "killed"))
    state = tmp_path / "killed" / RESUME_DIR / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # for real: no handler runs, whatever was being written stays half-written
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / MODEL_CARD_JSON).exists()
    step = json.loads(state.read_text())["client_state"]["step"]
    assert step in (8, 16)
    resumed = _cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert f"at step {step} of 24" in resumed.stderr.read()
    assert whole.wait(timeout=180) == 0, whole.stderr.read()
    a, b = (read_model_card(tmp_path / d) for d in ("whole", "killed"))
    assert a is not None
    assert b is not None
    assert len(a["loss_curve"]) == 24
    assert a["loss_curve"] == b["loss_curve"]
    assert a["scores"] == b["scores"]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "killed" / "model.safetensors").read_bytes()


def test_demo_config_writes_the_json(tmp_path, demo_h5ad) -> None:
    # the shipped config on the demo data's control cells, 100 of its 2,000 steps, 4 of its 16 edge-score cells
    res = runner.invoke(app, ["pretrain", str(DEMO), f"data.path={demo_h5ad}", "steps=100", "objective.edge_cells=4",
                              "--out",
                              str(tmp_path / "o"), "--json", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    figures = json.loads((tmp_path / "f.json").read_text())
    assert set(figures) == {"backbone", "heldout_masked_mse", "mean_predictor_mse", "edge_auroc", "edge_auroc_random",
                            "steps", "seconds"}
    assert figures["backbone"] == "tiny"
    assert figures["steps"] == 100
    # measured: in 100 steps the FM learns the per-gene means and no more (ratio 1.005); the whole config, 2,000
    # steps (80 s), reaches 0.805, about the best linear predictor's 0.83 (docs/pretraining.md)
    assert figures["heldout_masked_mse"] <= 1.02 * figures["mean_predictor_mse"]
    assert 0.0 <= figures["edge_auroc"] <= 1.0
    assert 0.0 <= figures["edge_auroc_random"] <= 1.0


def test_pretrained_checkpoint_pretrains_once_for_concurrent_callers(tmp_path, demo_h5ad, monkeypatch,
                                                                     caplog) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))
    overrides = ["steps=3", "objective.edge_cells=1"]
    found: list[Path] = []
    with caplog.at_level(logging.INFO, logger="pertadapt.train.pretrain"):
        callers = [threading.Thread(target=lambda: found.append(pretrained_checkpoint(DEMO, demo_h5ad, overrides)))
                   for _ in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
    assert len(found) == 2
    assert found[0] == found[1]
    assert found[0].parent == tmp_path / "cache" / "pretrained"
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("pretraining the tiny FM") for m in messages) == 1
    assert sum(m.startswith("reusing the pretrained") for m in messages) == 1
    assert read_model_card(found[0])["steps"] == 3
    assert [p.name for p in found[0].parent.iterdir() if p.name.startswith(".")] == []
    # another config is another entry
    assert pretrained_checkpoint(DEMO, demo_h5ad, ["steps=2", "objective.edge_cells=1"]) != found[0]


def test_bad_input_exits_2_naming_the_key_or_file(tmp_path, demo_h5ad) -> None:
    import anndata as ad

    adata = ad.read_h5ad(demo_h5ad)
    perturbed = tmp_path / "no_ctrl.h5ad"
    adata[adata.obs["condition"].astype(str) != "ctrl"].copy().write_h5ad(perturbed)
    cases = {"backbone.name=bert": "backbone.name", "objective.mask_ratio=1.5": "objective.mask_ratio",
             f"data.path={perturbed}": "no_ctrl.h5ad has no control cells"}
    runs = {k: _cli("pretrain", str(DEMO), k, "--out", str(tmp_path / "o")) for k in cases}
    errors = {}
    for key, proc in runs.items():
        _, errors[key] = proc.communicate(timeout=120)
        assert proc.returncode == 2, errors[key]
        assert cases[key] in errors[key]
    assert "unknown backbone 'bert'; valid:" in errors["backbone.name=bert"]
    assert "a fraction in (0, 1)" in errors["objective.mask_ratio=1.5"]
    assert not (tmp_path / "o" / MODEL_CARD_JSON).exists()
    with pytest.raises(ConfigError, match="backbone.name"):
        load_pretrain_config(DEMO, ["backbone.name=learned"])


def test_options_change_what_they_claim(demo_h5ad) -> None:
    from pertadapt.train.pretrain import _step_batch, split_cells

    control, every = read_cells(demo_h5ad, "control"), read_cells(demo_h5ad, "all")
    assert control.x.shape == (400, 240)
    assert every.x.shape[0] == 1840
    assert control.edges is not None
    split = split_cells(400, 0.25, 3)
    assert (split.heldout.size, split.train.size) == (100, 300)
    assert not set(split.heldout) & set(split.train)
    assert not np.array_equal(split_cells(400, 0.25, 4).heldout, split.heldout)
    for ratio in (0.15, 0.5):
        cfg = load_pretrain_config(DEMO, [f"objective.mask_ratio={ratio}", "optim.batch_size=64",
                                          "optim.micro_batch_size=64"])
        batch = _step_batch(cfg, control, split.train, 0, -1.0)
        assert float(batch.mask.float().mean()) == pytest.approx(ratio, abs=0.02)
        assert bool((batch.x[batch.mask] == -1.0).all())
        assert torch.equal(batch.x[~batch.mask], batch.target[~batch.mask])
    # the same (seed, step) draws the same batch; another step another one
    cfg = load_pretrain_config(DEMO)
    a, b = (_step_batch(cfg, control, split.train, s, -1.0) for s in (5, 5))
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.target, b.target)
    assert not torch.equal(_step_batch(cfg, control, split.train, 6, -1.0).mask, a.mask)


def test_edge_auroc_orders_pairs() -> None:
    from pertadapt.eval.edges import edge_auroc

    src, dst = np.array([0, 2]), np.array([1, 3])
    score = np.zeros((4, 4))
    score[1, 0] = score[2, 3] = 1.0  # the edges, one of each direction
    assert edge_auroc(score, src, dst) == 1.0
    assert edge_auroc(-(score + score.T), src, dst) == 0.0
    assert edge_auroc(-score, src, dst) == 0.5  # a pair scores max(S[i, j], S[j, i]): 0 for every pair here
    assert edge_auroc(np.ones((4, 4)), src, dst) == 0.5
    with pytest.raises(ValueError, match="square"):
        edge_auroc(np.ones((4, 3)), src, dst)


def test_file_without_simulator_truth_has_no_edge_score(tmp_path, demo_h5ad, caplog) -> None:
    import anndata as ad

    adata = ad.read_h5ad(demo_h5ad)
    del adata.uns["sim"]
    adata.write_h5ad(tmp_path / "real.h5ad")
    cfg = load_pretrain_config(DEMO, [f"data.path={tmp_path / 'real.h5ad'}", "steps=2"])
    with caplog.at_level(logging.INFO, logger="pertadapt.train.pretrain"):
        result = pretrain(cfg, tmp_path / "o", progress=False)
    assert "edge_auroc" not in result.summary
    assert "edge_auroc_random" not in result.card["scores"]
    assert any("holds no simulator truth" in r.getMessage() for r in caplog.records)
    assert "not computed" in (tmp_path / "o" / MODEL_CARD_MD).read_text()
    with pytest.raises(ConfigError, match="already holds a pretraining"):
        pretrain(cfg, tmp_path / "o", progress=False)


def test_broken_tiny_checkpoints_are_refused(tmp_path) -> None:
    from pertadapt.models.backbones.checkpoint import CheckpointError
    from pertadapt.models.backbones.tiny import TinyTransformer

    genes = [f"G{i}" for i in range(6)]
    TinyTransformer(6, 8, 1, 2).save_pretrained_dir(tmp_path / "c", genes)
    assert TinyTransformer.from_pretrained_dir(tmp_path / "c").genes == tuple(genes)
    (tmp_path / "c" / "config.json").write_text(json.dumps({"hidden_size": 8, "layers": 1, "heads": 3, "n_genes": 6}))
    with pytest.raises(CheckpointError, match="heads=3 does not divide hidden_size=8"):
        TinyTransformer.from_pretrained_dir(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"hidden_size": 8, "layers": 1, "heads": 2}))
    with pytest.raises(CheckpointError, match="missing or invalid: n_genes"):
        TinyTransformer.from_pretrained_dir(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"hidden_size": 16, "layers": 1, "heads": 2, "n_genes": 6}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        TinyTransformer.from_pretrained_dir(tmp_path / "c")


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path, demo_h5ad) -> None:
    from pertadapt.train.engine import build_engine
    from pertadapt.train.pretrain import _build_network

    cfg = load_pretrain_config(DEMO, [f"data.path={demo_h5ad}", "steps=2", "objective.edge_cells=1"])
    pretrain(cfg, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):  # a finished run keeps no resumable state
        pretrain(cfg, tmp_path / "o", resume=True, progress=False)
    engine = build_engine(_build_network(cfg, read_cells(demo_h5ad).genes), cfg)
    engine.save(tmp_path / "i" / RESUME_DIR, {"epoch": 1, "best_epoch": 1, "best": 0.5, "step": 1, "losses": [0.5],
                                              "config_sha256": "of another config"})
    with pytest.raises(ConfigError, match="another pretrain config"):
        pretrain(cfg, tmp_path / "i", resume=True, progress=False)


def test_pretrain_configs_inherit_and_validate(tmp_path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: pretrain_demo.yaml\nsteps: 7\nbackbone: {layers: 2}\n")
    cfg = load_pretrain_config(mine, ["objective.mask_ratio=0.3"])
    assert (cfg.steps, cfg.backbone.layers, cfg.backbone.hidden_size, cfg.objective.mask_ratio) == (7, 2, 32, 0.3)
    for override, key in (("data.cells=perturbed", "data.cells"), ("data.heldout_frac=1", "data.heldout_frac"),
                          ("steps=0", "steps"), ("backbone.checkpoint=somewhere", "backbone.checkpoint"),
                          ("optim.schedule=step", "optim.schedule"), ("objective.typo=1", "objective.typo"),
                          ("optim.batch_size=20", "optim.batch_size")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_pretrain_config(DEMO, [override])
