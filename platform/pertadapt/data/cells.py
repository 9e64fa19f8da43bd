"""The cells of an ``.h5ad`` as one dense matrix, for pretraining a foundation model on them.

Reads ``X`` (log1p-normalised expression, as every model input), the raw totals (``obs['total_count']``,
else the row sums of ``layers['counts']``), the gene order (``var_names``, the order trials feed the
backbone) and, for a simulated file, the true regulatory network of ``uns['sim']`` in that gene order.
For the read-depth-aware objective it also reads the raw counts, and :func:`downsample_counts` and
:func:`read_depth_input` build the down-sampled input cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from pertadapt.config.errors import ConfigError
from pertadapt.data.io import DataError, read_h5ad
from pertadapt.data.keys import CONDITION, CONTROL, COUNTS_LAYER, TOTAL_COUNT
from pertadapt.data.prepare import PREPARE_KEY, normalize_log1p
from pertadapt.data.simulate import SIM_KEY

__all__ = ["CellMatrix", "downsample_counts", "read_cells", "read_depth_input"]


@dataclass(frozen=True)
class CellMatrix:
    """Cells of one file, dense.

    Attributes
    ----------
    x
        ``(n_cells, N)`` float32 log1p-normalised expression.
    total_count
        ``(n_cells,)`` float32 raw UMI totals.
    genes
        ``(N,)`` gene symbols in column order (``var_names``).
    edges
        ``(src, dst)``: ``(n_edges,)`` int64 column indices of the simulator's true edges, or ``None`` when
        the file holds no simulator truth.
    counts
        ``(n_cells, N)`` CSR float32 raw counts (``layers['counts']``), read only when asked for.
    target_sum
        The total every cell of ``x`` was normalised to (``log1p(count / total · target_sum)``), with
        ``counts``.
    """

    x: np.ndarray
    total_count: np.ndarray
    genes: tuple[str, ...]
    edges: tuple[np.ndarray, np.ndarray] | None
    counts: sp.csr_matrix | None = None
    target_sum: float | None = None


def _true_edges(sim: dict, genes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The simulated network's edges between genes of the file, as column indices."""
    column = {g: i for i, g in enumerate(genes)}
    sim_genes = [str(g) for g in sim["genes"]]
    to_col = np.array([column.get(g, -1) for g in sim_genes], dtype=np.int64)
    src, dst = to_col[np.asarray(sim["edge_src"], dtype=np.int64)], to_col[np.asarray(sim["edge_dst"], dtype=np.int64)]
    keep = (src >= 0) & (dst >= 0) & (src != dst)
    return src[keep], dst[keep]


def _target_sum(adata: ad.AnnData, x: np.ndarray, path: str | Path) -> float:
    """The normalisation total of ``X``: recorded by ``pertadapt data prepare``, else read off the rows of ``x``
    (the median of ``Σ expm1(x)`` over the cells with counts: each such row sums to the target exactly)."""
    recorded = adata.uns.get(PREPARE_KEY, {}).get("target_sum")
    if recorded is not None:
        return float(recorded)
    sums = np.expm1(x.astype(np.float64)).sum(axis=1)
    if not (sums > 0).any():
        raise DataError(f"{path}: X has no expressed cell; cannot tell its normalisation total")
    return float(np.median(sums[sums > 0]))


def read_cells(path: str | Path, which: str = "control", *, counts: bool = False) -> CellMatrix:
    """Read the ``control`` (``obs['condition'] == 'ctrl'``) or ``all`` cells of an ``.h5ad``.

    Parameters
    ----------
    path
        A prepared ``.h5ad`` (``pertadapt data prepare`` layout, or a simulated file).
    which
        ``control`` or ``all``.
    counts
        Also read the raw counts (``layers['counts']``) and the normalisation total of ``X``
        (``objective.read_depth: rda`` down-samples them).

    Raises
    ------
    ConfigError
        When the file has no control cells (``which='control'``): the pretraining config asked for them; with
        ``counts``, when it has no ``layers['counts']`` or they are not non-negative integers.
    DataError
        When ``obs['condition']`` or the totals are missing.
    """
    adata = read_h5ad(path)
    genes = tuple(map(str, adata.var_names))
    if which == "control":
        if CONDITION not in adata.obs:
            raise DataError(f"{path}: no obs[{CONDITION!r}] column; cannot find the control cells")
        rows = np.flatnonzero(adata.obs[CONDITION].astype(str).to_numpy() == CONTROL)
        if rows.size == 0:
            raise ConfigError(f"data.cells: {path} has no control cells (obs[{CONDITION!r}] == {CONTROL!r}); "
                              "set data.cells=all to pretrain on every cell")
    else:
        rows = np.arange(adata.n_obs)
    x = adata.X[rows]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
    if TOTAL_COUNT in adata.obs:
        total = adata.obs[TOTAL_COUNT].to_numpy(dtype=np.float32)[rows]
    elif COUNTS_LAYER in adata.layers:
        total = np.asarray(adata.layers[COUNTS_LAYER][rows].sum(axis=1), dtype=np.float32).ravel()
    else:
        raise DataError(f"{path}: neither obs[{TOTAL_COUNT!r}] nor layers[{COUNTS_LAYER!r}] (raw totals) is present")
    edges = _true_edges(adata.uns[SIM_KEY], genes) if SIM_KEY in adata.uns else None
    if not counts:
        return CellMatrix(x, total, genes, edges)
    if COUNTS_LAYER not in adata.layers:
        raise ConfigError(f"objective.read_depth: 'rda' down-samples the raw counts, and {path} has no "
                          f"layers[{COUNTS_LAYER!r}]; prepare the file with `pertadapt data prepare` or use "
                          "objective.read_depth=full")
    raw = adata.layers[COUNTS_LAYER][rows]
    raw = sp.csr_matrix(raw, dtype=np.float32)
    if raw.data.size and not (np.all(raw.data >= 0) and np.array_equal(raw.data, np.round(raw.data))):
        raise ConfigError(f"objective.read_depth: 'rda' down-samples raw counts, and {path} "
                          f"layers[{COUNTS_LAYER!r}] holds values that are not non-negative integers")
    return CellMatrix(x, total, genes, edges, raw, _target_sum(adata, x, path))


def downsample_counts(counts: np.ndarray, rng: np.random.Generator, prob: float, alpha: float,
                      beta: float) -> np.ndarray:
    """Binomial thinning of some cells: the read-depth-aware objective's input counts.

    Each cell is down-sampled with probability ``prob``: a ratio ``γ ~ Beta(alpha, beta)`` is drawn for it and
    every gene keeps ``Binomial(count, γ)`` of its counts. A cell left with no count at all keeps its own
    counts. Every draw comes from ``rng`` (the same draws, in the same order, whatever the outcome).

    Parameters
    ----------
    counts
        ``(B, N)`` non-negative integer counts.
    rng
        The generator of the batch.
    prob, alpha, beta
        Probability of down-sampling a cell and the Beta shapes of its ratio.

    Returns
    -------
    np.ndarray
        ``(B, N)`` int64 counts, each at most the cell's own.
    """
    own = np.asarray(counts).astype(np.int64)
    down = rng.random(own.shape[0]) < prob
    ratio = rng.beta(alpha, beta, size=own.shape[0])
    thinned = rng.binomial(own, ratio[:, None])
    keep = ~down | (thinned.sum(axis=1) == 0)
    thinned[keep] = own[keep]
    return thinned


def read_depth_input(cells: CellMatrix, rows: np.ndarray, rng: np.random.Generator, prob: float, alpha: float,
                     beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The read-depth-aware input of cells ``rows``: down-sampled (:func:`downsample_counts`), then normalised.

    A down-sampled cell is log1p-normalised to ``cells.target_sum`` exactly as ``X`` was
    (:func:`pertadapt.data.prepare.normalize_log1p`); a cell left as it is keeps its row of ``X``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(B, N)`` float32 input expression and ``(B,)`` float32 source totals (the thinned totals; a cell
        left as it is has its own total).

    Raises
    ------
    ValueError
        When ``cells`` was read without its counts.
    """
    if cells.counts is None or cells.target_sum is None:
        raise ValueError("read_depth_input: the cells were read without their counts (read_cells(counts=True))")
    own = cells.counts[rows].toarray()
    thinned = downsample_counts(own, rng, prob, alpha, beta)
    changed = (thinned != own).any(axis=1)
    x = cells.x[rows].copy()
    source = cells.total_count[rows].copy()
    if changed.any():
        part = sp.csr_matrix(thinned[changed].astype(np.float32))
        normalize_log1p(part, cells.target_sum)
        x[changed] = part.toarray()
        source[changed] = thinned[changed].sum(axis=1)
    return x, source
