"""A sweep's resource check against live nodes and an autoscaler's node types (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pertadapt.config import ConfigError
from pertadapt.sweep.ablation import load_ablation
from pertadapt.sweep.resources import capacity, check_resources, cluster_concurrency, read_node_types, summed

REPO = Path(__file__).resolve().parents[2]
#: A head advertising no CPUs and two 2-CPU workers: the local multi-node recipe.
CPU_NODES = [{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]


def _ablation(tmp_path: Path, resources: str):
    path = tmp_path / "abl.yaml"
    path.write_text(f"name: r\nbase: {REPO / 'configs' / 'demo.yaml'}\nseeds: [1]\nbaselines: true\n"
                    f"resources: {resources}\narms:\n  full: {{}}\n")
    return load_ablation(path)


def test_trials_that_fit_the_live_nodes_need_no_autoscaler(tmp_path: Path) -> None:
    abl = _ablation(tmp_path, "{workers: 2, cpus_per_worker: 2}")  # one worker per 2-CPU node
    assert check_resources(abl, CPU_NODES) == {}
    assert cluster_concurrency(abl, {"CPU": 4.0}) == 1


def test_a_worker_no_node_holds_fails_naming_the_key_even_when_the_cluster_total_would(tmp_path: Path) -> None:
    abl = _ablation(tmp_path, "{workers: 1, cpus_per_worker: 3}")
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_worker .*largest node: 2 CPU; cluster: CPU 4"):
        check_resources(abl, CPU_NODES)


def test_a_gpu_trial_on_an_autoscaling_cluster_names_the_node_type_that_holds_it(tmp_path: Path) -> None:
    types = read_node_types(REPO / "cluster" / "ray" / "aws.yaml")
    assert [(t.name, t.resources, t.max_workers) for t in types] == [
        ("gpu_worker", {"CPU": 48.0, "GPU": 4.0, "accelerator_type:A10G": 1.0}, 4)]
    abl = _ablation(tmp_path, "{workers: 4, gpus_per_worker: 2}")  # two g5.12xlarge nodes
    scaled = check_resources(abl, [{"CPU": 0.0}], types)
    assert scaled == {t.key: "gpu_worker" for t in abl.trials}  # no CPU on the head: baselines wait for one too
    # 4 autoscaled nodes × 4 GPUs hold two 8-GPU trials at once
    assert cluster_concurrency(abl, summed(capacity([{"CPU": 0.0}], types))) == 2
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker .*autoscaler node types: gpu_worker "
                                          r"\(CPU 48, GPU 4, accelerator_type:A10G 1, up to 4\)"):
        check_resources(_ablation(tmp_path, "{workers: 2, gpus_per_worker: 5}"), [{"CPU": 0.0}], types)


def test_an_unreadable_autoscaler_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster_name: x\n")
    with pytest.raises(ConfigError, match=r"cluster\.yaml: available_node_types"):
        read_node_types(bad)


def test_the_gpu_ablation_example_is_the_demo_with_gpu_resources() -> None:
    demo, gpu = load_ablation(REPO / "ablations" / "demo.yaml"), load_ablation(REPO / "ablations" / "demo_gpu.yaml")
    assert [t.key for t in gpu.trials] == [t.key for t in demo.trials]
    model = next(t for t in gpu.trials if t.config.uses_ray_train)
    assert (model.config.engine.workers, model.config.engine.gpus_per_worker) == (2, 1.0)
    for recipe in ("aws.yaml", "gcp.yaml"):  # both autoscaled GPU worker types hold every trial
        types = read_node_types(REPO / "cluster" / "ray" / recipe)
        assert set(check_resources(gpu, [{"CPU": 0.0}], types).values()) == {"gpu_worker"}
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker .*cluster: CPU 16\)"):
        check_resources(gpu, [{"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 8.0}])  # CPUs enough, no GPU


def test_node_groups_reported_to_the_gcs_become_node_types() -> None:
    from ray.core.generated import autoscaler_pb2

    from pertadapt.sweep.resources import UNBOUNDED, node_types_from_cluster_config

    config = autoscaler_pb2.ClusterConfig()
    config.node_group_configs.add(name="headgroup", max_count=0)  # no resources, no nodes: left out
    gpu = config.node_group_configs.add(name="gpu", min_count=0, max_count=4)
    gpu.resources.update({"CPU": 8, "GPU": 1})
    cpu = config.node_group_configs.add(name="cpu", min_count=0, max_count=-1)
    cpu.resources.update({"CPU": 2})
    types = node_types_from_cluster_config(config)
    assert [(t.name, t.resources, t.max_workers) for t in types] == [
        ("gpu", {"CPU": 8.0, "GPU": 1.0}, 4), ("cpu", {"CPU": 2.0}, UNBOUNDED)]


def test_the_paper_table_asks_one_gpu_per_model_trial_and_a_cpu_only_cluster_refuses_it() -> None:
    paper = REPO / "ablations" / "paper_table.yaml"
    abl = load_ablation(paper)  # builds on a machine without a GPU: the plan never looks for one
    assert {(t.is_baseline, t.config.engine.gpus) for t in abl.trials} == {(False, 1.0), (True, 0.0)}
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_worker .* of trial norman/aido_cell/none/seed1"):
        check_resources(abl, [{"CPU": 16.0}])
    assert check_resources(abl, [{"CPU": 16.0, "GPU": 1.0}]) == {}
    # on CPU on purpose: one override, and the same cluster holds it
    assert check_resources(load_ablation(paper, extra_overrides={"engine.gpus_per_worker": 0}), [{"CPU": 16.0}]) == {}
