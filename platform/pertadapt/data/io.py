"""Reading and writing Perturb-seq files, and the two error types of the data layer.

Layout (a), the GEARS/PertAdapt processed layout, is read with :func:`read_h5ad`. Layout (b) is raw
counts with a free-form perturbation column; :func:`read_raw` turns it into ``obs['condition']`` with
canonical GEARS names (:func:`pertadapt.data.conditions.parse_condition`).

Every ``.h5ad`` a user names is opened by :func:`read_h5ad`, so a missing file, a directory, a file
that is not HDF5, a truncated one or an HDF5 file that is not an AnnData is one :class:`DataError`
naming the file. A bad parameter (a value outside its range, an output path that cannot be written)
is a :class:`ParamError`, a :class:`~pertadapt.config.ConfigError`: the command line exits 2 for it
and 1 for a :class:`DataError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd
from anndata.io import read_elem, sparse_dataset

from pertadapt.config import ConfigError
from pertadapt.data.conditions import ConditionError, parse_condition
from pertadapt.data.keys import CONDITION, CONTROL, SEP
from pertadapt.files import atomic_write

__all__ = [
    "DataError",
    "ParamError",
    "check_output_path",
    "check_param",
    "check_raw_params",
    "read_conditions",
    "read_counts",
    "read_h5ad",
    "read_h5ad_lazy",
    "read_raw",
    "write_h5ad_atomic",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable input data; the message names the file, key, condition or gene concerned."""


class ParamError(ConfigError):
    """A parameter outside its range (a configuration mistake, not bad data).

    Attributes
    ----------
    name
        The parameter, as the function that raised spells it (``target_sum``); the command line
        shows the matching option (``--target-sum``).
    problem
        What is wrong, e.g. ``expected a positive number, got 0.0``.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def check_param(name: str, ok: bool, expected: str, value: object) -> None:
    """Raise :class:`ParamError` ``"{name}: expected {expected}, got {value!r}"`` unless ``ok``."""
    if not ok:
        raise ParamError(name, f"expected {expected}, got {value!r}")


def check_output_path(path: str | os.PathLike[str], name: str = "out") -> None:
    """Check, before any work, that a file can be written at ``path``.

    Raises
    ------
    ParamError
        If ``path`` is an existing directory, or its nearest existing ancestor is not a writable
        directory (``name`` is the parameter reported).
    """
    dest = Path(path)
    if dest.is_dir():
        raise ParamError(name, f"{dest} is a directory; give a file path")
    parent = next(p for p in dest.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ParamError(name, f"{dest}: {parent} is a file, so the directory cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ParamError(name, f"{dest}: directory {parent} is not writable")


def read_h5ad(path: str | os.PathLike[str], *, backed: bool = False) -> ad.AnnData:
    """Open an ``.h5ad`` file, in memory or (``backed=True``) read-only on disk.

    Raises
    ------
    DataError
        If the path is missing or not a file, or the file is not a readable AnnData (not HDF5,
        truncated, other HDF5 content); the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {'not a file (a directory?)' if p.exists() else 'no such file'}")
    try:
        return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as e:  # h5py and anndata raise OSError, KeyError, TypeError, ... on foreign files
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{p}: not a readable .h5ad file ({type(e).__name__}: {first})") from e


def read_h5ad_lazy(path: str | os.PathLike[str]) -> tuple[ad.AnnData, object]:
    """``obs``, ``var`` and ``uns`` of an ``.h5ad`` in memory, and its ``X`` left on disk.

    Nothing else is read: ``layers`` (e.g. a raw ``counts`` copy as large as ``X``), ``obsm``, ``obsp``,
    ``varm`` and ``varp`` stay in the file (``anndata``'s ``backed='r'`` loads them all into memory).

    Returns
    -------
    tuple
        ``(meta, X)``: an AnnData with ``obs``/``var``/``uns`` and no ``X``, and the ``(n_cells, N)`` matrix as
        a file-backed sparse dataset (or an ``h5py`` dataset for a dense ``X``) whose rows are read on demand.
        The file stays open while ``X`` is referenced.

    Raises
    ------
    DataError
        As :func:`read_h5ad`, and when the file has no ``X``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {'not a file (a directory?)' if p.exists() else 'no such file'}")
    try:
        f = h5py.File(p, "r")
        if "X" not in f:
            raise DataError(f"{p}: no X matrix in the file")
        X = sparse_dataset(f["X"]) if isinstance(f["X"], h5py.Group) else f["X"]
        meta = ad.AnnData(obs=read_elem(f["obs"]), var=read_elem(f["var"]),
                          uns=read_elem(f["uns"]) if "uns" in f else None)
    except DataError:
        raise
    except Exception as e:  # h5py and anndata raise OSError, KeyError, TypeError, ... on foreign files
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{p}: not a readable .h5ad file ({type(e).__name__}: {first})") from e
    return meta, X


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike[str]) -> None:
    """Write ``adata`` to ``path`` (``.h5ad``) atomically; no partial file is ever left at ``path``.

    Raises
    ------
    ParamError
        If ``path`` cannot be written (see :func:`check_output_path`); nothing is written then.
    """
    check_output_path(path)
    atomic_write(path, lambda p: adata.write_h5ad(p))


def read_conditions(path: str | os.PathLike[str]) -> list[str]:
    """Unique ``obs['condition']`` values of an ``.h5ad`` without loading ``X`` (backed read).

    Raises
    ------
    DataError
        If the file is unreadable (:func:`read_h5ad`) or ``obs['condition']`` is missing (the message
        names the key and file).
    """
    adata = read_h5ad(path, backed=True)
    try:
        if CONDITION not in adata.obs:
            raise DataError(f"{path}: obs key {CONDITION!r} missing")
        return sorted(str(c) for c in pd.unique(adata.obs[CONDITION].astype(str)))
    finally:
        adata.file.close()


def check_raw_params(*, control_labels: Iterable[str], delimiter: str) -> None:
    """Check the label parameters of :func:`read_raw` (the command line calls it before reading).

    Raises
    ------
    ParamError
        If ``delimiter`` is empty, or ``control_labels`` is empty or holds an empty label.
    """
    controls = list(control_labels)
    check_param("delimiter", bool(delimiter), "a non-empty separator", delimiter)
    check_param("control_labels", bool(controls) and all(controls), "non-empty labels", controls)


def read_raw(path: str | os.PathLike[str], *, perturbation_column: str = "gene",
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
        If the file is unreadable (:func:`read_h5ad`), the column is missing, a label is unreadable or
        a gene name contains ``+``; the message names the file, column and label.
    ParamError
        If ``delimiter`` or a control label is empty.
    """
    controls = tuple(control_labels)
    check_raw_params(control_labels=controls, delimiter=delimiter)
    adata = read_h5ad(path)
    if perturbation_column not in adata.obs:
        raise DataError(f"{path}: obs key {perturbation_column!r} (perturbation column) missing; "
                        f"obs has {', '.join(map(str, adata.obs.columns)) or 'no columns'}")
    labels = adata.obs[perturbation_column].astype(str)
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


def read_counts(path: str | os.PathLike[str], *, perturbation_column: str | None = None,
                control_labels: Iterable[str] = ("non-targeting", CONTROL), delimiter: str = "_") -> ad.AnnData:
    """Read the input of ``prepare``: layout (b) via :func:`read_raw` if ``perturbation_column`` is given,
    else an ``.h5ad`` that already has ``obs['condition']``.

    Raises
    ------
    DataError
        If the file is missing or unreadable (the message names it), or as :func:`read_raw`.
    """
    if perturbation_column is not None:
        return read_raw(path, perturbation_column=perturbation_column, control_labels=control_labels,
                        delimiter=delimiter)
    return read_h5ad(path)
