"""Shared fixtures: a small simulated, prepared dataset cached per session, test env defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def s3_store() -> Iterator[str]:
    """An S3 endpoint on loopback (moto's S3 server, a process this fixture starts and stops by PID) with one
    bucket; the AWS variables pyarrow and Ray read point at it. Yields ``s3://<bucket>``."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "pertadapt-test", "AWS_SECRET_ACCESS_KEY": "pertadapt-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, "moto S3 server exited"
                assert time.time() < deadline, "moto S3 server did not start"
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket="pertadapt-test")
        yield "s3://pertadapt-test"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
