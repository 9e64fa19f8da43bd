"""A run's engine.* placement keys reach Ray Train's ScalingConfig (no Ray started)."""

from __future__ import annotations

from pathlib import Path

from pertadapt.config import load_run_config
from pertadapt.train.worker import scaling_config

REPO = Path(__file__).resolve().parents[2]


def test_placement_gpus_and_accelerator_type_reach_the_scaling_config() -> None:
    cfg = load_run_config(REPO / "configs" / "demo.yaml",
                          ["engine.placement=spread", "engine.gpus_per_worker=1", "engine.accelerator_type=H100",
                           "engine.cpus_per_worker=4"])
    sc = scaling_config(cfg)
    assert sc.num_workers == 2
    assert sc.placement_strategy == "SPREAD"
    assert sc.use_gpu is True
    assert sc.accelerator_type == "H100"
    assert sc.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    # Ray turns the accelerator type into a resource every worker bundle asks for
    assert all("accelerator_type:H100" in b for b in sc.as_placement_group_factory().bundles[1:])


def test_defaults_pack_cpu_workers() -> None:
    sc = scaling_config(load_run_config(REPO / "configs" / "demo.yaml"))
    assert (sc.placement_strategy, sc.use_gpu, sc.accelerator_type) == ("PACK", False, None)
    assert sc.resources_per_worker == {"CPU": 1.0}
