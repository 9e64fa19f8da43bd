"""Raw counts from an ``.h5ad``, aligned by gene name to a backbone vocabulary (for ``pertadapt embed``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pertadapt.data.io import DataError, read_h5ad
from pertadapt.data.keys import COUNTS_LAYER, GENE_NAME, TOTAL_COUNT

__all__ = ["AlignedCounts", "read_counts_for_vocab"]

log = logging.getLogger(__name__)

#: Normalisation target of the log1p input (counts per 10,000, as the FMs and the data layer use).
TARGET_SUM = 1e4


@dataclass(frozen=True)
class AlignedCounts:
    """Raw counts of every cell in a backbone's vocabulary order.

    Attributes
    ----------
    counts
        ``(n_cells, n_vocab)`` CSR float32 counts; vocabulary genes absent from the data are zero.
    total_count
        ``(n_cells,)`` raw UMI totals: ``obs['total_count']`` when present, else the row sums over **all**
        genes of the file (including genes outside the vocabulary).
    source
        Where the counts came from: ``"layers['counts']"`` or ``"X"``.
    missing
        Vocabulary genes absent from the data (zero-filled), in vocabulary order.
    n_dropped
        Data genes outside the vocabulary (ignored).
    """

    counts: sp.csr_matrix
    total_count: np.ndarray
    source: str
    missing: tuple[str, ...]
    n_dropped: int

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.counts.shape[0])

    def log1p_batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Backbone input for cells ``start:stop``.

        Returns
        -------
        tuple[np.ndarray, np.ndarray]
            ``(B, n_vocab)`` float32 ``log1p(counts / total · 1e4)`` and ``(B,)`` float32 raw totals.
        """
        dense = self.counts[start:stop].toarray()
        total = self.total_count[start:stop].astype(np.float32)
        scale = (TARGET_SUM / np.maximum(total, 1.0)).astype(np.float32)
        return np.log1p(dense * scale[:, None]).astype(np.float32), total


def _check_raw(matrix: sp.spmatrix | np.ndarray, source: str) -> None:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    sample = np.asarray(values[: 1_000_000], dtype=np.float64)
    if sample.size and (sample.min() < 0 or not np.all(sample == np.round(sample))):
        raise DataError(f"{source} does not hold raw counts (found negative or non-integer values); "
                         f"store raw UMI counts in X or in layers['{COUNTS_LAYER}']")


def read_counts_for_vocab(path: str | Path, vocab: Sequence[str]) -> AlignedCounts:
    """Read raw counts (``layers['counts']`` if present, else ``X``) and align genes to ``vocab`` by name.

    Gene names are ``var['gene_name']`` when that column exists, else ``var_names``.

    Raises
    ------
    DataError
        When the file is not a readable ``.h5ad``, the matrix is not raw counts, a vocabulary gene occurs
        twice in the data, or no gene matches (the message names examples from both sides).
    """
    adata = read_h5ad(path)
    if COUNTS_LAYER in adata.layers:
        matrix, source = adata.layers[COUNTS_LAYER], f"layers['{COUNTS_LAYER}']"
    else:
        matrix, source = adata.X, "X"
    _check_raw(matrix, f"{path}: {source}")
    names = [str(g) for g in (adata.var[GENE_NAME] if GENE_NAME in adata.var else adata.var_names)]
    position = {g: i for i, g in enumerate(vocab)}
    dupes = sorted(g for g, c in Counter(names).items() if c > 1 and g in position)
    if dupes:
        raise DataError(f"{path}: vocabulary genes occur more than once in the data: {dupes[:10]}")
    data_cols = [j for j, g in enumerate(names) if g in position]
    if not data_cols:
        raise DataError(f"{path}: none of its {len(names)} genes (e.g. {names[:5]}) is in the backbone "
                         f"vocabulary (e.g. {list(vocab[:5])})")
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    totals = (np.asarray(adata.obs[TOTAL_COUNT], dtype=np.float64) if TOTAL_COUNT in adata.obs
              else np.asarray(csr.sum(axis=1)).ravel())
    select = sp.csr_matrix((np.ones(len(data_cols), dtype=np.float32),
                            (data_cols, [position[names[j]] for j in data_cols])), shape=(len(names), len(vocab)))
    aligned = (csr @ select).tocsr()
    matched = {names[j] for j in data_cols}
    missing = tuple(g for g in vocab if g not in matched)
    n_dropped = len(names) - len(data_cols)
    log.info("%s: %d cells, %d/%d vocabulary genes matched from %s (%d zero-filled, %d data genes dropped)",
             path, aligned.shape[0], len(data_cols), len(vocab), source, len(missing), n_dropped)
    return AlignedCounts(aligned, totals, source, missing, n_dropped)
