"""The sweep's resource pre-check on an autoscaling cluster whose live nodes cannot hold a trial yet.

A real local Ray head with no CPUs and no GPUs stands for a KubeRay head whose GPU worker group is at 0
replicas. What KubeRay's autoscaler v2 reports to the GCS (the worker groups: resources and max replicas,
a ``ClusterConfig`` under Ray's autoscaler-state key) is written there from the shipped ``raycluster.yaml``,
as that autoscaler would; the pre-check (:func:`prepare_cluster`) then reads it through Ray's own
``state.get_cluster_config`` and asks the autoscaler for a trial (``ray.autoscaler.sdk.request_resources``,
read back from the GCS where the autoscaler picks it up). No autoscaler process runs: nothing is launched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pertadapt.config import ConfigError
from pertadapt.sweep.ablation import load_ablation
from pertadapt.sweep.resources import (
    autoscaler_node_types,
    node_types_from_cluster_config,
    prepare_cluster,
    read_node_types,
    release_cluster,
)

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def _ablation(tmp_path: Path, resources: str):
    path = tmp_path / "abl.yaml"
    path.write_text(f"name: r\nbase: {REPO / 'configs' / 'demo.yaml'}\nseeds: [1]\nbaselines: false\n"
                    f"resources: {resources}\narms:\n  full: {{}}\n")
    return load_ablation(path)


def _cluster_config_of(manifest: Path):
    """The ClusterConfig KubeRay's autoscaler v2 reports for a RayCluster manifest's worker groups."""
    from ray.core.generated import autoscaler_pb2

    spec = yaml.safe_load(manifest.read_text())["spec"]
    config = autoscaler_pb2.ClusterConfig()
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        ngc = config.node_group_configs.add(name=group["groupName"], min_count=group["minReplicas"],
                                            max_count=group["maxReplicas"])
        ngc.resources["CPU"] = int(limits["cpu"])
        ngc.resources["GPU"] = int(limits.get("nvidia.com/gpu", 0))
    return config


def _requested() -> list[dict[str, float]] | None:
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


@pytest.fixture
def zero_cpu_head(no_leftover_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    import ray

    monkeypatch.setattr("pertadapt.sweep.resources.AUTOSCALER_CONFIG", tmp_path / "no_bootstrap_config.yaml")
    ray.init(num_cpus=0, num_gpus=0, _node_ip_address="127.0.0.2", include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _report_worker_groups(config) -> None:
    import ray._raylet
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(),
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)


def test_a_trial_only_an_autoscaled_group_holds_asks_the_autoscaler(zero_cpu_head: None, tmp_path: Path) -> None:
    abl = _ablation(tmp_path, "{workers: 2, cpus_per_worker: 4, gpus_per_worker: 1}")
    # no bootstrap config, nothing reported: the 0-CPU head holds nothing and the check refuses, as before
    assert autoscaler_node_types() == []
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_worker .*largest node: 0 CPU; cluster: nothing"):
        prepare_cluster(abl)
    assert _requested() is None
    _report_worker_groups(_cluster_config_of(REPO / "cluster" / "kuberay" / "raycluster.yaml"))
    (gpu,) = autoscaler_node_types()
    assert (gpu.name, gpu.resources, gpu.max_workers) == ("gpu", {"CPU": 8.0, "GPU": 1.0}, 4)
    nodes, types = prepare_cluster(abl)
    assert types == [gpu]
    assert sum(n.get("CPU", 0.0) for n in nodes) == 0.0
    assert _requested() == [{"CPU": 4.0, "GPU": 1.0}] * 2  # one trial's two workers, for the autoscaler
    release_cluster()
    assert _requested() == []


def test_a_trial_no_group_can_ever_hold_fails_before_any_request(zero_cpu_head: None, tmp_path: Path) -> None:
    _report_worker_groups(_cluster_config_of(REPO / "cluster" / "kuberay" / "raycluster.yaml"))
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker .*autoscaler node types: gpu "
                                          r"\(CPU 8, GPU 1, up to 4\)"):
        prepare_cluster(_ablation(tmp_path, "{workers: 1, gpus_per_worker: 2}"))  # 2 GPUs on one 1-GPU pod
    assert _requested() is None


def test_node_types_from_the_shipped_launcher_files_hold_their_gpu_ablation(tmp_path: Path) -> None:
    gcp = read_node_types(REPO / "cluster" / "ray" / "gcp.yaml")
    assert [(t.name, t.resources) for t in gcp] == [("gpu_worker", {"CPU": 16.0, "GPU": 2.0,
                                                                    "accelerator_type:T4": 1.0})]
    from pertadapt.sweep.resources import check_resources

    abl = _ablation(tmp_path, "{workers: 2, gpus_per_worker: 1, accelerator_type: T4}")
    assert set(check_resources(abl, [{"CPU": 0.0}], gcp).values()) == {"gpu_worker"}
    aws = read_node_types(REPO / "cluster" / "ray" / "aws.yaml")
    with pytest.raises(ConfigError, match="accelerator_type"):
        check_resources(abl, [{"CPU": 0.0}], aws)  # A10G nodes: a T4 trial never fits
    assert node_types_from_cluster_config(None) == []


@pytest.fixture
def v2_head(no_leftover_ray: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A 0-CPU head running Ray's autoscaler v2 (read-only here: no provider, so it never launches a node)."""
    import ray

    monkeypatch.setattr("pertadapt.sweep.resources.AUTOSCALER_CONFIG", tmp_path / "no_bootstrap_config.yaml")
    monkeypatch.setenv("RAY_enable_autoscaler_v2", "1")
    ray.init(num_cpus=0, num_gpus=0, _node_ip_address="127.0.0.2", include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _constraints() -> list[dict[str, float]]:
    """The cluster resource constraint the autoscaler v2 reads from the GCS (what request_resources asked)."""
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    state = get_cluster_resource_state(internal_kv_get_gcs_client())
    return [dict(r.request.resources_bundle) for c in state.cluster_resource_constraints
            for r in c.resource_requests for _ in range(r.count)]


def test_without_node_types_the_check_asks_the_v2_autoscaler_and_waits_for_a_node(
        v2_head: str, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    from pertadapt.sweep.resources import autoscaler_v2_runs

    assert autoscaler_v2_runs()
    assert autoscaler_node_types() == []
    abl = _ablation(tmp_path, "{workers: 1, cpus_per_worker: 2}")
    # nobody adds a node: the check asks, waits, then fails naming the key and withdraws the request
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_worker .*added no node that holds it in 2 s"):
        prepare_cluster(abl, scale_timeout_s=2, poll_s=0.5)
    assert _constraints() == []
    # a node that holds the trial joins while the check waits (as the autoscaler's new pod would)
    out: dict[str, object] = {}

    def check() -> None:
        try:
            out["nodes"] = prepare_cluster(abl, scale_timeout_s=240, poll_s=1)[0]
        except ConfigError as e:  # pragma: no cover - reported below
            out["error"] = e

    waiter = threading.Thread(target=check)
    waiter.start()
    deadline = time.monotonic() + 30
    while not _constraints() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _constraints() == [{"CPU": 2.0}]  # what one trial's worker needs, asked of the autoscaler
    ray_exe = Path(sys.executable).with_name("ray")
    # its own short temp dir: `ray start` leaves the cluster's address there (not in /tmp/ray, where every later
    # local ray.init on this machine would find it)
    temp = tempfile.mkdtemp(prefix="pa-as", dir="/tmp")
    worker = subprocess.Popen([str(ray_exe), "start", "--block", f"--address={v2_head}", "--node-ip-address=127.0.0.3",
                               "--num-cpus=2", "--dashboard-agent-listen-port=52391", "--metrics-export-port=8091",
                               f"--temp-dir={temp}", "--disable-usage-stats"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waiter.join(timeout=240)
        assert not waiter.is_alive()
        assert "error" not in out, out.get("error")
        assert any(n.get("CPU") == 2.0 for n in out["nodes"])  # type: ignore[union-attr]
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    release_cluster()
    assert _constraints() == []
