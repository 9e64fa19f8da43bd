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
