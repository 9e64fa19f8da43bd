"""`pertadapt pretrain` on two DeepSpeed workers under Ray Train: the same loss curve as one torch process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pertadapt.config.pretrain import load_pretrain_config
from pertadapt.train.pretrain import read_model_card
from pertadapt.train.worker import launch_pretrain

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SMALL = ["steps=4", "checkpoint_every=2", "optim.micro_batch_size=8", "objective.edge_cells=1", "logging.wandb=offline"]


@pytest.mark.usefixtures("no_leftover_ray")
def test_two_deepspeed_workers_pretrain_as_one_torch_process(demo_h5ad: Path, tmp_path: Path) -> None:
    import ray

    demo = REPO / "configs" / "pretrain_demo.yaml"
    torch_run = launch_pretrain(load_pretrain_config(demo, [f"data.path={demo_h5ad}", *SMALL]), tmp_path / "torch")
    cfg = load_pretrain_config(demo, [f"data.path={demo_h5ad}", *SMALL, "engine.name=deepspeed", "engine.workers=2"])
    ray.init(num_cpus=3, _node_ip_address="127.0.0.2", log_to_driver=False)
    try:
        ds_run = launch_pretrain(cfg, tmp_path / "ds")
    finally:
        ray.shutdown()
    a, b = read_model_card(tmp_path / "torch"), read_model_card(tmp_path / "ds")
    assert a is not None
    assert b is not None
    # each rank takes half of every step's cells; DeepSpeed averages the ranks' gradients
    np.testing.assert_allclose(b["loss_curve"], a["loss_curve"], rtol=1e-4)
    assert ds_run["heldout_masked_mse"] == pytest.approx(torch_run["heldout_masked_mse"], rel=1e-3)
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["n_genes"] == 240
    assert not (tmp_path / "ds" / "resume").exists()
    assert len(list((tmp_path / "ds").rglob("offline-run-*"))) == 1  # rank 0's W&B run only
