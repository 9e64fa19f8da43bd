"""DeepSpeed trials under Ray Train on CPU: two workers, per-rank safetensors checkpoints, ZeRO-3 ≡ plain torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from fixtures.wandb_offline import find_offline_runs, read_offline_run
from pertadapt.config import load_run_config
from pertadapt.train.run import run
from pertadapt.train.worker import launch

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
STEPS = ["optim.epochs=1", "optim.max_steps_per_epoch=3", "optim.batch_size=16", "optim.micro_batch_size=4"]


#: Value clipping per micro-batch is world-size invariant (the reference's accumulated clipping is not: each
#: rank clamps its own partial sum, as under the reference's DDP ``no_sync``), so ZeRO-3 can be held to torch.
PER_MICRO_BATCH = ["logging.wandb=disabled", "optim.clip_mode=per_micro_batch"]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "demo.yaml", [f"data.path={demo_h5ad}", *STEPS, *overrides])


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for this module's trials (each launch would otherwise start and stop its own)."""
    import ray

    ray.init(num_cpus=3, _node_ip_address="127.0.0.2", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def zero3_run(local_ray, demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-worker ZeRO-3 fp32 run (per-micro-batch clipping), the reference of the precision/offload tests."""
    run_dir = tmp_path_factory.mktemp("zero3") / "zero3"
    launch(_cfg(demo_h5ad, "engine.deepspeed_config=zero3.json", *PER_MICRO_BATCH), run_dir)
    return run_dir


def _first_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]


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


def test_zero3_two_workers_matches_plain_torch(demo_h5ad: Path, zero3_run: Path, tmp_path: Path,
                                              assert_checkpoint_reproduces) -> None:
    """Same cells per optimiser step at any world size, so the losses agree up to float reductions.

    Validation metrics are not compared: BatchNorm running statistics are updated per rank on half the
    micro-batches and averaged, which after three steps is a different (not wrong) estimate.
    """
    run(_cfg(demo_h5ad, "engine.name=torch", "engine.workers=1", *PER_MICRO_BATCH), tmp_path / "torch")
    assert _first_loss(zero3_run) == pytest.approx(_first_loss(tmp_path / "torch"), rel=1e-4)
    # ZeRO-3 partitions were gathered at save time
    assert_checkpoint_reproduces(_cfg(demo_h5ad, "engine.deepspeed_config=zero3.json", *PER_MICRO_BATCH), zero3_run)


def test_zero3_bf16_autocast_two_workers_trains(demo_h5ad: Path, zero3_run: Path, tmp_path: Path) -> None:
    """bf16 mixed precision (torch autocast under ZeRO-3: fp32 master weights and BatchNorm) on 2 workers."""
    import math

    launch(_cfg(demo_h5ad, "engine.deepspeed_config=zero3_autocast_bf16.json", *PER_MICRO_BATCH), tmp_path / "bf16")
    final = json.loads((tmp_path / "bf16" / "final_metrics.json").read_text())
    assert math.isfinite(final["test_mse_de"])
    assert json.loads((tmp_path / "bf16" / "provenance.json").read_text())["world_size"] == 2
    bf16, fp32 = _first_loss(tmp_path / "bf16"), _first_loss(zero3_run)
    assert bf16 != fp32  # the precision knob really changes the arithmetic ...
    assert bf16 == pytest.approx(fp32, rel=5e-2)  # ... and only by rounding


def test_zero3_cpu_offload_matches_zero3(demo_h5ad: Path, zero3_run: Path, tmp_path: Path) -> None:
    """Optimizer + parameter offload (ZeRO-Infinity style, to CPU) changes where state lives, not the maths."""
    launch(_cfg(demo_h5ad, "engine.deepspeed_config=zero3_offload.json", *PER_MICRO_BATCH), tmp_path / "offload")
    assert _first_loss(tmp_path / "offload") == pytest.approx(_first_loss(zero3_run), rel=1e-4)
