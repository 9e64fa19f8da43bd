"""Shared fixtures: a small simulated, prepared dataset cached per session, test env defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

for key, value in {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
                   "HF_HUB_OFFLINE": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0"}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide PERTADAPT_CACHE (simulated data and GO masks are built once)."""
    d = Path(os.environ.get("PERTADAPT_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["PERTADAPT_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def demo_h5ad(cache_dir: Path) -> Path:
    """The simulator's ``demo`` preset, prepared, written once per session."""
    from pertadapt.config import load_run_config
    from pertadapt.train.setup import ensure_data_file

    return ensure_data_file(load_run_config(REPO / "configs" / "smoke.yaml"))


@pytest.fixture(autouse=True)
def _chdir_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _assert_best_checkpoint_reproduces_test_predictions(cfg, run_dir: Path) -> None:
    """Reload ``run_dir/ckpt/best`` into a fresh model and re-predict one test condition's mean."""
    import numpy as np
    import torch

    from pertadapt.data.summaries import read_predictions
    from pertadapt.models import build_model
    from pertadapt.train.checkpoint import restore_model
    from pertadapt.train.run import seed_everything
    from pertadapt.train.setup import prepare_run_data

    rd = prepare_run_data(cfg)
    seed_everything(cfg.seed)  # checkpoints hold the trained tensors only: rebuild the frozen backbone as the run did
    model = build_model(cfg, rd.inputs)
    restore_model(model, run_dir / "ckpt" / "best")
    model.eval()
    cells = rd.test.cells
    conds = np.asarray(cells.data.conditions)[cells.data.cell_condition[cells.cells]]
    first = sorted(set(conds) - {"ctrl"})[0]
    with torch.no_grad():
        pred = model(cells.batch(np.flatnonzero(conds == first))).double().mean(0).numpy()
    names, means = read_predictions(run_dir / "test_predictions.h5ad", list(rd.data.genes))
    np.testing.assert_allclose(means[names.index(first)], pred, rtol=1e-4, atol=1e-5)


@pytest.fixture
def assert_checkpoint_reproduces():
    """``f(cfg, run_dir)``: the best checkpoint reloads and reproduces the saved test predictions."""
    return _assert_best_checkpoint_reproduces_test_predictions
