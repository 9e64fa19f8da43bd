"""DeepSpeed trials under Ray Train on CPU: two workers, rank-0 checkpoints, ZeRO-3 ≡ plain torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pertadapt.config import load_run_config
from pertadapt.data.summaries import read_predictions
from pertadapt.models import build_model
from pertadapt.report.wandb import find_offline_runs, read_offline_run
from pertadapt.train.engine import consolidated_state_dict
from pertadapt.train.run import run
from pertadapt.train.setup import prepare_run_data
from pertadapt.train.worker import train_on_local_ray

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
STEPS = ["optim.epochs=1", "optim.max_steps_per_epoch=3", "optim.batch_size=16", "optim.micro_batch_size=4"]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "demo.yaml", [f"data.path={demo_h5ad}", *STEPS, *overrides])


@pytest.mark.usefixtures("no_leftover_ray")
def test_two_worker_deepspeed_run_records_world_size_and_reloads(demo_h5ad: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad, "engine.deepspeed_config=zero2.json", "logging.wandb=offline")
    run_dir = tmp_path / "ds"
    train_on_local_ray(cfg, run_dir)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["world_size"] == 2
    # rank 0 wrote the model states; both ranks wrote their optimizer shards
    best = run_dir / "ckpt" / "best" / "ds"
    assert (best / "mp_rank_00_model_states.pt").is_file()
    assert len(list(best.glob("*optim_states.pt"))) == 2
    # the consolidated checkpoint reloads into a fresh model and reproduces the saved test predictions
    rd = prepare_run_data(cfg)
    model = build_model(cfg, rd.inputs)
    model.load_state_dict(consolidated_state_dict(run_dir / "ckpt" / "best"))
    model.eval()
    cells = rd.test.cells
    conds = np.asarray(cells.data.conditions)[cells.data.cell_condition[cells.cells]]
    first = sorted(set(conds) - {"ctrl"})[0]
    with torch.no_grad():
        pred = model(cells.batch(np.flatnonzero(conds == first))).double().mean(0).numpy()
    names, means = read_predictions(run_dir / "test_predictions.h5ad", list(rd.data.genes))
    np.testing.assert_allclose(means[names.index(first)], pred, rtol=1e-4, atol=1e-5)
    # exactly one W&B run (rank 0 only), finished, whose summary is the final metrics
    runs = find_offline_runs(run_dir)
    assert len(runs) == 1
    info = read_offline_run(runs[0])
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert info["summary"]["test_mse_de"] == pytest.approx(final["test_mse_de"])


@pytest.mark.usefixtures("no_leftover_ray")
def test_zero3_two_workers_matches_plain_torch(demo_h5ad: Path, tmp_path: Path) -> None:
    """Same cells per optimiser step at any world size, so the losses agree up to float reductions.

    Weight decay is off here: with it, DeepSpeed's steps drift from torch's by ~0.2% after one step
    (an open question noted on the issue); every other part of the update matches to 1e-6.
    """
    common = ["optim.clip_value=null", "optim.weight_decay=0", "logging.wandb=disabled"]
    torch_metrics = run(_cfg(demo_h5ad, "engine.name=torch", "engine.workers=1", *common), tmp_path / "torch")
    ds_cfg = _cfg(demo_h5ad, "engine.deepspeed_config=zero3.json", *common)
    train_on_local_ray(ds_cfg, tmp_path / "zero3")
    ds_metrics = json.loads((tmp_path / "zero3" / "final_metrics.json").read_text())
    rows = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
            for name in ("torch", "zero3")}
    assert rows["zero3"]["train_loss"] == pytest.approx(rows["torch"]["train_loss"], rel=1e-4)
    assert ds_metrics["val_mse"] == pytest.approx(torch_metrics["val_mse"], rel=5e-2)
