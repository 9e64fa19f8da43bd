"""``pertadapt bench cache``: a training epoch with the frozen-FM embedding cache against recomputing the FM."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["run_cache_benchmark"]


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
                run_dir = root / f"run-{mode}-{rep}"
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
