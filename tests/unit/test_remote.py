"""Object-store storage through pyarrow against a real S3 endpoint on loopback (the ``s3_store`` fixture):
trees pushed and pulled, run directories on the store, node-local dataset copies, bad stores refused by name."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pertadapt import remote
from pertadapt.config import ConfigError, load_run_config
from pertadapt.rundir import RunDir
from pertadapt.sweep.storage import check_storage, clear_storage, shared_data_path, stage_data, storage_root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefix(s3_store: str) -> str:
    """A fresh prefix in the test bucket."""
    return remote.join(s3_store, f"t-{uuid.uuid4().hex[:10]}")


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _read(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_uris_are_told_from_paths_and_joined() -> None:
    assert remote.is_uri("s3://b/p")
    assert remote.is_uri("gs://b")
    assert remote.is_uri("abfs://c@a/p")
    assert not remote.is_uri("/shared/sweep")
    assert not remote.is_uri("file:///shared")
    assert not remote.is_uri(None)
    assert remote.join("s3://b/p/", "runs", "/a/seed1") == "s3://b/p/runs/a/seed1"
    assert remote.join("s3://b/p?endpoint_override=h:9000", "x") == "s3://b/p/x?endpoint_override=h:9000"
    assert remote.under("/shared", "ray", "grid") == "/shared/ray/grid"
    assert remote.under("s3://b", "ray", "grid") == "s3://b/ray/grid"


def test_a_tree_goes_to_the_store_and_back_byte_for_byte(tmp_path: Path, prefix: str) -> None:
    files = {"final_metrics.json": b'{"a": 1}\n', "ckpt/best/state.json": b"{}", "sub/deep/x.bin": bytes(range(256)) * 9}
    src = _tree(tmp_path / "src", files)
    (src / ".half.json.123.tmp").write_bytes(b"half")  # a temporary file is never uploaded
    assert remote.push_tree(src, prefix) == 3
    assert remote.list_dir(prefix) == ["ckpt", "final_metrics.json", "sub"]
    assert remote.pull_tree(prefix, tmp_path / "all") == 3
    assert _read(tmp_path / "all") == files
    # checkpoints can stay on the store: a folder name skipped at any depth
    assert remote.pull_tree(prefix, tmp_path / "light", skip=["ckpt"]) == 2
    assert sorted(_read(tmp_path / "light")) == ["final_metrics.json", "sub/deep/x.bin"]
    assert remote.size(remote.join(prefix, "sub/deep/x.bin")) == 256 * 9
    assert remote.size(remote.join(prefix, "nothing")) is None
    remote.delete(remote.join(prefix, "sub"))
    assert remote.list_dir(prefix) == ["ckpt", "final_metrics.json"]
    remote.delete(remote.join(prefix, "never-there"))  # nothing to delete is no error
    assert remote.pull_tree(remote.join(prefix, "absent"), tmp_path / "none") == 0


def test_a_run_dir_on_the_store_is_worked_on_in_a_node_copy_and_commits_only_what_changed(
        tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = remote.join(prefix, "runs", "full", "seed1")
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "node-a"))
    a = RunDir.at(home).pull()
    local = a.path
    assert a.is_remote
    assert a.location == home
    assert local == tmp_path / "node-a" / "runs" / local.name
    assert _read(local) == {}
    _tree(local, {"timeline.jsonl": b"start\n", "ckpt/last/state.json": b"{}"})
    a.record_attempt(None)
    assert a.commit() == 3
    assert a.commit() == 0  # nothing changed since
    (local / "timeline.jsonl").write_bytes(b"start\nepoch\n")
    assert a.commit() == 1
    # another node: its stale copy of an older run with the same home loses what the store does not hold
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "node-b"))
    b = RunDir.at(home)
    _tree(b.path, {"final_metrics.json": b"stale", "timeline.jsonl": b"old"})
    assert b.pull() is b
    assert sorted(_read(b.path)) == ["attempts.json", "ckpt/last/state.json", "timeline.jsonl"]
    assert _read(b.path)["timeline.jsonl"] == b"start\nepoch\n"
    assert b.final_metrics() is None
    assert b.commit() == 0  # what was pulled is not pushed back
    b.append_history({"epoch": 0})
    b.record_nonfinite("loss nan", epoch=0, micro_step=1)  # on the store at once: a retry anywhere finds it
    assert "nonfinite.json" in remote.list_dir(home)
    assert "metrics.jsonl" not in remote.list_dir(home)
    b.clear_retry_state()
    assert remote.list_dir(home) == ["timeline.jsonl"]
    assert sorted(_read(b.path)) == ["metrics.jsonl", "timeline.jsonl"]
    b.record_nonfinite("loss nan", epoch=0, micro_step=1)
    with pytest.raises(FloatingPointError, match="not retried"):
        a.pull().check_not_nonfinite()


def test_a_dataset_on_the_store_is_read_from_a_node_local_copy_fetched_once(tmp_path: Path, prefix: str,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            demo_h5ad: Path) -> None:
    from pertadapt.data.presets import data_file_for

    storage = storage_root(prefix + "/", tmp_path / "out")
    assert storage == prefix
    target = shared_data_path(demo_h5ad, storage)
    assert target.startswith(remote.join(prefix, "data", "demo"))
    assert target.endswith(".h5ad")
    stage_data(demo_h5ad, target)
    assert remote.size(target) == demo_h5ad.stat().st_size
    stage_data(demo_h5ad, target)  # same size: kept, not uploaded again
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "node"))
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={target}"])
    local, missing = data_file_for(cfg)
    assert not missing
    assert local.is_relative_to(tmp_path / "node" / "remote")
    assert local.read_bytes() == demo_h5ad.read_bytes()
    mtime = local.stat().st_mtime_ns
    assert data_file_for(cfg)[0].stat().st_mtime_ns == mtime  # fetched once
    local.write_bytes(b"truncated")  # a copy of another size is fetched again
    assert data_file_for(cfg)[0].read_bytes() == demo_h5ad.read_bytes()
    assert not list(local.parent.glob(".*.tmp"))
    gone = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={remote.join(prefix, 'data', 'no.h5ad')}"])
    with pytest.raises(ConfigError, match=r"data.path: .*no.h5ad: no such file on its store"):
        data_file_for(gone)


def test_a_store_that_cannot_be_written_is_refused_naming_storage(s3_store: str, tmp_path: Path) -> None:
    check_storage(remote.join(s3_store, "ok"))  # the bucket exists: no error, nothing left behind
    assert not [n for n in remote.list_dir(remote.join(s3_store, "ok")) if n.startswith(".pertadapt-probe")]
    with pytest.raises(ConfigError, match=r"--storage: cannot write to s3://no-such-bucket-pa/x: .*write failed: .*bucket"):
        check_storage("s3://no-such-bucket-pa/x")
    check_storage(str(tmp_path))  # a path is checked where it is used


def test_overwrite_clears_ray_state_and_run_dirs_but_keeps_the_datasets(tmp_path: Path, prefix: str) -> None:
    for rel in ("ray/grid/state.json", "runs/a/seed1/final_metrics.json", "hpo/a/t1/x.json", "data/d.h5ad"):
        remote.write_bytes(remote.join(prefix, rel), b"x")
    clear_storage(prefix, tmp_path / "out")
    assert remote.list_dir(prefix) == ["data"]


def test_sweep_refuses_an_unwritable_store_before_anything_starts(tmp_path: Path, s3_store: str) -> None:
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", "sweep", "ablations/demo.yaml", "--out", str(out),
                          "--storage", "s3://no-such-bucket-pa/sweep"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "--storage: cannot write to s3://no-such-bucket-pa/sweep" in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_an_in_process_run_on_the_store_pushes_every_epoch_before_reporting_it(tmp_path: Path, prefix: str,
                                                                               demo_h5ad: Path) -> None:
    import json

    from pertadapt.train.worker import launch

    home = remote.join(prefix, "runs", "smoke")
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}"])
    seen: list[tuple[int | None, list[str]]] = []

    def report(metrics: dict) -> None:  # what the store holds when the epoch (or the end) is reported
        with_rows = tmp_path / "seen.jsonl"
        remote.download_file(remote.join(home, "metrics.jsonl"), with_rows)
        epochs = [json.loads(line)["epoch"] for line in with_rows.read_text().splitlines()]
        seen.append((metrics.get("epoch"), [str(e) for e in epochs]))

    launch(cfg, RunDir.at(home).pull(), report=report, log_wandb=False)
    assert seen[:2] == [(0, ["0"]), (1, ["0", "1"])]  # each epoch's row was on the store before its report
    assert seen[2][0] is None  # the final report
    on_store = remote.list_dir(home)
    assert {"final_metrics.json", "test_predictions.h5ad", "provenance.json", "ckpt"} <= set(on_store)
    assert "last" in remote.list_dir(remote.join(home, "ckpt"))
