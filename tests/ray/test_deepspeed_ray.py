"""DeepSpeed trials under Ray Train on CPU: two workers, per-rank safetensors checkpoints, ZeRO-3 ≡ plain torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from pertadapt.config import load_run_config
from pertadapt.report.wandb import find_offline_runs, read_offline_run
from pertadapt.train.run import run
from pertadapt.train.worker import launch

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
STEPS = ["optim.epochs=1", "optim.max_steps_per_epoch=3", "optim.batch_size=16", "optim.micro_batch_size=4"]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "demo.yaml", [f"data.path={demo_h5ad}", *STEPS, *overrides])


@pytest.mark.usefixtures("no_leftover_ray")
def test_two_worker_deepspeed_run_records_world_size_and_reloads(demo_h5ad: Path, tmp_path: Path,
                                                                 assert_checkpoint_reproduces) -> None:
    cfg = _cfg(demo_h5ad, "engine.deepspeed_config=zero2.json", "logging.wandb=offline")
    run_dir = tmp_path / "ds"
    launch(cfg, run_dir)
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["world_size"] == 2
    # rank 0 wrote the model states and the gathered trained tensors; both ranks their optimizer shards and
    # RNG states; every DeepSpeed file is a safetensors file (nothing to unpickle)
    best = run_dir / "ckpt" / "best"
    assert (best / "ds" / "mp_rank_00_model_states.pt").is_file()
    assert len(list((best / "ds").glob("*optim_states.pt"))) == 2
    assert {p.name for p in best.glob("*.json")} == {"state.json", "rank0.json", "rank1.json"}
    for path in [best / "trained.safetensors", *(best / "ds").glob("*.pt")]:
        with safe_open(str(path), framework="pt") as f:
            assert f.keys(), path
    # the consolidated checkpoint reloads into a fresh model and reproduces the saved test predictions
    assert_checkpoint_reproduces(cfg, run_dir)
    # exactly one W&B run (rank 0 only), finished, whose summary is the final metrics
    runs = find_offline_runs(run_dir)
    assert len(runs) == 1
    info = read_offline_run(runs[0])
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert info["summary"]["test_mse_de"] == pytest.approx(final["test_mse_de"])


@pytest.mark.usefixtures("no_leftover_ray")
def test_zero3_two_workers_matches_plain_torch(demo_h5ad: Path, tmp_path: Path, assert_checkpoint_reproduces) -> None:
    """Same cells per optimiser step at any world size, so the losses agree up to float reductions.

    Validation metrics are not compared: BatchNorm running statistics are updated per rank on half the
    micro-batches and averaged, which after three steps is a different (not wrong) estimate. Value clipping
    per micro-batch is world-size invariant; the reference's clipping of the accumulated gradient is not
    (each rank clamps its own partial sum, as under the reference's DDP ``no_sync``), so it is not used here.
    """
    common = ["logging.wandb=disabled", "optim.clip_mode=per_micro_batch"]
    run(_cfg(demo_h5ad, "engine.name=torch", "engine.workers=1", *common), tmp_path / "torch")
    ds_cfg = _cfg(demo_h5ad, "engine.deepspeed_config=zero3.json", *common)
    launch(ds_cfg, tmp_path / "zero3")
    rows = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
            for name in ("torch", "zero3")}
    assert rows["zero3"]["train_loss"] == pytest.approx(rows["torch"]["train_loss"], rel=1e-4)
    assert_checkpoint_reproduces(ds_cfg, tmp_path / "zero3")  # ZeRO-3 partitions were gathered at save time


@pytest.mark.usefixtures("no_leftover_ray")
def test_zero3_bf16_autocast_two_workers_trains(demo_h5ad: Path, tmp_path: Path) -> None:
    """bf16 mixed precision (torch autocast under ZeRO-3: fp32 master weights and BatchNorm) on 2 workers."""
    import math

    cfg = _cfg(demo_h5ad, "engine.deepspeed_config=zero3_autocast_bf16.json", "logging.wandb=disabled")
    launch(cfg, tmp_path / "bf16")
    final = json.loads((tmp_path / "bf16" / "final_metrics.json").read_text())
    assert math.isfinite(final["test_mse_de"])
    assert json.loads((tmp_path / "bf16" / "provenance.json").read_text())["world_size"] == 2
    launch(_cfg(demo_h5ad, "engine.deepspeed_config=zero3.json", "logging.wandb=disabled"),
                       tmp_path / "fp32")
    bf16, fp32 = (json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
                  for n in ("bf16", "fp32"))
    assert bf16 != fp32  # the precision knob really changes the arithmetic ...
    assert bf16 == pytest.approx(fp32, rel=5e-2)  # ... and only by rounding


@pytest.mark.usefixtures("no_leftover_ray")
def test_zero3_cpu_offload_matches_zero3(demo_h5ad: Path, tmp_path: Path) -> None:
    """Optimizer + parameter offload (ZeRO-Infinity style, to CPU) changes where state lives, not the maths."""
    common = ["logging.wandb=disabled"]
    for name in ("zero3", "zero3_offload"):
        launch(_cfg(demo_h5ad, f"engine.deepspeed_config={name}.json", *common), tmp_path / name)
    losses = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
              for n in ("zero3", "zero3_offload")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
