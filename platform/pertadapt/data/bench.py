"""Peak-memory benchmark of ``pertadapt data prepare`` on a synthetic sparse counts matrix.

:func:`run_data_benchmark` writes a synthetic raw-counts ``.h5ad`` in one child process, then runs the
exact ``prepare`` path (read -> :func:`~pertadapt.data.prepare.prepare_adata` -> atomic write) in a
fresh child process and reports that process's peak resident set size, so the number is what the
command itself needs, not the generator or the parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertadapt.data.io import write_h5ad_atomic
from pertadapt.data.keys import CONDITION, CONTROL, GENE_NAME, SEP
from pertadapt.data.prepare import prepare_adata

__all__ = ["RSS_TARGET_GB", "run_data_benchmark"]

log = logging.getLogger(__name__)

#: The issue's bound on the peak RSS of ``prepare`` at 200,000 cells x 5,000 genes.
RSS_TARGET_GB = 4.0
_ROWS_PER_CHUNK = 5_000


def _peak_rss_bytes() -> int:
    """Peak RSS of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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
    return {**times, "peak_rss_gb": _peak_rss_bytes() / 1e9}


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
        ``within_target``.
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
    result = {"n_cells": n_cells, "n_genes": n_genes, "density": density, "nnz": nnz,
              "n_conditions": n_conditions, "generate_s": generate_s, **stats,
              "target_gb": RSS_TARGET_GB, "within_target": stats["peak_rss_gb"] <= RSS_TARGET_GB}
    log.info("data benchmark: %s", result)
    return result
