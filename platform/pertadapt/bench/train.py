"""Benchmarks of the training path: the adapter, its attention, and the frozen-FM embedding cache.

``run_adapter_benchmark`` measures that the GO-masked adapter builds and runs a forward + backward at
batch 1 without ever materialising an ``N x N`` tensor (peak RSS is printed next to the dense-mask
size it avoids). ``run_attention_benchmark`` times the sparse attention path against the chunked one
in the same run, on the same inputs, and checks that they agree. ``run_cache_benchmark`` times a
training epoch with the embedding cache against recomputing the frozen FM, in the same run.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pertadapt.bench.go import fm_genes
from pertadapt.bench.measure import measure, peak_rss_mib
from pertadapt.go import GOMask, cached_go_mask, load_annotations
from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask, masked_attention, sparse_attention

__all__ = ["run_adapter_benchmark", "run_attention_benchmark", "run_cache_benchmark"]

#: d-length products per allowed pair: chunked = forward twice (checkpointed chunks) x (QK, PV) +
#: backward (dP, dQ, dK, dV); sparse = forward (QK, PV) + backward (QK again, dP, dQ, dK, dV).
_CHUNKED_PRODUCTS, _SPARSE_PRODUCTS = 8, 7


def _fm_go_mask(n_genes: int | None) -> tuple[list[str], GOMask, float]:
    """The first ``n_genes`` FM vocabulary genes (default all), their cached GO mask and its build time (s)."""
    genes = fm_genes(n_genes)
    t0 = time.perf_counter()
    mask = cached_go_mask(load_annotations("bundled"), genes, threshold=0.1, kind="go")
    return genes, mask, time.perf_counter() - t0


def _sparse_mask(mask: GOMask) -> SparseMask:
    csr = mask.csr
    return SparseMask(torch.from_numpy(csr.indptr.astype("int64")), torch.from_numpy(csr.indices.astype("int64")))


def run_adapter_benchmark(n_genes: int | None = None, *, d: int = 512, heads: int = 8, ffn_dim: int = 256,
                          chunk_size: int = 2048, device: str = "cpu", attention_impl: str = "auto") -> dict[str, float]:
    """Forward + backward of the paper-size PA over the FM vocabulary (or its first ``n_genes``).

    Parameters
    ----------
    n_genes
        First ``n_genes`` of the 19,264-gene vocabulary (default: all).
    d, heads, ffn_dim
        Adapter sizes (paper: 512, 8, 256).
    chunk_size
        Queries per attention chunk.
    device
        ``cpu`` or ``cuda`` (then the peak GPU memory is reported too).
    attention_impl
        ``chunked``, ``sparse`` or ``auto`` (``adapter.attention_impl``).

    Returns
    -------
    dict
        ``n_genes``, ``attention_impl`` (the path taken), ``mask_density``, ``params``, ``mask_s``, ``forward_backward_s``, ``peak_rss_mb``,
        ``peak_gpu_mb`` (CUDA only) and ``dense_fp32_mask_mb`` (what a dense float mask alone would cost).
    """
    genes, mask, t_mask = _fm_go_mask(n_genes)
    sparse = _sparse_mask(mask)
    adapter = PerturbationAdapter(d, heads, ffn_dim, 1, sparse, chunk_size, attention_impl=attention_impl).to(device)
    x = torch.randn(1, len(genes), d, device=device, requires_grad=True)
    if device == "cuda":  # warm-up outside the timing (kernel selection, allocator)
        adapter(x).square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    adapter(x).square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    t_fb = time.perf_counter() - t0
    n = len(genes)
    out = {"n_genes": n, "attention_impl": adapter.blocks[0].last_attention_impl, "mask_density": mask.density, "params": sum(p.numel() for p in adapter.parameters()),
           "mask_s": t_mask, "forward_backward_s": t_fb, "peak_rss_mb": peak_rss_mib(),
           "dense_fp32_mask_mb": n * n * 4 / 2**20}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_attention_benchmark(n_genes: int | None = None, *, heads: int = 8, d: int = 512, chunk_size: int = 2048,
                            device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Forward + backward of the sparse attention path against the chunked one, same inputs, same run.

    Parameters
    ----------
    n_genes
        First ``n_genes`` of the 19,264-gene vocabulary (default: all), masked by their real GO mask.
    heads, d
        Attention heads and model width (paper: 8, 512; head dim ``d / heads``); batch 1.
    chunk_size
        Queries per chunk of the chunked path (checkpointed as in the adapter when ``N > chunk_size``).
    device
        ``cpu`` or ``cuda``.
    seed
        Seed of the random ``q, k, v`` ``(1, heads, N, d / heads)`` and of the upstream gradient.

    Returns
    -------
    dict
        ``n_genes``, ``heads``, ``d``, ``device``, ``threads``, ``mask_density``, ``nnz``,
        ``chunked_s``, ``sparse_s``, ``speedup`` (chunked / sparse time), ``chunked_peak_mb``,
        ``sparse_peak_mb``, ``peak_mem_ratio`` (sparse / chunked), ``max_rel_diff`` (largest
        ``max |sparse - chunked| / max |chunked|`` over the output and the gradients of q, k, v),
        ``flops_frac`` (products the sparse path computes / the dense ones: the mask density),
        ``chunked_gflops``, ``sparse_gflops`` (each counting its own products), ``lower_bound_s``
        (the allowed pairs' products at the chunked path's throughput), ``lower_bound_frac``
        (``lower_bound_s / sparse_s``: the achieved fraction of the sparse lower bound),
        ``break_even_density`` (the density at which the two would tie if the sparse cost stays
        proportional to the allowed pairs) and ``dense_fp32_scores_mb`` (one N x N score matrix per head).
    """
    if d % heads:
        raise ValueError(f"d={d} is not divisible by heads={heads}")
    genes, go_mask, _ = _fm_go_mask(n_genes)
    mask = _sparse_mask(go_mask).to(device)
    n, dh = len(genes), d // heads
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, heads, n, dh, generator=g).to(device) for _ in range(4))
    n_tiny = min(64, n)  # compile / warm up both paths outside the timing
    tiny = _sparse_mask(_fm_go_mask(n_tiny)[1]).to(device)
    for impl in ("chunked", "sparse"):
        x = [t[:, :, :n_tiny].clone().requires_grad_() for t in (q, k, v)]
        masked_attention(*x, tiny, impl=impl).sum().backward()

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        x = [t.clone().requires_grad_() for t in (q, k, v)]  # inputs exist before the memory baseline

        def run() -> list[torch.Tensor]:
            out = fn(*x)
            return [out.detach(), *torch.autograd.grad(out, x, grad)]
        return run

    ref, chunked_s, chunked_mb = measure(fwd_bwd(lambda *x: masked_attention(
        *x, mask, chunk_size=chunk_size, checkpoint_chunks=n > chunk_size, impl="chunked")), device)
    got, sparse_s, sparse_mb = measure(fwd_bwd(lambda *x: sparse_attention(*x, mask)), device)
    max_rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
    density = mask.density
    chunked_gflops = _CHUNKED_PRODUCTS * 2 * n * n * heads * dh / chunked_s / 1e9
    sparse_gflops = _SPARSE_PRODUCTS * 2 * mask.nnz * heads * dh / sparse_s / 1e9
    lower_bound_s = chunked_s * density * _SPARSE_PRODUCTS / _CHUNKED_PRODUCTS
    return {"n_genes": n, "heads": heads, "d": d, "device": device, "threads": torch.get_num_threads(),
            "mask_density": density, "nnz": mask.nnz, "chunked_s": chunked_s, "sparse_s": sparse_s,
            "speedup": chunked_s / sparse_s, "chunked_peak_mb": chunked_mb, "sparse_peak_mb": sparse_mb,
            "peak_mem_ratio": sparse_mb / chunked_mb if chunked_mb > 0 else math.nan, "max_rel_diff": max_rel,
            "flops_frac": density, "chunked_gflops": chunked_gflops, "sparse_gflops": sparse_gflops,
            "lower_bound_s": lower_bound_s, "lower_bound_frac": lower_bound_s / sparse_s,
            "break_even_density": density * chunked_s / sparse_s, "dense_fp32_scores_mb": n * n * 4 / 2**20}


def _cache_bench_data(directory: Path, n_genes: int, n_control: int, seed: int) -> Path:
    """A small simulated screen over ``n_genes`` real genes (10 singles, 4 doubles, 4 cells each), prepared."""
    from pertadapt.data.io import write_h5ad_atomic
    from pertadapt.data.simulate import simulate

    path = directory / "data.h5ad"
    write_h5ad_atomic(simulate("demo", seed=seed, n_genes=n_genes, n_singles=10, n_doubles=4, cells_per_condition=4,
                               n_control=n_control), path)
    return path


def run_cache_benchmark(n_genes: int = 2000, *, hidden_size: int = 128, layers: int = 6, heads: int = 4,
                        pool: int = 32, steps: int = 2, batch_size: int = 8, micro_batch_size: int = 4,
                        repeats: int = 2, seed: int = 0, device: str = "cpu") -> dict[str, object]:
    """One training epoch with the frozen-FM embedding cache against recomputing the FM, same run, same data.

    Both runs go through :func:`~pertadapt.train.run.build_run_engine` and the one training loop
    (:func:`~pertadapt.train.loop.train`, one epoch of ``steps`` optimiser steps, then validation); only
    ``backbone.embedding_cache`` differs (``on`` / ``off``). The backbone is a random-init AIDO.Cell
    encoder (default: the 3M configuration, hidden 128, 6 layers, 4 heads, intermediate 320) over
    ``n_genes`` genes, frozen; the adapter is small (d = 32, 4 heads, FFN 16). Torch engine, on the CPU or
    (``device='cuda'``, ``engine.use_gpu``) one GPU.

    Parameters
    ----------
    n_genes
        Genes of the simulated screen (real symbols with GO annotations).
    hidden_size, layers, heads
        AIDO.Cell encoder size.
    pool
        Control cells of the data (all of them form the pool, i.e. the cache's rows).
    steps, batch_size, micro_batch_size
        Optimiser steps per epoch and cells per step / per micro-batch.
    repeats
        Epochs timed per mode, alternating (a fresh run each; the first cached one builds the table, the
        others hit it); the fastest of each mode is compared.
    seed
        Simulation and run seed.
    device
        ``cpu`` or ``cuda``.

    Returns
    -------
    dict
        ``config`` (text), ``n_genes``, ``backbone_params``, ``trainable_params``, ``pool``, ``epoch_cells``,
        ``repeats``, ``recompute_epoch_s``, ``cache_epoch_s`` (fastest epoch of each mode; an epoch = the
        training steps plus the validation pass; every timing in ``recompute_epochs_s`` / ``cache_epochs_s``),
        ``speedup`` (their ratio), ``cache_build_s``, ``cache_bytes``, ``break_even_epochs`` (cache build /
        time saved per epoch), ``max_rel_diff`` (largest ``max|cached - recomputed| / max|recomputed|`` over
        the test condition predictions) and ``max_metric_rel_diff`` (over the final metrics).
    """
    from pertadapt.config import load_run_config
    from pertadapt.models.build import build_loss
    from pertadapt.rundir import RunDir
    from pertadapt.train.checkpoint import DirCheckpoints
    from pertadapt.train.loop import train
    from pertadapt.train.run import build_run_engine
    from pertadapt.train.setup import prepare_run_data

    config = (f"AIDO.Cell random init {hidden_size}/{layers}/{heads} (hidden/layers/heads), frozen; {n_genes} genes; "
              f"pool {pool} controls; adapter d=32, 4 heads, FFN 16; {steps} steps x {batch_size} cells; "
              + ("CUDA" if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"))
    with tempfile.TemporaryDirectory(prefix="pertadapt-cache-bench-") as tmp:
        root = Path(tmp)
        overrides = [f"data.path={_cache_bench_data(root, n_genes, pool, seed)}", f"seed={seed}",
                     "backbone.name=aido_cell", "backbone.random_init=true", f"backbone.hidden_size={hidden_size}",
                     f"backbone.layers={layers}", f"backbone.heads={heads}", "backbone.finetune=frozen",
                     "model.hidden_size=32", "model.head_hidden=64", "adapter.heads=4", "adapter.ffn_dim=16",
                     "optim.epochs=1", f"optim.max_steps_per_epoch={steps}", f"optim.batch_size={batch_size}",
                     f"optim.micro_batch_size={micro_batch_size}", "eval.batch_size=8", "engine.name=torch",
                     "logging.wandb=disabled", f"engine.use_gpu={device == 'cuda'}"]
        out: dict[str, dict] = {"off": {"epoch_s": []}, "on": {"epoch_s": []}}
        for rep in range(repeats):  # alternating, so that load on a shared machine hits both alike
            for mode in ("off", "on"):
                cfg = load_run_config(None, [*overrides, f"backbone.embedding_cache={mode}"])
                rd = prepare_run_data(cfg)
                engine, info = build_run_engine(cfg, rd, cache_root=root / "cache")  # rep 0 builds, then hits
                run_dir = RunDir(root / f"run-{mode}-{rep}")
                ticks: list[float] = []
                t0 = time.perf_counter()
                result = train(cfg, engine, rd.train, rd.val, rd.test, build_loss(cfg, rd.inputs), run_dir,
                               lambda row, ticks=ticks: ticks.append(time.perf_counter()),
                               checkpoints=DirCheckpoints(run_dir, resume=False))
                out[mode]["epoch_s"].append(ticks[0] - t0)
                if rep == 0:
                    out[mode].update(info=info, result=result, model=engine.model)
    off, on = out["off"], out["on"]
    off_s, on_s = min(off["epoch_s"]), min(on["epoch_s"])
    preds_off, preds_on = off["result"].test_predictions, on["result"].test_predictions
    max_rel = max(float(np.abs(preds_on[c] - preds_off[c]).max() / np.abs(preds_off[c]).max()) for c in preds_off)
    m_off, m_on = off["result"].test.flat("test"), on["result"].test.flat("test")
    metric_rel = max(abs(m_on[k] - m_off[k]) / max(abs(m_off[k]), 1e-12) for k in m_off if np.isfinite(m_off[k]))
    saved = off_s - on_s
    info = on["info"]
    return {"config": config, "n_genes": n_genes,
            "backbone_params": sum(p.numel() for p in off["model"].backbone.parameters()),
            "trainable_params": sum(p.numel() for p in on["model"].parameters() if p.requires_grad),
            "pool": pool, "epoch_cells": steps * batch_size, "repeats": repeats, "recompute_epoch_s": off_s,
            "cache_epoch_s": on_s, "speedup": off_s / on_s, "recompute_epochs_s": off["epoch_s"],
            "cache_epochs_s": on["epoch_s"],
            "cache_build_s": info["build_s"], "cache_bytes": info["bytes"],
            "break_even_epochs": info["build_s"] / saved if saved > 0 else math.inf,
            "max_rel_diff": max_rel, "max_metric_rel_diff": metric_rel}
