"""The dimensions of a prepared ``.h5ad`` read from its header (``obs``, ``var``): ``X`` is never loaded."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
from anndata.io import read_elem

from pertadapt.data.conditions import is_control
from pertadapt.data.keys import CONDITION, MEASURED

__all__ = ["DataHeader", "read_header"]


@dataclass(frozen=True)
class DataHeader:
    """What a cost plan needs of a dataset.

    Attributes
    ----------
    n_cells, n_genes
        Rows of ``obs`` and of ``var``.
    n_measured
        Genes marked in ``var['measured']``; ``n_genes`` when the column is absent.
    cells_per_condition
        Condition name → its number of cells (controls under their control name).
    nnz_per_cell
        Mean stored non-zeros per cell of ``X`` (from its CSR ``indptr`` alone), rounded up; 0 when ``X``
        stores none (a header-only file) or is dense.
    """

    n_cells: int
    n_genes: int
    n_measured: int
    cells_per_condition: dict[str, int]
    nnz_per_cell: int = 0

    @property
    def n_controls(self) -> int:
        """Control cells."""
        return sum(n for c, n in self.cells_per_condition.items() if is_control(c))


def read_header(path: str | Path) -> DataHeader:
    """Read the dimensions of ``path`` from its ``obs`` and ``var`` groups only.

    Raises
    ------
    ValueError
        Naming the file and the missing group or column.
    """
    with h5py.File(path, "r") as f:
        for group in ("obs", "var"):
            if group not in f:
                raise ValueError(f"{path}: no '{group}' group; expected a prepared .h5ad")
        if CONDITION not in f["obs"]:
            raise ValueError(f"{path}: obs has no {CONDITION!r} column; expected a prepared .h5ad")
        conditions = read_elem(f["obs"][CONDITION])
        var = f["var"]
        n_genes = var[var.attrs["_index"]].shape[0]
        n_measured = int(read_elem(var[MEASURED]).sum()) if MEASURED in var else n_genes
        x = f.get("X")
        nnz = int(x["indptr"][-1]) if isinstance(x, h5py.Group) and "indptr" in x else 0
    counts = Counter(str(c) for c in conditions)
    return DataHeader(len(conditions), n_genes, n_measured, dict(counts), -(-nnz // max(len(conditions), 1)))
