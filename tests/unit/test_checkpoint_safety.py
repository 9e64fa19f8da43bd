"""Checkpoints load without unpickling, are validated before the run directory is touched, and say why not."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pertadapt.config import ConfigError, load_run_config
from pertadapt.rundir import RunDir
from pertadapt.train.checkpoint import (
    CheckpointError,
    load_tree,
    restore_model,
    save_tree,
)
from pertadapt.train.run import run
from pertadapt.train.worker import has_resumable_checkpoint, launch

REPO = Path(__file__).resolve().parents[2]
SHORT = ["optim.epochs=1", "optim.max_steps_per_epoch=2"]
CKPT_FILES = ["optimizer.safetensors", "rank0.json", "state.json", "trained.safetensors"]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *SHORT, *overrides])


class _Payload:
    """Unpickling this creates ``path`` (what a crafted checkpoint would do instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture(scope="module")
def trained_run(demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real torch-engine run directory (one short epoch) with ``ckpt/last`` and ``ckpt/best``."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    launch(_cfg(demo_h5ad), run_dir)
    return run_dir


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", "provenance.json", "attempts.json")}


def test_checkpoint_holds_exactly_the_safe_files(trained_run: Path) -> None:
    for name in ("last", "best"):
        assert sorted(p.name for p in (trained_run / "ckpt" / name).iterdir()) == CKPT_FILES
    state = json.loads((trained_run / "ckpt" / "last" / "state.json").read_text())
    assert state["client_state"] == {"epoch": 0, "best": pytest.approx(state["client_state"]["best"]), "best_epoch": 0}
    assert not any(k.startswith("backbone.") for k in state["trained"])  # the frozen backbone is never saved
    assert any(k.startswith("head.") for k in state["trained"])
    assert "bn_emb.running_mean" in state["trained"]  # buffers training updates are kept
    attempts = json.loads((trained_run / "attempts.json").read_text())
    assert [(a["attempt"], a["resumed_from_epoch"]) for a in attempts] == [(1, None)]


def test_a_trained_run_is_resumable_and_max_failures_is_checked(trained_run: Path, demo_h5ad: Path) -> None:
    assert has_resumable_checkpoint(_cfg(demo_h5ad), trained_run)
    with pytest.raises(ConfigError, match="engine.max_failures"):
        _cfg(demo_h5ad, "engine.max_failures=-1")


@pytest.mark.parametrize("name", CKPT_FILES)
def test_each_file_replaced_by_a_pickle_is_refused_without_running_it(name: str, trained_run: Path,
                                                                      demo_h5ad: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it creates the marker ...
    assert marker.exists()
    marker.unlink()
    run_dir = _copy(trained_run, tmp_path / "run")
    (run_dir / "ckpt" / "last" / name).write_bytes(payload)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        launch(_cfg(demo_h5ad, "optim.epochs=2"), run_dir, resume=True)
    assert not marker.exists()  # ... and the checkpoint loader never unpickled it
    assert _snapshot(run_dir) == before


def test_cli_refuses_a_pickled_checkpoint_with_one_line_and_exit_1(trained_run: Path, demo_h5ad: Path,
                                                                   tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run_dir = _copy(trained_run, tmp_path / "run")
    (run_dir / "ckpt" / "last" / "trained.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    before = _snapshot(run_dir)
    cmd = [sys.executable, "-m", "pertadapt.cli", "train", str(REPO / "configs" / "smoke.yaml"), f"data.path={demo_h5ad}",
           *SHORT, "--out", str(run_dir), "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, res.stderr
    assert "trained.safetensors: not a safetensors checkpoint file" in errors[0]
    assert not marker.exists()
    assert _snapshot(run_dir) == before


def test_resume_without_a_checkpoint_is_refused_with_exit_2(demo_h5ad: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    assert not has_resumable_checkpoint(cfg, tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint in .*ckpt/last; run without --resume"):
        launch(cfg, tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()
    ds = _cfg(demo_h5ad, "engine.name=deepspeed", "engine.workers=2")  # refused before any Ray process starts
    with pytest.raises(ConfigError, match=r"--resume: no checkpoint in .*ray/train-smoke;"):
        launch(ds, tmp_path / "empty", resume=True)
    cmd = [sys.executable, "-m", "pertadapt.cli", "train", str(REPO / "configs" / "smoke.yaml"), f"data.path={demo_h5ad}",
           "--out", str(tmp_path / "empty"), "--resume"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"}, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "no checkpoint in" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("trained.safetensors", lambda b: b[: len(b) // 2], "not a safetensors"),
    ("optimizer.safetensors", lambda b: b[:100], "not a safetensors"),
    ("state.json", lambda b: b[:-20], "not valid JSON"),
    ("rank0.json", lambda b: json.dumps({"rank": 0, "files": ["../../escape"], "rng": {}}).encode(), "'files'"),
])
def test_a_corrupt_checkpoint_is_refused_naming_the_file(name: str, damage, message: str, trained_run: Path,
                                                         demo_h5ad: Path, tmp_path: Path) -> None:
    run_dir = _copy(trained_run, tmp_path / "run")
    path = run_dir / "ckpt" / "last" / name
    path.write_bytes(damage(path.read_bytes()))
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=message) as err:
        launch(_cfg(demo_h5ad, "optim.epochs=2"), run_dir, resume=True)
    assert name in str(err.value)
    assert _snapshot(run_dir) == before


def test_a_checkpoint_of_another_model_is_refused_before_the_run_dir_is_written(trained_run: Path, demo_h5ad: Path,
                                                                                tmp_path: Path) -> None:
    """Structure is fine but the tensors do not fit: found once the model is built, still before any write."""
    run_dir = _copy(trained_run, tmp_path / "run")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"trained\.safetensors: .*shape .* the model expects"):
        run(_cfg(demo_h5ad, "optim.epochs=2", "model.head_hidden=48"), run_dir, resume=True)
    assert _snapshot(run_dir) == before


def test_restore_model_refuses_a_pickled_best_checkpoint(trained_run: Path, demo_h5ad: Path, tmp_path: Path) -> None:
    from pertadapt.models import build_model
    from pertadapt.train.setup import prepare_run_data

    marker = tmp_path / "pwned"
    best = _copy(trained_run / "ckpt" / "best", tmp_path / "best")
    (best / "trained.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    cfg = _cfg(demo_h5ad)
    model = build_model(cfg, prepare_run_data(cfg).inputs)
    with pytest.raises(CheckpointError, match="trained.safetensors"):
        restore_model(model, best)
    assert not marker.exists()


def test_tree_round_trip_keeps_types_and_refuses_unknown_objects(tmp_path: Path) -> None:
    from collections import OrderedDict

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3)}},
             "groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0], "name": None, "flag": True}],
             "shapes": OrderedDict(w=torch.Size([2, 3])), "empty": torch.zeros(0), "nan": float("nan")}
    save_tree(tmp_path / "t.safetensors", state)
    back = load_tree(tmp_path / "t.safetensors")
    assert back["groups"] == state["groups"]
    assert isinstance(back["groups"][0]["betas"], tuple)
    assert isinstance(back["shapes"], OrderedDict)
    assert back["shapes"]["w"] == torch.Size([2, 3])
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert 0 in back["state"]
    assert back["empty"].shape == (0,)
    assert back["nan"] != back["nan"]
    with pytest.raises(TypeError, match="cannot store a .*_Payload"):
        save_tree(tmp_path / "u.safetensors", {"x": _Payload(tmp_path / "p")})


def test_a_nonfinite_loss_is_recorded_and_not_retried(demo_h5ad: Path, tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) at epoch 0, micro-step \d+"):
        launch(_cfg(demo_h5ad, "optim.lr=1e30", "optim.clip_value=null"), tmp_path / "nan")
    record = json.loads((tmp_path / "nan" / "nonfinite.json").read_text())
    assert record["epoch"] == 0
    assert record["micro_step"] >= 1
    with pytest.raises(FloatingPointError, match="not retried"):  # what a restarted Ray Train attempt does first
        RunDir(tmp_path / "nan").check_not_nonfinite()
