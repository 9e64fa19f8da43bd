"""Reading and writing Perturb-seq files: atomic h5ad writes and the raw-counts layout (b).

Layout (a), the GEARS/PertAdapt processed layout, is read with :func:`anndata.read_h5ad` directly.
Layout (b) is raw counts with a free-form perturbation column; :func:`read_raw` turns it into
``obs['condition']`` with canonical GEARS names (:func:`pertadapt.data.conditions.parse_condition`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import pandas as pd

from pertadapt.data.conditions import ConditionError, parse_condition
from pertadapt.data.keys import CONDITION, CONTROL, SEP
from pertadapt.files import atomic_write

__all__ = [
    "DataError",
    "read_conditions",
    "read_counts",
    "read_raw",
    "write_h5ad_atomic",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable input data; the message names the file, key, condition or gene concerned."""


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> None:
    """Write ``adata`` to ``path`` (``.h5ad``) atomically; no partial file is ever left at ``path``."""
    atomic_write(path, lambda p: adata.write_h5ad(p))


def read_conditions(path: str | Path) -> list[str]:
    """Unique ``obs['condition']`` values of an ``.h5ad`` without loading ``X`` (backed read).

    Raises
    ------
    DataError
        If ``obs['condition']`` is missing (the message names the key and file).
    """
    adata = ad.read_h5ad(path, backed="r")
    try:
        if CONDITION not in adata.obs:
            raise DataError(f"{path}: obs key {CONDITION!r} missing")
        return sorted(str(c) for c in pd.unique(adata.obs[CONDITION].astype(str)))
    finally:
        adata.file.close()


def read_raw(path: str | Path, *, perturbation_column: str = "gene",
             control_labels: Iterable[str] = ("non-targeting", CONTROL), delimiter: str = "_") -> ad.AnnData:
    """Read a raw-counts ``.h5ad`` (layout (b)) and write canonical GEARS names to ``obs['condition']``.

    Parameters
    ----------
    path
        ``.h5ad`` with raw counts in ``X`` (or ``layers['counts']``), cells x genes ``(n_cells, n_genes)``.
    perturbation_column
        ``obs`` column with the raw labels, e.g. ``gene`` holding ``non-targeting``, ``KLF1``,
        ``KLF1_CEBPA`` or ``KLF1|CEBPA``.
    control_labels
        Labels meaning control cells (whole label or one part of a combination).
    delimiter
        Separator of a combination's genes in the raw labels.

    Returns
    -------
    anndata.AnnData
        The file's content with ``obs['condition']`` set (``ctrl``, ``A+ctrl``, ``A+B``; ``B+A`` labels
        become ``A+B``); the original column is kept.

    Raises
    ------
    DataError
        If the column is missing, a label is unreadable or a gene name contains ``+``; the message
        names the column and label.
    """
    adata = ad.read_h5ad(path)
    if perturbation_column not in adata.obs:
        raise DataError(f"{path}: obs key {perturbation_column!r} (perturbation column) missing; "
                        f"obs has {', '.join(map(str, adata.obs.columns)) or 'no columns'}")
    labels = adata.obs[perturbation_column].astype(str)
    controls = tuple(control_labels)
    mapping = {}
    for label in pd.unique(labels):
        if SEP in label and delimiter != SEP:
            raise DataError(f"{path}: obs[{perturbation_column!r}] label {label!r} contains {SEP!r}, "
                            f"which is reserved for GEARS condition names")
        try:
            mapping[label] = parse_condition(label, control_labels=controls, delimiter=delimiter)
        except ConditionError as e:
            raise DataError(f"{path}: obs[{perturbation_column!r}]: {e}") from e
    adata.obs[CONDITION] = pd.Categorical(labels.map(mapping))
    n_ctrl = int((adata.obs[CONDITION] == CONTROL).sum())
    log.info("%s: %d cells, %d raw labels -> %d conditions, %d control cells", path, adata.n_obs,
             len(mapping), adata.obs[CONDITION].nunique(), n_ctrl)
    return adata


def read_counts(path: str | Path, *, perturbation_column: str | None = None,
                control_labels: Iterable[str] = ("non-targeting", CONTROL), delimiter: str = "_") -> ad.AnnData:
    """Read the input of ``prepare``: layout (b) via :func:`read_raw` if ``perturbation_column`` is given,
    else an ``.h5ad`` that already has ``obs['condition']``.

    Raises
    ------
    DataError
        If the file is missing or unreadable (the message names it), or as :func:`read_raw`.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    try:
        if perturbation_column is not None:
            return read_raw(path, perturbation_column=perturbation_column, control_labels=control_labels,
                            delimiter=delimiter)
        return ad.read_h5ad(path)
    except OSError as e:
        raise DataError(f"{path}: not a readable .h5ad ({e})") from e
