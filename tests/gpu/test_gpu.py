"""GPU checks (``-m gpu``; skipped without CUDA): the adapter, sparse attention and a training run on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask, masked_attention, sparse_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[2]


def test_masked_adapter_matches_cpu_on_gpu() -> None:
    torch.manual_seed(0)
    n = 3000
    rng = np.random.default_rng(0)
    rows = [np.unique(np.r_[i, rng.choice(n, 40)]) for i in range(n)]
    indptr = torch.tensor(np.r_[0, np.cumsum([len(r) for r in rows])])
    indices = torch.tensor(np.concatenate(rows))
    adapter = PerturbationAdapter(64, 8, 32, 1, SparseMask(indptr, indices), chunk_size=512).eval()
    x = torch.randn(2, n, 64)
    with torch.no_grad():
        cpu = adapter(x)
        gpu = adapter.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("density", [0.08, 1.0])
def test_sparse_attention_equals_chunked_on_gpu_forward_and_backward(density: float) -> None:
    """The ``torch.sparse`` backend on CUDA against the chunked SDPA path on CUDA, with empty rows."""
    n = 3000
    rng = np.random.default_rng(0)
    dense = rng.random((n, n)) < density
    dense[[0, 10, 2999]] = False
    indptr = torch.from_numpy(np.r_[0, np.cumsum(dense.sum(1))])
    mask = SparseMask(indptr, torch.from_numpy(np.nonzero(dense)[1])).cuda()
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 8, n, 64, generator=g).cuda() for _ in range(4))
    results = []
    for fn in (lambda *x: masked_attention(*x, mask, chunk_size=512, impl="chunked"),
               lambda *x: sparse_attention(*x, mask)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        results.append([out.detach(), *torch.autograd.grad(out, x, grad)])
    for ref, got in zip(*results, strict=True):
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert torch.count_nonzero(results[1][0][:, :, [0, 10, 2999]]) == 0


def test_training_run_on_gpu(demo_h5ad: Path, tmp_path: Path) -> None:
    from pertadapt.config import load_run_config
    from pertadapt.train.run import run

    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", "engine.use_gpu=true"])
    metrics = run(cfg, tmp_path / "gpu")
    assert np.isfinite(metrics["test_mse_de"])


GPU_STEPS = ["optim.epochs=1", "optim.max_steps_per_epoch=3", "optim.batch_size=16", "optim.micro_batch_size=4",
             "logging.wandb=disabled", "engine.use_gpu=true"]


def _gpu_trial(demo_h5ad: Path, run_dir: Path, *overrides: str) -> dict:
    """One DeepSpeed trial on Ray Train workers with one GPU each (NCCL, LOCAL_RANK → cuda:<n>)."""
    import json

    from pertadapt.config import load_run_config
    from pertadapt.train.worker import launch

    cfg = load_run_config(REPO / "configs" / "demo.yaml", [f"data.path={demo_h5ad}", *GPU_STEPS, *overrides])
    metrics = launch(cfg, run_dir)
    assert np.isfinite(metrics["test_mse_de"])
    return json.loads((run_dir / "provenance.json").read_text())


@pytest.mark.ray  # starts a local Ray: with the Ray tests, one at a time
@pytest.mark.parametrize("zero", ["zero2.json", "zero3.json", "zero3_autocast_bf16.json"])
def test_one_gpu_deepspeed_trial(demo_h5ad: Path, tmp_path: Path, zero: str) -> None:
    prov = _gpu_trial(demo_h5ad, tmp_path / zero, "engine.workers=1", f"engine.deepspeed_config={zero}",
                      "optim.micro_batch_size=16")
    assert [r["device"] for r in prov["ranks"]] == ["cuda:0"]


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_workers_one_process_per_gpu(demo_h5ad: Path, tmp_path: Path) -> None:
    prov = _gpu_trial(demo_h5ad, tmp_path / "two", "engine.workers=2", "engine.deepspeed_config=zero2.json")
    assert sorted(r["local_rank"] for r in prov["ranks"]) == [0, 1]
    assert sorted(r["device"] for r in prov["ranks"]) == ["cuda:0", "cuda:1"]


def test_batches_reach_the_gpu_through_pinned_memory() -> None:
    from pertadapt.types import Batch

    long = torch.zeros(2, 2, dtype=torch.long)
    b = Batch(x_ctrl=torch.ones(2, 3), total_count=torch.ones(2), y=torch.ones(2, 3), pert_idx=long,
              pert_gene_pos=long, cond_id=torch.zeros(2, dtype=torch.long), is_ctrl=torch.zeros(2, dtype=torch.bool),
              de_idx=long, nz_mask=torch.ones(2, 3, dtype=torch.bool))
    moved = b.to("cuda")
    torch.cuda.synchronize()
    assert moved.x_ctrl.device.type == "cuda"
    assert torch.equal(moved.x_ctrl.cpu(), b.x_ctrl)


def test_cache_benchmark_runs_on_gpu_and_agrees() -> None:
    from pertadapt.bench.train import run_cache_benchmark

    result = run_cache_benchmark(300, hidden_size=32, layers=1, heads=2, pool=8, steps=1, repeats=1, device="cuda")
    assert "CUDA" in result["config"]
    assert result["max_rel_diff"] <= 1e-5


def test_bf16_evaluation_error_against_fp32(demo_h5ad: Path, tmp_path: Path) -> None:
    """``eval.precision: bf16`` on CUDA against fp32: one training epoch (fp32 both times), then the test metrics.

    The figures go to ``$PERTADAPT_GPU_FIGURES/bf16_eval.json`` when that variable is set (for docs/evaluation.md).
    """
    import json
    import os

    from pertadapt.config import load_run_config
    from pertadapt.train.run import run

    base = [f"data.path={demo_h5ad}", "engine.use_gpu=true", "optim.epochs=1", "logging.wandb=disabled", "seed=1"]
    metrics = {p: run(load_run_config(REPO / "configs" / "smoke.yaml", [*base, f"eval.precision={p}"]), tmp_path / p)
               for p in ("fp32", "bf16")}
    names = ("test_mse_de", "test_mse", "test_pearson_delta_de", "test_pearson")
    rel = {n: abs(metrics["bf16"][n] - metrics["fp32"][n]) / abs(metrics["fp32"][n]) for n in names}
    figures = {"device": torch.cuda.get_device_name(0), **{f"{p}_{n}": metrics[p][n] for p in metrics for n in names},
               **{f"rel_{n}": v for n, v in rel.items()}}
    if os.environ.get("PERTADAPT_GPU_FIGURES"):
        Path(os.environ["PERTADAPT_GPU_FIGURES"], "bf16_eval.json").write_text(json.dumps(figures, indent=1))
    assert metrics["bf16"]["test_mse_de"] != metrics["fp32"]["test_mse_de"]  # bf16 reached the evaluation
    assert rel["test_mse_de"] <= 1e-2
    assert rel["test_pearson_delta_de"] <= 5e-2
