"""Peak-memory benchmark of ``pertadapt data prepare`` on a synthetic sparse counts matrix.

:func:`run_data_benchmark` writes a synthetic raw-counts ``.h5ad`` in one child process, then runs the
exact ``prepare`` path (read -> :func:`~pertadapt.data.prepare.prepare_adata` -> atomic write) in a
fresh child process and reports that process's peak resident set size, so the number is what the
command itself needs, not the generator or the parent. In the same run, the normalisation step alone is
timed twice more, each in a fresh child on the same file: the in-place row-chunked path that ``prepare``
uses, and the naïve path it replaced (``sc.pp.normalize_total`` + ``sc.pp.log1p``, which allocate full-size
temporaries); the two results are compared on a fixed sample of the non-zeros.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertadapt.bench.measure import peak_rss_bytes
from pertadapt.data.io import write_h5ad_atomic
from pertadapt.data.keys import CONDITION, CONTROL, GENE_NAME, SEP
from pertadapt.data.prepare import normalize_log1p, prepare_adata

__all__ = ["RSS_TARGET_GB", "run_data_benchmark"]

log = logging.getLogger(__name__)

#: The issue's bound on the peak RSS of ``prepare`` at 200,000 cells x 5,000 genes.
RSS_TARGET_GB = 4.0
_ROWS_PER_CHUNK = 5_000


def _synthetic(path: str, n_cells: int, n_genes: int, density: float, n_conditions: int, seed: int) -> int:
    """Write synthetic raw counts ``(n_cells, n_genes)`` with ~``density`` non-zeros; returns nnz."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_cells, _ROWS_PER_CHUNK):
        rows = min(_ROWS_PER_CHUNK, n_cells - start)
        mask = rng.random((rows, n_genes), dtype=np.float32) < density
        chunk = sp.csr_matrix(mask, dtype=np.float32)
        chunk.data = (1 + rng.geometric(0.5, size=chunk.nnz)).astype(np.float32)
        chunks.append(chunk)
    x = sp.vstack(chunks, format="csr")
    genes = np.array([f"GENE{i}" for i in range(n_genes)])
    n_single = max(n_conditions * 3 // 4, 1)
    names = [CONTROL] + [f"{g}{SEP}{CONTROL}" for g in genes[:n_single]]
    names += [f"{genes[2 * i]}{SEP}{genes[2 * i + 1]}" for i in range(n_conditions - n_single)]
    probs = np.full(len(names), 0.9 / (len(names) - 1))
    probs[0] = 0.1
    cond = rng.choice(np.array(names), size=n_cells, p=probs)
    adata = ad.AnnData(X=x, obs=pd.DataFrame({CONDITION: pd.Categorical(cond)},
                                             index=pd.RangeIndex(n_cells).astype(str)),
                       var=pd.DataFrame({GENE_NAME: genes}, index=genes))
    adata.write_h5ad(path)
    return int(x.nnz)


def _prepare_file(src: str, dst: str) -> dict[str, float]:
    """The ``pertadapt data prepare`` path on ``src``; stage times and this process's peak RSS."""
    times = {}
    t0 = time.perf_counter()
    adata = ad.read_h5ad(src)
    times["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = prepare_adata(adata)
    times["prepare_s"] = time.perf_counter() - t0
    del adata
    t0 = time.perf_counter()
    write_h5ad_atomic(out, dst)
    times["write_s"] = time.perf_counter() - t0
    return {**times, "peak_rss_gb": peak_rss_bytes() / 1e9}


#: Non-zeros of the normalised matrix compared between the two normalisation paths (evenly spaced).
_SAMPLE = 100_000


def _normalize_file(src: str, naive: bool) -> dict[str, Any]:
    """Read ``src`` and normalise + log1p its counts, in place by row chunks or (``naive``) with scanpy;
    the step's seconds, this process's peak RSS and a fixed sample of the normalised non-zeros."""
    adata = ad.read_h5ad(src)
    t0 = time.perf_counter()
    if naive:
        import scanpy as sc

        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    else:
        normalize_log1p(adata.X, None)
    seconds = time.perf_counter() - t0
    data = adata.X.data
    sample = data[np.linspace(0, data.size - 1, min(_SAMPLE, data.size)).astype(np.int64)].astype(np.float64)
    return {"s": seconds, "peak_rss_gb": peak_rss_bytes() / 1e9, "sample": sample}


def run_data_benchmark(n_cells: int = 200_000, n_genes: int = 5_000, density: float = 0.1,
                       n_conditions: int = 200, seed: int = 0, workdir: str | Path | None = None) -> dict:
    """Measure the peak RSS (and time) of ``pertadapt data prepare`` on synthetic sparse counts.

    Parameters
    ----------
    n_cells, n_genes, density
        Shape ``(n_cells, n_genes)`` and fraction of non-zero entries of the synthetic counts.
    n_conditions
        Perturbed conditions (3/4 singles, 1/4 doubles) besides ``ctrl`` (10 % of the cells).
    seed
        Generator seed.
    workdir
        Where the temporary input and output files go (default: the system temp directory).

    Returns
    -------
    dict
        ``n_cells``, ``n_genes``, ``density``, ``nnz``, ``n_conditions``, ``generate_s``, ``read_s``,
        ``prepare_s``, ``write_s``, ``peak_rss_gb`` (of the prepare process), ``target_gb`` and
        ``within_target``; the normalisation step in place and on the naïve scanpy path: ``normalize_s``,
        ``naive_normalize_s``, ``normalize_speedup`` (naïve / in place), ``normalize_peak_rss_gb``,
        ``naive_normalize_peak_rss_gb``, ``normalize_peak_mem_ratio`` (in place / naïve, both processes
        including the read) and ``normalize_max_abs_diff`` (over the sampled non-zeros).
    """
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = str(Path(tmp) / "raw.h5ad"), str(Path(tmp) / "prepared.h5ad")
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            nnz = pool.submit(_synthetic, src, n_cells, n_genes, density, n_conditions, seed).result()
        generate_s = time.perf_counter() - t0
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            stats = pool.submit(_prepare_file, src, dst).result()
        norm = {}
        for naive in (False, True):  # a fresh process each: peak RSS is per process
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                norm[naive] = pool.submit(_normalize_file, src, naive).result()
    fast, slow = norm[False], norm[True]
    result = {"n_cells": n_cells, "n_genes": n_genes, "density": density, "nnz": nnz,
              "n_conditions": n_conditions, "generate_s": generate_s, **stats,
              "target_gb": RSS_TARGET_GB, "within_target": stats["peak_rss_gb"] <= RSS_TARGET_GB,
              "normalize_s": fast["s"], "naive_normalize_s": slow["s"], "normalize_speedup": slow["s"] / fast["s"],
              "normalize_peak_rss_gb": fast["peak_rss_gb"], "naive_normalize_peak_rss_gb": slow["peak_rss_gb"],
              "normalize_peak_mem_ratio": fast["peak_rss_gb"] / slow["peak_rss_gb"],
              "normalize_max_abs_diff": float(np.abs(fast["sample"] - slow["sample"]).max())}
    log.info("data benchmark: %s", result)
    return result
