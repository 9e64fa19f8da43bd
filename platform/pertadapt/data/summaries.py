"""Prediction files: predicted condition means written and read back in the dataset's gene order.

Datasets themselves are read by :func:`pertadapt.data.dataset.read_perturb_data` (condition means, DE
lists and gene names for every consumer); this module only handles prediction files.

Prediction file (``PRED.h5ad``): ``obs['condition']`` with GEARS condition names, ``X`` with predicted
log-normalised expression, per cell or one row per condition (rows of a condition are averaged),
``var_names`` = gene names matching the dataset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertadapt.data.io import DataError, read_h5ad, write_h5ad_atomic
from pertadapt.data.keys import CONDITION

__all__ = ["read_predictions", "write_predictions"]

log = logging.getLogger(__name__)


def _group_means(x: np.ndarray | sp.spmatrix, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Rows of ``x`` averaged per label: sorted labels and a ``(n_labels, n_cols)`` float64 matrix.

    Computed as D⁻¹ Aᵀ X with the ``(n_rows, n_labels)`` one-hot indicator A and D = diag(counts).
    """
    names, inverse = np.unique(labels.astype(str), return_inverse=True)
    onehot = sp.csr_matrix((np.ones(len(inverse)), (inverse, np.arange(len(inverse)))),
                           shape=(len(names), len(inverse)))
    sums = onehot @ (x.astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64))
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    counts = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    return [str(n) for n in names], sums / counts[:, None]


def _describe_mismatch(got: Sequence[str], want: Sequence[str]) -> str:
    missing = [g for g in want if g not in set(got)]
    extra = [g for g in got if g not in set(want)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} dataset gene(s) missing, e.g. {', '.join(missing[:5])}")
    if extra:
        parts.append(f"{len(extra)} unknown gene(s), e.g. {', '.join(extra[:5])}")
    if not parts:
        parts.append("duplicated gene names")
    return "; ".join(parts)


def read_predictions(path: str | os.PathLike[str], genes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Read a prediction file into one mean row per condition, columns ordered as ``genes``.

    Parameters
    ----------
    path
        ``PRED.h5ad`` (see module docstring).
    genes
        ``(n_genes,)`` gene names of the dataset, in its order.

    Returns
    -------
    conditions : list of str
        Sorted predicted conditions.
    means : np.ndarray
        ``(n_conditions, n_genes)`` float64 predicted means.

    Raises
    ------
    DataError
        No ``obs['condition']``; genes that differ from ``genes`` (the message names them); non-finite
        values (the message gives their count and the first offending condition and gene).
    """
    pred = read_h5ad(path)
    if CONDITION not in pred.obs:
        raise DataError(f"{path}: obs has no {CONDITION!r} column")
    got = [str(g) for g in pred.var_names]
    if set(got) != set(genes) or len(got) != len(genes) or len(set(got)) != len(got):
        raise DataError(f"{path}: genes do not match the dataset: {_describe_mismatch(got, genes)}")
    x = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    x = x[:, pd.Index(got).get_indexer(list(genes))]
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(f"{path}: {int(bad.sum())} non-finite predicted value(s); first in condition "
                           f"{pred.obs[CONDITION].iloc[row]!r}, gene {genes[col]!r}")
    return _group_means(x, pred.obs[CONDITION].to_numpy())


def write_predictions(path: str | os.PathLike[str], conditions: Sequence[str], matrix: np.ndarray,
                      genes: Sequence[str]) -> None:
    """Write one predicted mean row per condition as ``PRED.h5ad``, atomically (temp file + rename).

    Parameters
    ----------
    path
        Target file.
    conditions
        ``(n_conditions,)`` GEARS condition names (unique).
    matrix
        ``(n_conditions, n_genes)`` predicted means, stored as float64 (float32 rounding of a
        no-change prediction would turn a zero delta into noise that Pearson on deltas picks up).
    genes
        ``(n_genes,)`` gene names.
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(conditions), len(genes)):
        raise DataError(f"prediction matrix has shape {matrix.shape}; expected "
                           f"({len(conditions)}, {len(genes)})")
    obs = pd.DataFrame({CONDITION: list(conditions)}, index=[str(i) for i in range(len(conditions))])
    out = ad.AnnData(X=matrix.astype(np.float64), obs=obs, var=pd.DataFrame(index=list(genes)))
    write_h5ad_atomic(out, path)
