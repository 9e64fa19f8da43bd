"""A two-node local Ray cluster (head with 0 CPUs on 127.0.0.2, workers on 127.0.0.3 and .4), started and
stopped by PID through the shipped recipe ``cluster/local/ray-local-cluster.sh``: a sweep joins it with
``--address`` and keeps everything on an S3 store (the ``s3_store`` endpoint; every node has the credentials
in its own environment, as on a real cluster; the FM the driver pretrained reaches the workers through it),
the storage probe runs on a worker node, a sweep is submitted as a Ray job through ``pertadapt cluster
submit``, a node is lost mid-trial with the storage on a shared path."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "cluster" / "local" / "ray-local-cluster.sh"
GCS, JOBS = "127.0.0.2:6390", "http://127.0.0.1:8275"
FAST = ["optim.epochs=1", "optim.max_steps_per_epoch=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


def _pertadapt(*args: str, ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env=_env())
    if ok:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, s3_store: str) -> Iterator[Path]:
    # a short path: Ray's unix socket paths under the temp dir must stay short
    state = Path(subprocess.run(["mktemp", "-d", "/tmp/pa2n.XXXX"], capture_output=True, text=True,
                                check=True).stdout.strip())
    before = subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True, text=True).stdout.split()
    up = subprocess.run(["bash", str(RECIPE), "up", str(state), "2", "2"], capture_output=True, text=True,
                        timeout=300, env=_env())
    try:
        assert up.returncode == 0, up.stderr + "".join(p.read_text()[-2000:] for p in state.glob("*.log"))
        yield state
    finally:
        pids = [int(p.read_text()) for p in state.glob("*.pid")]
        subprocess.run(["bash", str(RECIPE), "down", str(state)], timeout=300, env=_env())
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        left = set(subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True,
                                  text=True).stdout.split()) - set(before)
        assert not alive, f"recipe processes left running: {alive}"
        assert not left, f"Ray processes left running: {sorted(left)}"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_a_sweep_joins_the_cluster_spreads_ranks_over_two_nodes_and_keeps_its_storage_on_s3(
        two_nodes: Path, tmp_path: Path, s3_store: str) -> None:
    from pertadapt import remote

    abl = tmp_path / "two.yaml"
    abl.write_text("name: twonode\nbase: demo.yaml\nseeds: [1]\nbaselines: false\nresources: {placement: spread}\n"
                   "arms:\n  full: {backbone.pretrain: pretrain_demo.yaml}\n  mean: {model.name: baseline_mean}\n")
    out, store = tmp_path / "sweep", remote.join(s3_store, f"two-{os.getpid()}")
    _pertadapt("sweep", str(abl), *FAST, "--out", str(out), "--address", GCS, "--storage", store, "--no-report")
    rows = _rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [("full/seed1", "ok"), ("mean/seed1", "ok")]
    assert remote.list_dir(store) == ["cache", "data", "ray", "runs"]
    # the full model's frozen-FM table: built once by the sweep before the trial, uploaded, fetched by its node
    tables = remote.list_dir(remote.join(store, "cache", "fm_embeddings"))
    assert [t for t in tables if t.endswith(".npy")], tables
    # its pretrained FM: pretrained by the driver, uploaded once under its weights' digest, loaded from there
    (sha,) = remote.list_dir(remote.join(store, "cache", "checkpoints"))
    checkpoint = remote.join(store, "cache", "checkpoints", sha)
    assert {"config.json", "model.safetensors", "genes.txt", "model_card.json"} <= set(remote.list_files(checkpoint))
    (dataset,) = remote.list_dir(remote.join(store, "data"))  # placed once by the driver, read by every trial
    node_sets = []
    for r in rows:
        run_dir, home = Path(r["run_dir"]), remote.join(store, "runs", r["trial"])
        assert run_dir.parent.parent == out / "runs"  # the driver copied the run directory home
        config = (run_dir / "config.yaml").read_text()
        assert remote.join(store, "data", dataset) in config  # the trial read the dataset from the store...
        prov = json.loads((run_dir / "provenance.json").read_text())
        assert "/remote/" in prov["data_path"]  # ...through its node's local copy
        with tempfile.TemporaryDirectory() as tmp:
            remote.download_file(remote.join(home, "final_metrics.json"), Path(tmp) / "f.json")
            assert (Path(tmp) / "f.json").read_bytes() == (run_dir / "final_metrics.json").read_bytes()
        assert {"data_ready", "trial_start", "trial_end"} <= {
            json.loads(line)["phase"] for line in (run_dir / "timeline.jsonl").read_text().splitlines()}
        ranks = prov["ranks"]
        # the head (which made the data, in the driver) offers no CPUs: no trial ran there
        assert all(k["node_ip"] in ("127.0.0.3", "127.0.0.4") for k in ranks), ranks
        if r["trial"] == "mean/seed1":
            continue
        # Ray Train's checkpoints are on the store; the best one stays there (not copied home)
        assert [e for e in remote.list_dir(remote.join(store, "ray", "train-full-seed1")) if e.startswith("epoch_")]
        assert "ckpt" in remote.list_dir(home)
        assert not (run_dir / "ckpt").exists()
        assert [k["rank"] for k in ranks] == [0, 1]
        weights = prov["backbone_weights"]  # the pretrained weights, through the worker node's copy of the store's
        assert (weights["fm"], weights["checkpoint"], weights["sha256"]) == ("pretrained", checkpoint, sha)
        assert f"/remote/checkpoints/{sha}" in weights["local_copy"]
        assert checkpoint in config
        cache = prov["embedding_cache"]  # its table came from the store: fetched, not built on the node
        assert (cache["used"], cache["hit"], cache["build_s"]) == (True, True, 0.0)
        assert all(k["device"] == "cpu" for k in ranks)
        node_sets.append({k["node_id"] for k in ranks})
    assert [len(s) for s in node_sets] == [2], node_sets  # placement: spread


def test_a_gpu_request_fails_before_any_trial_on_the_cluster(two_nodes: Path, tmp_path: Path) -> None:
    abl = tmp_path / "gpu.yaml"
    abl.write_text("name: gpu\nbase: demo.yaml\nseeds: [1]\nbaselines: false\nresources: {gpus_per_worker: 1}\n"
                   "arms:\n  full: {}\n")
    res = _pertadapt("sweep", str(abl), "--out", str(tmp_path / "sweep"), "--address", GCS, ok=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "resources.gpus_per_worker" in res.stderr
    assert "cluster: CPU 4" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "sweep" / "runs").exists()


def test_cluster_submit_runs_a_sweep_as_a_ray_job(two_nodes: Path, tmp_path: Path) -> None:
    abl = tmp_path / "job.yaml"
    abl.write_text("name: job\nbase: demo.yaml\nseeds: [1]\nbaselines: false\n"
                   "arms:\n  mean: {model.name: baseline_mean}\n")
    out = tmp_path / "job"
    res = _pertadapt("cluster", "submit", "--address", JOBS, "--id", f"pertadapt-test-{os.getpid()}", str(abl),
                     "--out", str(out), "--no-report")
    assert "succeeded" in res.stdout + res.stderr
    rows = _rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [("mean/seed1", "ok")]


def test_the_storage_probe_runs_on_a_worker_node(two_nodes: Path, s3_store: str) -> None:
    """``check_storage_on_worker`` writes the store from a node other than the driver's, with that node's own
    credentials; a store the workers cannot write fails naming the node."""
    import ray

    from pertadapt import remote
    from pertadapt.config import ConfigError
    from pertadapt.sweep.storage import check_storage_on_worker

    ray.init(address=GCS, log_to_driver=False)
    try:
        assert check_storage_on_worker(str(two_nodes)) is None  # a path: nothing to probe
        assert check_storage_on_worker(remote.join(s3_store, "probe")) in ("127.0.0.3", "127.0.0.4")
        with pytest.raises(ConfigError, match=r"--storage: worker node 127\.0\.0\.[34] cannot write to "
                                              r"s3://pertadapt-no-such-bucket/x"):
            check_storage_on_worker("s3://pertadapt-no-such-bucket/x")
    finally:
        ray.shutdown()


def _raylet_of(node_ip: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "raylet" and f"--node_ip_address={node_ip}" in " ".join(p.info["cmdline"] or [])]


def test_losing_a_node_mid_trial_resumes_from_the_last_checkpoint(two_nodes: Path, tmp_path: Path) -> None:
    """SIGKILL the raylet of one of the two worker nodes after the first epoch's checkpoint (last test: the node
    stays down). The trial continues from a saved epoch on the surviving node: through Ray Train's restart when
    its Tune trial actor survived, else through ``--resume`` (the trial errored with its node)."""
    import time

    abl = tmp_path / "loss.yaml"
    # half a CPU per worker: after the loss, both ranks (and the trial's own sliver) fit on the surviving node
    abl.write_text("name: loss\nbase: demo.yaml\nseeds: [1]\nbaselines: false\n"
                   "resources: {placement: spread, cpus_per_worker: 0.5}\narms:\n  full: {}\n")
    out, shared = tmp_path / "sweep", tmp_path / "shared"
    args = ["sweep", str(abl), "optim.epochs=3", "optim.max_steps_per_epoch=3", "engine.max_failures=2",
            "logging.wandb=disabled", "--out", str(out), "--address", GCS, "--storage", str(shared), "--no-report"]
    driver = subprocess.Popen([sys.executable, "-m", "pertadapt.cli", *args], cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    snapshot = shared / "ray" / "train-full-seed1" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 400
    while not (snapshot.is_file() and "epoch_0000" in snapshot.read_text()):
        assert driver.poll() is None, driver.stderr.read()[-3000:] if driver.stderr else ""
        assert time.time() < deadline
        time.sleep(0.5)
    victims = _raylet_of("127.0.0.4")
    assert len(victims) == 1, victims
    os.kill(victims[0], 9)
    driver.communicate(timeout=900)
    rows = _rows(out / "results.csv")
    path = "ray train restart"
    if rows[0]["status"] != "ok":
        path = "--resume"
        _pertadapt(*args, "--resume")
        rows = _rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [("full/seed1", "ok")], path
    run_dir = Path(rows[0]["run_dir"])
    attempts = json.loads((run_dir / "attempts.json").read_text())
    assert len(attempts) >= 2, (path, attempts)
    assert attempts[-1]["resumed_from_epoch"] >= 1, (path, attempts)
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    ranks = json.loads((run_dir / "provenance.json").read_text())["ranks"]
    assert {k["node_ip"] for k in ranks} == {"127.0.0.3"}, ranks  # the last attempt ran on the surviving node
