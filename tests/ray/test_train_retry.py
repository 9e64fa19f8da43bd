"""A SIGKILLed Ray Train worker: the worker group restarts from the latest epoch's checkpoint, same final metrics."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pertadapt.config import load_run_config
from pertadapt.train.worker import launch

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["optim.epochs=3", "optim.max_steps_per_epoch=3", "optim.batch_size=16", "optim.micro_batch_size=4",
             "engine.workers=2", "engine.deepspeed_config=zero3.json", "engine.max_failures=2",
             "logging.wandb=disabled"]


def _train_workers(since: float) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if p.info["create_time"] >= since and "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _first_checkpoint(ray_run: Path) -> bool:
    """Epoch 0's checkpoint is in Ray storage and registered by Ray Train (in its checkpoint manager's snapshot)."""
    snapshot = ray_run / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "epoch_0000" in snapshot.read_text()


@pytest.mark.usefixtures("no_leftover_ray")
def test_killed_worker_resumes_from_its_last_epoch_and_matches_an_uninterrupted_run(demo_h5ad: Path,
                                                                                   tmp_path: Path) -> None:
    import ray

    cfg = load_run_config(REPO / "configs" / "demo.yaml", [f"data.path={demo_h5ad}", *OVERRIDES])
    ray.init(num_cpus=3, _node_ip_address="127.0.0.2", log_to_driver=False)
    try:
        full = launch(cfg, tmp_path / "full")
        killed_dir = tmp_path / "killed"
        outcome: dict[str, object] = {}

        def fit() -> None:
            try:
                outcome["metrics"] = launch(cfg, killed_dir)
            except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
                outcome["error"] = e

        started = time.time()
        thread = threading.Thread(target=fit)
        thread.start()
        deadline = started + 400
        while not _first_checkpoint(killed_dir / "ray" / f"train-{cfg.name}") and time.time() < deadline:
            assert thread.is_alive(), outcome
            time.sleep(0.2)
        victims = _train_workers(started)
        assert len(victims) == 2, victims
        os.kill(victims[-1].pid, signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        ray.shutdown()
    assert "error" not in outcome, outcome
    assert outcome["metrics"] == json.loads((killed_dir / "final_metrics.json").read_text())
    assert full == json.loads((tmp_path / "full" / "final_metrics.json").read_text())
    assert_resumed_like_uninterrupted(tmp_path / "full", killed_dir, f"train-{cfg.name}")


def assert_resumed_like_uninterrupted(full_dir: Path, killed_dir: Path, ray_name: str) -> None:
    """A resumed run: ≥ 2 attempts, the last after a saved epoch, and every epoch row and test metric as uninterrupted."""
    attempts = json.loads((killed_dir / "attempts.json").read_text())
    assert len(attempts) >= 2
    assert attempts[0]["resumed_from_epoch"] is None
    assert attempts[-1]["resumed_from_epoch"] >= 1  # continued after a saved epoch, not from epoch 0
    rows = {d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (full_dir, killed_dir)}
    assert [r["epoch"] for r in rows[killed_dir]] == [0, 1, 2]
    for resumed_row, full_row in zip(rows[killed_dir], rows[full_dir], strict=True):
        assert resumed_row == pytest.approx(full_row, rel=1e-4, abs=1e-4)
    full, resumed = (json.loads((d / "final_metrics.json").read_text()) for d in (full_dir, killed_dir))
    test_keys = sorted(k for k in full if k.startswith("test_"))
    assert len(test_keys) > 10
    assert {k: resumed[k] for k in test_keys} == pytest.approx({k: full[k] for k in test_keys}, rel=1e-4, abs=1e-4)
    assert resumed["best_epoch"] == full["best_epoch"]
    # Ray storage keeps the best and the latest epoch only
    kept = sorted(p.name for p in (killed_dir / "ray" / ray_name).glob("epoch_*"))
    assert 1 <= len(kept) <= 2
    assert f"epoch_{full['best_epoch']:04d}" in kept
    assert "epoch_0002" in kept
