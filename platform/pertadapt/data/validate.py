"""Checks of a Perturb-seq AnnData against the data contract, with a readable report.

:func:`validate_adata` never raises on bad data: it returns a :class:`ValidationReport` with a
summary and every problem found, each naming the key, condition or gene concerned. Errors make the
file unusable (``pertadapt data validate`` exits 1); warnings do not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertadapt.data.conditions import ConditionError, canonical_condition, condition_genes
from pertadapt.data.io import DataError, ParamError, check_param, read_h5ad
from pertadapt.data.keys import (
    CELL_TYPE,
    CONDITION,
    CONDITION_NAME,
    CONTROL,
    DE_KEY,
    GENE_NAME,
    NON_DROPOUT_KEY,
    NON_ZERO_KEY,
    TOP_NON_DROPOUT_DE_KEY,
    TOP_NON_ZERO_DE_KEY,
)

__all__ = ["EXPECT", "Problem", "ValidationReport", "check_validate_params", "gene_names", "matrix_kind",
           "validate_adata", "validate_file"]

log = logging.getLogger(__name__)

#: Accepted values of ``expect``: what ``X`` must hold.
EXPECT = ("counts", "log1p")
#: How many offending names a message lists before ``...``.
_SHOW = 5
#: A non-negative, non-integer matrix whose maximum is below this looks log1p-normalised.
_LOG1P_MAX = 20.0


@dataclass(frozen=True)
class Problem:
    """One finding: ``severity`` is ``error`` or ``warning``; ``key`` the AnnData key concerned."""

    severity: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.key}: {self.message}"


@dataclass
class ValidationReport:
    """Summary numbers and the problems found by :func:`validate_adata`."""

    summary: dict[str, object] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """Whether no error was found."""
        return not self.errors

    def raise_for_errors(self, source: str | None = None) -> None:
        """Raise :class:`~pertadapt.data.io.DataError` listing every error, if there is any.

        The message is ``key: message; key: message ...``, prefixed by ``source:`` when given.
        """
        if self.errors:
            listed = "; ".join(f"{p.key}: {p.message}" for p in self.errors)
            raise DataError(listed if source is None else f"{source}: {listed}")

    def add(self, severity: str, key: str, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(severity, key, message))


def _names(items: Sequence[object]) -> str:
    shown = ", ".join(str(x) for x in list(items)[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def gene_names(adata: ad.AnnData) -> pd.Index:
    """Gene symbols: ``var['gene_name']`` if present, else ``var_names``; shape ``(n_genes,)``."""
    if GENE_NAME in adata.var:
        return pd.Index(adata.var[GENE_NAME].astype(str).to_numpy())
    return pd.Index(adata.var_names.astype(str))


def _bad_columns(x: np.ndarray | sp.spmatrix, test: np.ufunc | object) -> np.ndarray:
    """Sorted column indices where ``test(values)`` holds for some stored value, shape ``(k,)``."""
    if sp.issparse(x):
        csr = x.tocsr()
        return np.unique(csr.indices[test(csr.data)])
    return np.flatnonzero(test(np.asarray(x)).any(axis=0))


def matrix_kind(x: np.ndarray | sp.spmatrix) -> str:
    """``counts`` (non-negative integers), ``log1p`` (non-negative, non-integer, max < 20) or ``other``.

    Parameters
    ----------
    x
        Matrix ``(n_cells, n_genes)``, dense or sparse.
    """
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "counts"
    if finite.min() < 0:
        return "other"
    if np.all(finite == np.round(finite)):
        return "counts"
    return "log1p" if finite.max() < _LOG1P_MAX else "other"


def _check_matrix(report: ValidationReport, x: np.ndarray | sp.spmatrix, key: str, genes: pd.Index,
                  expect: str | None) -> None:
    non_finite = _bad_columns(x, lambda v: ~np.isfinite(v))
    if len(non_finite):
        report.add("error", key, f"non-finite values (NaN/inf) in genes {_names(genes[non_finite])}")
    negative = _bad_columns(x, lambda v: v < 0)
    if len(negative):
        report.add("error", key, f"negative values in genes {_names(genes[negative])}")
    kind = matrix_kind(x)
    report.summary["x_kind"] = kind
    if expect == "counts" and kind != "counts":
        frac = _bad_columns(x, lambda v: np.isfinite(v) & (v != np.round(v)))
        report.add("error", key, f"raw counts expected but non-integer values found in genes "
                                 f"{_names(genes[frac])}" + (" (X looks log1p-normalised)" if kind == "log1p" else ""))
    if expect == "log1p" and kind == "counts":
        report.add("error", key, "log1p-normalised values expected but X holds integers (raw counts?)")
    if not sp.issparse(x):
        report.add("warning", key, "X is dense; GEARS and PertAdapt expect a sparse matrix")


def _check_conditions(report: ValidationReport, conditions: pd.Series, genes: pd.Index,
                      min_cells: int, check_perturbed_genes: bool) -> None:
    counts = conditions.value_counts()
    bad, by_key = [], {}
    for name in counts.index:
        try:
            by_key.setdefault(canonical_condition(name), []).append(name)
        except ConditionError as e:
            bad.append(str(e))
    for message in bad:
        report.add("error", f"obs[{CONDITION!r}]", message)
    for spellings in by_key.values():
        if len(spellings) > 1:
            report.add("warning", f"obs[{CONDITION!r}]",
                       f"conditions {' and '.join(sorted(spellings))} are the same condition")
    valid = [c for spellings in by_key.values() for c in spellings]
    n_genes = {c: len(condition_genes(c)) for c in valid}
    n_ctrl = int(counts.get(CONTROL, 0))
    report.summary.update(
        n_conditions=len(counts), n_control_cells=n_ctrl,
        n_single=sum(v == 1 for v in n_genes.values()), n_double=sum(v == 2 for v in n_genes.values()),
        cells_per_condition_min=int(counts.min()) if len(counts) else 0,
        cells_per_condition_median=float(counts.median()) if len(counts) else 0.0,
        cells_per_condition_max=int(counts.max()) if len(counts) else 0,
    )
    if n_ctrl == 0:
        report.add("error", f"obs[{CONDITION!r}]", f"no control cells (condition {CONTROL!r})")
    few = counts[counts < min_cells]
    if len(few):
        report.add("error", f"obs[{CONDITION!r}]", f"conditions with fewer than {min_cells} cells: "
                   + _names([f"{c} ({n})" for c, n in few.items()]))
    if check_perturbed_genes:
        known = set(genes)
        missing: dict[str, list[str]] = {}
        for c in valid:
            for g in condition_genes(c):
                if g not in known:
                    missing.setdefault(g, []).append(c)
        if missing:
            report.add("error", "var", "perturbed genes missing from var: "
                       + _names([f"{g} (in {', '.join(cs[:2])})" for g, cs in sorted(missing.items())]))


def _check_uns(report: ValidationReport, adata: ad.AnnData, genes: pd.Index) -> None:
    keys = [k for k in (DE_KEY, NON_ZERO_KEY, NON_DROPOUT_KEY, TOP_NON_DROPOUT_DE_KEY, TOP_NON_ZERO_DE_KEY)
            if k in adata.uns]
    if not keys:
        return
    if CONDITION_NAME not in adata.obs:
        report.add("error", f"obs[{CONDITION_NAME!r}]", f"missing, but uns keys {', '.join(keys)} are keyed by it")
        return
    expected = {str(n) for n, c in zip(adata.obs[CONDITION_NAME].astype(str), adata.obs[CONDITION].astype(str),
                                       strict=True) if c != CONTROL}
    var_ids = set(adata.var_names.astype(str))
    for key in keys:
        entries = adata.uns[key]
        if not hasattr(entries, "keys"):
            report.add("error", f"uns[{key!r}]", "not a dict of condition_name -> array")
            continue
        absent = sorted(expected - set(entries.keys()))
        if absent:
            report.add("error", f"uns[{key!r}]", f"no entry for condition_name {_names(absent)}")
        if key in (DE_KEY, TOP_NON_DROPOUT_DE_KEY, TOP_NON_ZERO_DE_KEY):
            unknown = sorted({str(g) for v in entries.values() for g in np.asarray(v).ravel()} - var_ids)
            if unknown:
                report.add("error", f"uns[{key!r}]", f"gene IDs not in var_names: {_names(unknown)}")
        else:
            top = max((int(np.max(v)) for v in entries.values() if np.size(v)), default=-1)
            if top >= len(genes):
                report.add("error", f"uns[{key!r}]", f"gene index {top} out of range ({len(genes)} genes)")


def check_validate_params(*, expect: str | None = None, min_cells_per_condition: int = 2) -> None:
    """Check the parameters of :func:`validate_adata` (the command line calls it before reading the file).

    Raises
    ------
    pertadapt.data.io.ParamError
        If ``expect`` is not ``None`` or one of :data:`EXPECT`, or ``min_cells_per_condition`` < 1.
    """
    if expect not in (None, *EXPECT):
        raise ParamError("expect", f"{expect!r} is not one of {', '.join(EXPECT)}")
    check_param("min_cells_per_condition",
                isinstance(min_cells_per_condition, int | np.integer) and min_cells_per_condition >= 1,
                "a positive integer", min_cells_per_condition)


def validate_adata(adata: ad.AnnData, *, expect: str | None = None, min_cells_per_condition: int = 2,
                   check_perturbed_genes: bool = True, counts_layer: str | None = None) -> ValidationReport:
    """Check an AnnData against the data contract and summarise it.

    Parameters
    ----------
    adata
        Cells x genes ``(n_cells, n_genes)`` with ``obs['condition']`` (GEARS names).
    expect
        ``counts``: the checked matrix must hold non-negative integers; ``log1p``: it must not hold
        integers only (and ``obs['cell_type']`` is then required); ``None``: no expectation.
    min_cells_per_condition
        Conditions with fewer cells are errors (DE tests need at least 2).
    check_perturbed_genes
        Whether every perturbed gene must be in ``var``.
    counts_layer
        Check ``layers[counts_layer]`` instead of ``X`` (if that layer exists).

    Returns
    -------
    ValidationReport
        Summary keys: ``n_cells``, ``n_genes``, ``n_conditions``, ``n_single``, ``n_double``,
        ``n_control_cells``, ``cells_per_condition_{min,median,max}``, ``density``, ``x_kind``,
        ``cell_types``.

    Raises
    ------
    pertadapt.data.io.ParamError
        On a parameter outside its range (:func:`check_validate_params`); bad data is reported, not raised.
    """
    check_validate_params(expect=expect, min_cells_per_condition=min_cells_per_condition)
    report = ValidationReport()
    genes = gene_names(adata)
    use_layer = counts_layer is not None and counts_layer in adata.layers
    x = adata.layers[counts_layer] if use_layer else adata.X
    key = f"layers[{counts_layer!r}]" if use_layer else "X"
    nnz = x.nnz if sp.issparse(x) else int(np.count_nonzero(x))
    report.summary.update(n_cells=adata.n_obs, n_genes=adata.n_vars,
                          density=nnz / max(adata.n_obs * adata.n_vars, 1))
    if GENE_NAME not in adata.var:
        report.add("warning", f"var[{GENE_NAME!r}]", "missing; gene symbols are taken from var_names")
    dup = genes[genes.duplicated()].unique()
    if len(dup):
        report.add("error", "var", f"duplicate gene names: {_names(list(dup))}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        report.add("error", key, f"empty matrix ({adata.n_obs} cells x {adata.n_vars} genes)")
    else:
        _check_matrix(report, x, key, genes, expect)
    if CELL_TYPE in adata.obs:
        report.summary["cell_types"] = sorted(map(str, adata.obs[CELL_TYPE].unique()))
    elif expect == "log1p":
        report.add("error", f"obs[{CELL_TYPE!r}]", "missing (required by the processed layout)")
    else:
        report.add("warning", f"obs[{CELL_TYPE!r}]", "missing; prepare fills in the default cell type")
    if CONDITION not in adata.obs:
        report.add("error", f"obs[{CONDITION!r}]", "missing; obs has " + (", ".join(map(str, adata.obs.columns))
                                                                         or "no columns"))
        return report
    _check_conditions(report, adata.obs[CONDITION].astype(str), genes, min_cells_per_condition,
                      check_perturbed_genes)
    _check_uns(report, adata, genes)
    for p in report.problems:
        log.debug("%s", p)
    return report


def validate_file(path: str | os.PathLike[str], *, expect: str | None = None,
                  min_cells_per_condition: int = 2) -> ValidationReport:
    """Read an ``.h5ad`` and :func:`validate_adata` it (parameters are checked before the file is read).

    Raises
    ------
    pertadapt.data.io.ParamError
        As :func:`check_validate_params`.
    pertadapt.data.io.DataError
        If the file is missing or unreadable (the message names it).
    """
    check_validate_params(expect=expect, min_cells_per_condition=min_cells_per_condition)
    return validate_adata(read_h5ad(path), expect=expect, min_cells_per_condition=min_cells_per_condition)
