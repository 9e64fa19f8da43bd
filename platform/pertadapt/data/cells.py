"""The cells of an ``.h5ad`` as one dense matrix, for pretraining a foundation model on them.

Reads ``X`` (log1p-normalised expression, as every model input), the raw totals (``obs['total_count']``,
else the row sums of ``layers['counts']``), the gene order (``var_names``, the order trials feed the
backbone) and, for a simulated file, the true regulatory network of ``uns['sim']`` in that gene order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pertadapt.config.errors import ConfigError
from pertadapt.data.io import DataError, read_h5ad
from pertadapt.data.keys import CONDITION, CONTROL, COUNTS_LAYER, TOTAL_COUNT
from pertadapt.data.simulate import SIM_KEY

__all__ = ["CellMatrix", "read_cells"]


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
    """

    x: np.ndarray
    total_count: np.ndarray
    genes: tuple[str, ...]
    edges: tuple[np.ndarray, np.ndarray] | None


def _true_edges(sim: dict, genes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The simulated network's edges between genes of the file, as column indices."""
    column = {g: i for i, g in enumerate(genes)}
    sim_genes = [str(g) for g in sim["genes"]]
    to_col = np.array([column.get(g, -1) for g in sim_genes], dtype=np.int64)
    src, dst = to_col[np.asarray(sim["edge_src"], dtype=np.int64)], to_col[np.asarray(sim["edge_dst"], dtype=np.int64)]
    keep = (src >= 0) & (dst >= 0) & (src != dst)
    return src[keep], dst[keep]


def read_cells(path: str | Path, which: str = "control") -> CellMatrix:
    """Read the ``control`` (``obs['condition'] == 'ctrl'``) or ``all`` cells of an ``.h5ad``.

    Parameters
    ----------
    path
        A prepared ``.h5ad`` (``pertadapt data prepare`` layout, or a simulated file).
    which
        ``control`` or ``all``.

    Raises
    ------
    ConfigError
        When the file has no control cells (``which='control'``): the pretraining config asked for them.
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
    return CellMatrix(x, total, genes, edges)
