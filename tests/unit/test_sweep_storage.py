"""Sweep storage: the root every node reads, datasets placed there once, and unreadable paths named with the node."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.sweep.storage import shared_data_path, stage_data, storage_root

REPO = Path(__file__).resolve().parents[2]


def test_storage_root_defaults_to_the_sweep_dir_and_keeps_object_store_uris(tmp_path: Path) -> None:
    assert storage_root(None, tmp_path) == str(tmp_path.resolve())
    assert storage_root(str(tmp_path / "shared"), tmp_path / "out") == str((tmp_path / "shared").resolve())
    assert storage_root(f"file://{tmp_path / 'shared'}", tmp_path / "out") == str((tmp_path / "shared").resolve())
    assert storage_root("s3://bucket/x/", tmp_path) == "s3://bucket/x"


def test_a_dataset_is_placed_once_and_replaced_when_it_changes(tmp_path: Path) -> None:
    src = tmp_path / "cache" / "demo.h5ad"
    src.parent.mkdir()
    src.write_bytes(b"first")
    target = Path(shared_data_path(src, str(tmp_path / "storage")))
    assert target.parent == tmp_path / "storage" / "data"
    assert target.name.startswith("demo-")
    assert target.suffix == ".h5ad"
    assert Path(shared_data_path(tmp_path / "other" / "demo.h5ad", str(tmp_path / "storage"))) != target  # same name, other file
    stage_data(src, str(target))
    assert target.read_bytes() == b"first"
    assert os.stat(target).st_ino == os.stat(src).st_ino  # same filesystem: a hard link, no copy
    ino = os.stat(target).st_ino
    stage_data(src, str(target))
    assert os.stat(target).st_ino == ino
    src.unlink()
    src.write_bytes(b"second, longer")
    stage_data(src, str(target))
    assert target.read_bytes() == b"second, longer"
    assert not list(target.parent.glob(".*.tmp"))


def test_a_run_that_cannot_read_its_data_names_the_path_and_the_node(tmp_path: Path) -> None:
    from pertadapt.train.run import run

    missing = tmp_path / "nowhere" / "data.h5ad"
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={missing}"])
    with pytest.raises(ConfigError, match="data.path") as err:
        run(cfg, tmp_path / "run")
    assert str(missing) in str(err.value)
    assert socket.gethostname() in str(err.value)
    assert not (tmp_path / "run" / "final_metrics.json").exists()


def test_overwrite_clears_ray_state_on_a_separate_shared_path_only(tmp_path: Path) -> None:
    from pertadapt.sweep.storage import clear_storage

    shared, out = tmp_path / "shared", tmp_path / "out"
    for rel in ("ray/grid/state.json", "data/d.h5ad"):
        (shared / rel).parent.mkdir(parents=True, exist_ok=True)
        (shared / rel).write_text("x")
    (out / "ray").mkdir(parents=True)
    clear_storage(str(shared), out)
    assert sorted(p.name for p in shared.iterdir()) == ["data"]  # the datasets stay
    clear_storage(str(out), out)  # the default storage is the sweep dir itself, removed whole by --overwrite
    assert (out / "ray").is_dir()
