"""Condition-level summaries of a prepared AnnData, and prediction files, for evaluation and baselines.

Everything downstream (:mod:`pertadapt.eval`, :mod:`pertadapt.baselines`) works on condition means;
this module is where AnnData is read into them. DE lists come from the ``uns`` dicts written by
``pertadapt data prepare`` (GEARS layout, keyed by ``obs['condition_name']``; see
:mod:`pertadapt.data.keys`).

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

from pertadapt.data.io import DataError, write_h5ad_atomic
from pertadapt.data.keys import CONDITION, CONDITION_NAME, CONTROL, DE_KEY, TOP_NON_DROPOUT_DE_KEY

__all__ = [
    "condition_means",
    "control_mean",
    "de_indices",
    "non_dropout_de_indices",
    "read_dataset",
    "read_predictions",
    "write_predictions",
]

log = logging.getLogger(__name__)


def read_dataset(path: str | os.PathLike[str]) -> ad.AnnData:
    """Read a prepared ``.h5ad`` into memory.

    Parameters
    ----------
    path
        File path.

    Returns
    -------
    anndata.AnnData
        The dataset; ``obs['condition']`` is required.
    """
    adata = ad.read_h5ad(path)
    if CONDITION not in adata.obs:
        raise DataError(f"{path}: obs has no {CONDITION!r} column")
    return adata


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


def condition_means(adata: ad.AnnData, *, layer: str | None = None) -> tuple[list[str], np.ndarray]:
    """Mean expression of every condition.

    Parameters
    ----------
    adata
        Cells × genes with ``obs['condition']``.
    layer
        Layer to average (default ``X``, log-normalised).

    Returns
    -------
    conditions : list of str
        Sorted condition names (``ctrl`` included).
    means : np.ndarray
        ``(n_conditions, n_genes)`` float64, row k = (1/|C_k|) Σ_{i ∈ C_k} x_i.
    """
    x = adata.X if layer is None else adata.layers[layer]
    return _group_means(x, adata.obs[CONDITION].to_numpy())


def control_mean(adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
    """``(n_genes,)`` float64 mean over **all** control cells (``condition == 'ctrl'``), as GEARS's c."""
    mask = (adata.obs[CONDITION] == CONTROL).to_numpy()
    if not mask.any():
        raise DataError(f"no control cells: obs[{CONDITION!r}] has no {CONTROL!r}")
    x = adata.X if layer is None else adata.layers[layer]
    return _group_means(x[mask], np.zeros(int(mask.sum()), dtype=int))[1][0]


def _condition_to_name(adata: ad.AnnData) -> dict[str, str]:
    if CONDITION_NAME not in adata.obs:
        raise DataError(f"obs has no {CONDITION_NAME!r} column; run `pertadapt data prepare` first")
    pairs = adata.obs[[CONDITION, CONDITION_NAME]].astype(str).drop_duplicates()
    return dict(zip(pairs[CONDITION], pairs[CONDITION_NAME], strict=True))


def _uns_dict(adata: ad.AnnData, key: str) -> dict:
    if key not in adata.uns:
        raise DataError(f"uns[{key!r}] is missing (DE genes are not computed); "
                           "run `pertadapt data prepare` on this dataset first")
    return adata.uns[key]


def _names_to_indices(adata: ad.AnnData, names: Sequence[str], what: str) -> np.ndarray:
    idx = pd.Index(adata.var_names).get_indexer(list(names))
    if (idx < 0).any():
        raise DataError(f"{what}: gene {names[int(np.flatnonzero(idx < 0)[0])]!r} is not in var_names")
    return idx.astype(np.intp)


def de_indices(adata: ad.AnnData, n: int | None = 20) -> dict[str, np.ndarray]:
    """Ranked DE gene indices of every non-control condition, from ``uns['rank_genes_groups_cov_all']``.

    Parameters
    ----------
    adata
        Prepared dataset (``obs['condition_name']`` and the DE dict).
    n
        Keep the first ``n`` ranked genes (GEARS DE set: 20; 200 for ``frac_correct_direction_200``);
        ``None`` keeps the full ranking.

    Returns
    -------
    dict of str to np.ndarray
        Condition (``obs['condition']``) -> ``(min(n, n_genes),)`` gene indices in **rank order**.

    Raises
    ------
    DataError
        When the DE dict or a condition's entry is missing (message says to run
        ``pertadapt data prepare``) or a ranked gene is not in ``var_names``.
    """
    ranked = _uns_dict(adata, DE_KEY)
    out = {}
    for cond, name in _condition_to_name(adata).items():
        if cond == CONTROL:
            continue
        if name not in ranked:
            raise DataError(f"uns[{DE_KEY!r}] has no entry {name!r} for condition {cond!r}; "
                               "run `pertadapt data prepare` again")
        genes = list(ranked[name])
        out[cond] = _names_to_indices(adata, genes if n is None else genes[:n], f"{DE_KEY}[{name!r}]")
    return out


def non_dropout_de_indices(adata: ad.AnnData) -> dict[str, np.ndarray]:
    """Indices of ``uns['top_non_dropout_de_20']`` per non-control condition (names -> var positions).

    Returns
    -------
    dict of str to np.ndarray
        Condition -> ``(≤ 20,)`` gene indices in rank order; conditions without an entry are left out.

    Raises
    ------
    DataError
        When the key is missing (run ``pertadapt data prepare``).
    """
    top = _uns_dict(adata, TOP_NON_DROPOUT_DE_KEY)
    return {cond: _names_to_indices(adata, list(top[name]), f"{TOP_NON_DROPOUT_DE_KEY}[{name!r}]")
            for cond, name in _condition_to_name(adata).items() if cond != CONTROL and name in top}


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
    pred = ad.read_h5ad(path)
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
