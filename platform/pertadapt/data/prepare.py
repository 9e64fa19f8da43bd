"""Raw counts -> the GEARS/PertAdapt processed layout (PertAdapt ``preprocess.py`` + GEARS ``new_data_process``).

Steps of :func:`prepare_adata` (names in :data:`PREPARE_STEPS`):

1. ``validate``: the counts must be finite, non-negative integers; gene names unique; condition names
   readable; control cells present.
2. ``align``: reorder the genes to ``vocabulary`` (genes absent from the data are zero-filled, logged and
   flagged ``var['measured'] = False``; data genes absent from the vocabulary are dropped and counted); drop cells with fewer than
   ``min_genes`` detected genes (``sc.pp.filter_cells``); keep counts in ``layers['counts']`` and their
   row sums in ``obs['total_count']``.
3. ``normalize``: ``sc.pp.normalize_total`` (``target_sum=None`` = median library size, as the
   reference pipeline) and ``sc.pp.log1p``, computed in place by row chunks with scanpy's arithmetic
   (scanpy's own functions allocate several full-size temporaries).
4. ``de`` (:func:`add_de_genes`): GEARS ``get_DE_genes``, i.e. ``obs['dose_val']``, ``obs['control']``,
   ``obs['condition_name']`` and, per cell type, ``sc.tl.rank_genes_groups`` (t-test, ``rankby_abs``,
   all genes, against ``{cell_type}_ctrl_1``) into ``uns['rank_genes_groups_cov_all']``; then GEARS
   ``get_dropout_non_zero_genes``: ``non_zeros_gene_idx``, ``non_dropout_gene_idx``,
   ``top_non_dropout_de_20``, ``top_non_zero_de_20``.

One deliberate difference to GEARS: with several cell types, GEARS compares each condition's mean
pooled over all cell types with the control mean pooled over all cell types in step 4; here each
``condition_name`` (one cell type) is compared with the control cells of its own cell type. With one
cell type (every published dataset) the two are identical.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertadapt.data.conditions import condition_genes, unify_spellings
from pertadapt.data.io import DataError, ParamError, check_param
from pertadapt.data.keys import (
    CELL_TYPE,
    CONDITION,
    CONDITION_NAME,
    CONTROL,
    CONTROL_FLAG,
    COUNTS_LAYER,
    DE_KEY,
    DOSE_VAL,
    GENE_NAME,
    MEASURED,
    NON_DROPOUT_KEY,
    NON_ZERO_KEY,
    SEP,
    TOP_NON_DROPOUT_DE_KEY,
    TOP_NON_ZERO_DE_KEY,
    TOTAL_COUNT,
)
from pertadapt.data.validate import gene_names, validate_adata

__all__ = ["PREPARE_STEPS", "add_de_genes", "check_prepare_params", "normalize_log1p", "prepare_adata"]

log = logging.getLogger(__name__)

#: Step names passed to the ``on_step`` callback of :func:`prepare_adata`, in order.
PREPARE_STEPS = ("validate", "align", "normalize", "de")
#: ``uns`` key recording the preprocessing parameters.
PREPARE_KEY = "pertadapt_prepare"


def _check_n_de(n_de: int) -> None:
    check_param("n_de", isinstance(n_de, int | np.integer) and n_de > 0, "a positive integer", n_de)


def check_prepare_params(*, vocabulary: Sequence[str] | None = None, min_genes: int = 200,
                         target_sum: float | None = None, n_de: int = 20, cell_type_default: str = "K562") -> None:
    """Check the parameters of :func:`prepare_adata` (the command line calls it before reading any data).

    Raises
    ------
    pertadapt.data.io.ParamError
        Naming the first parameter outside its range: an empty ``vocabulary`` or one with duplicate
        genes, ``min_genes`` < 0, ``target_sum`` not a finite positive number (0 would write an
        all-zero ``X``, a negative one NaN), ``n_de`` < 1, or an empty ``cell_type_default``.
    """
    if vocabulary is not None:
        names = pd.Index([str(g) for g in vocabulary])
        dup = names[names.duplicated()].unique()
        if len(dup):
            raise ParamError("vocabulary", f"duplicate gene names {', '.join(map(str, dup[:10]))}")
        if not len(names):
            raise ParamError("vocabulary", "no gene names")
    check_param("min_genes", isinstance(min_genes, int | np.integer) and min_genes >= 0, "a non-negative integer",
                min_genes)
    check_param("target_sum", target_sum is None or (math.isfinite(target_sum) and target_sum > 0),
                "a positive number (None: the median library size)", target_sum)
    _check_n_de(n_de)
    check_param("cell_type_default", bool(cell_type_default.strip()), "a non-empty name", cell_type_default)


def _align(x: sp.csr_matrix, genes: pd.Index, vocabulary: pd.Index) -> sp.csr_matrix:
    """Columns of ``x`` reordered to ``vocabulary`` (absent genes all-zero), float32 CSR ``(n_cells, n_vocab)``.

    ``genes`` must be unique. Memory: the output plus one int32 array of its non-zeros.
    """
    source_col = genes.get_indexer(vocabulary)
    if len(genes) == len(vocabulary) and np.array_equal(source_col, np.arange(len(genes))):
        out = x.astype(np.float32, copy=True)
    else:
        present = np.flatnonzero(source_col >= 0).astype(np.int32)
        sub = x[:, source_col[present]]
        out = sp.csr_matrix((sub.data.astype(np.float32, copy=False), present[sub.indices], sub.indptr),
                            shape=(x.shape[0], len(vocabulary)))
    out.sort_indices()
    out.eliminate_zeros()
    return out


def normalize_log1p(x: sp.csr_matrix, target_sum: float | None, rows_per_chunk: int = 20_000) -> float:
    """In place, row chunk by row chunk: ``sc.pp.normalize_total`` then ``sc.pp.log1p`` on CSR ``x``.

    Same arithmetic as scanpy (each row divided by ``row_sum / target``, rows summing to 0 left at 0,
    ``target_sum=None`` = median row sum), without scanpy's full-size temporaries. Returns the target.
    """
    totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    target = float(np.median(totals)) if target_sum is None else float(target_sum)
    factor = totals / target
    factor[factor == 0] = 1.0
    for r0 in range(0, x.shape[0], rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, x.shape[0])
        lo, hi = x.indptr[r0], x.indptr[r1]
        block = x.data[lo:hi]
        block /= np.repeat(factor[r0:r1], np.diff(x.indptr[r0:r1 + 1])).astype(np.float32)
        np.log1p(block, out=block)
    return target


def _condition_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """GEARS ``dose_val``, ``control`` and ``condition_name`` columns; all condition columns categorical."""
    cond = obs[CONDITION].astype(str)
    n_parts = cond.str.split(SEP).str.len()
    obs[DOSE_VAL] = np.where(n_parts == 2, "1+1", "1")
    obs[CONTROL_FLAG] = np.where(n_parts == 2, 0, 1)
    obs[CONDITION_NAME] = obs[CELL_TYPE].astype(str) + "_" + cond + "_" + obs[DOSE_VAL]
    for col in (CONDITION, CELL_TYPE, DOSE_VAL, CONTROL_FLAG, CONDITION_NAME):
        obs[col] = pd.Categorical(obs[col])
    return obs


def _rank_genes(adata: ad.AnnData) -> dict[str, np.ndarray]:
    """GEARS ``rank_genes_groups_by_cov``: condition_name -> all var_names ranked by |t| vs control."""
    ranked: dict[str, np.ndarray] = {}
    cell_types = adata.obs[CELL_TYPE].astype(str).to_numpy()
    for ct in pd.unique(cell_types):
        mask = cell_types == ct
        names = adata.obs[CONDITION_NAME].astype(str).to_numpy()[mask]
        reference = f"{ct}_{CONTROL}_1"
        if reference not in set(names):
            raise DataError(f"obs[{CELL_TYPE!r}] {ct!r}: no control cells (condition {CONTROL!r}) to test against")
        if len(set(names)) < 2:
            continue
        sub = ad.AnnData(X=adata.X if mask.all() else adata.X[mask],
                         obs=pd.DataFrame({CONDITION_NAME: pd.Categorical(names)},
                                          index=adata.obs_names[mask]),
                         var=pd.DataFrame(index=adata.var_names))
        sub.uns["log1p"] = {"base": None}
        import scanpy as sc  # seconds to import: only where data is prepared (not in every training worker)

        with warnings.catch_warnings():
            # scanpy fills its result frame column by column; pandas warns about fragmentation.
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            sc.tl.rank_genes_groups(sub, groupby=CONDITION_NAME, reference=reference, method="t-test",
                                    rankby_abs=True, n_genes=adata.n_vars, use_raw=False)
        result = sub.uns["rank_genes_groups"]["names"]
        for group in result.dtype.names:
            ranked[group] = np.asarray(result[group]).astype(str).astype(object)
    return ranked


def _dropout(adata: ad.AnnData, ranked: dict[str, np.ndarray], n_de: int) -> dict[str, dict[str, np.ndarray]]:
    """GEARS ``get_dropout_non_zero_genes`` (per cell type, see the module docstring)."""
    names = adata.obs[CONDITION_NAME].astype("category")
    codes = names.cat.codes.to_numpy()
    indicator = sp.csr_matrix((np.ones(len(codes), dtype=np.float32), (codes, np.arange(len(codes)))),
                              shape=(len(names.cat.categories), adata.n_obs))
    sums = (indicator @ adata.X).tocsr()
    sums.eliminate_zeros()
    row = {name: i for i, name in enumerate(names.cat.categories)}
    nonzero_of = {}
    for name, i in row.items():
        flags = np.zeros(adata.n_vars, dtype=bool)
        flags[sums.indices[sums.indptr[i]:sums.indptr[i + 1]]] = True
        nonzero_of[name] = flags
    cell_type_of = dict(zip(adata.obs[CONDITION_NAME].astype(str), adata.obs[CELL_TYPE].astype(str), strict=True))
    var_index = pd.Index(adata.var_names)
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in (NON_ZERO_KEY, NON_DROPOUT_KEY,
                                                            TOP_NON_DROPOUT_DE_KEY, TOP_NON_ZERO_DE_KEY)}
    for name, genes in ranked.items():
        nonzero = nonzero_of[name]
        nondropout = nonzero | ~nonzero_of[f"{cell_type_of[name]}_{CONTROL}_1"]
        order = var_index.get_indexer(genes)
        out[NON_ZERO_KEY][name] = np.flatnonzero(nonzero).astype(np.int64)
        out[NON_DROPOUT_KEY][name] = np.flatnonzero(nondropout).astype(np.int64)
        out[TOP_NON_DROPOUT_DE_KEY][name] = var_index[order[nondropout[order]][:n_de]].to_numpy(dtype=object)
        out[TOP_NON_ZERO_DE_KEY][name] = var_index[order[nonzero[order]][:n_de]].to_numpy(dtype=object)
    return out


def add_de_genes(adata: ad.AnnData, *, n_de: int = 20) -> ad.AnnData:
    """Add the GEARS obs columns and the five ``uns`` DE keys to a log1p-normalised AnnData, in place.

    Parameters
    ----------
    adata
        Log1p-normalised sparse ``X`` ``(n_cells, n_genes)``, ``obs['condition']``, ``obs['cell_type']``;
        every condition needs at least 2 cells per cell type, every cell type control cells.
    n_de
        Length of ``top_non_dropout_de_20`` / ``top_non_zero_de_20`` (20 in GEARS; the key names keep
        ``20`` whatever the value).

    Returns
    -------
    anndata.AnnData
        ``adata`` with ``obs['dose_val', 'control', 'condition_name']`` and ``uns`` keys
        ``rank_genes_groups_cov_all`` (condition_name -> gene IDs ``(n_genes,)``, most significant
        first), ``non_zeros_gene_idx`` / ``non_dropout_gene_idx`` (sorted int64 indices) and
        ``top_non_dropout_de_20`` / ``top_non_zero_de_20`` (gene IDs ``(<= n_de,)``); no ``ctrl`` entries.
    """
    _check_n_de(n_de)
    adata.obs = _condition_obs(adata.obs)
    ranked = _rank_genes(adata)
    adata.uns[DE_KEY] = ranked
    adata.uns.update(_dropout(adata, ranked, n_de))
    return adata


def _drop_small_groups(adata: ad.AnnData) -> ad.AnnData:
    sizes = adata.obs.groupby([CELL_TYPE, CONDITION], observed=True).size()
    small = sizes[sizes < 2]
    if not len(small):
        return adata
    log.warning("dropping conditions with fewer than 2 cells (no DE test possible): %s",
                ", ".join(f"{c} in {ct} ({n})" for (ct, c), n in small.items()))
    pairs = set(small.index)
    keep = np.array([(ct, c) not in pairs for ct, c in zip(adata.obs[CELL_TYPE], adata.obs[CONDITION], strict=True)])
    return adata[keep].copy()


def prepare_adata(adata: ad.AnnData, *, vocabulary: Sequence[str] | None = None, min_genes: int = 200,
                  target_sum: float | None = None, n_de: int = 20, cell_type_default: str = "K562",
                  on_step: Callable[[str], None] | None = None) -> ad.AnnData:
    """Preprocess raw counts into the GEARS/PertAdapt processed layout (see the module docstring).

    Parameters
    ----------
    adata
        Raw counts ``(n_cells, n_genes)`` in ``layers['counts']`` (preferred) or ``X``;
        ``obs['condition']`` with GEARS names; optional ``obs['cell_type']``; gene symbols in
        ``var['gene_name']`` or ``var_names``. Not modified.
    vocabulary
        Target gene list (e.g. a backbone's); ``None`` keeps the data's genes in their order.
    min_genes
        Cells with fewer detected genes (after alignment) are dropped.
    target_sum
        ``normalize_total`` target; ``None`` = median library size of the kept cells.
    n_de
        Length of the ``top_non_*_de_20`` lists.
    cell_type_default
        Cell type of every cell when ``obs['cell_type']`` is absent.
    on_step
        Called with each name of :data:`PREPARE_STEPS` when that step starts (progress display).

    Returns
    -------
    anndata.AnnData
        New AnnData ``(n_kept_cells, n_vocab)``: ``X`` log1p-normalised float32 CSR, ``layers['counts']``
        float32 CSR, ``var_names`` = ``var['gene_name']`` = the vocabulary, ``var['measured']`` (bool,
        ``False`` for the zero-filled genes), ``obs['total_count']``, the
        GEARS obs columns and ``uns`` keys (:func:`add_de_genes`), ``uns['log1p']`` and
        ``uns['pertadapt_prepare']`` (parameters and zero-filled gene count).

    Raises
    ------
    pertadapt.data.io.ParamError
        On a parameter outside its range (:func:`check_prepare_params`) or duplicate vocabulary genes,
        before any work.
    pertadapt.data.io.DataError
        On any validation error, perturbed genes outside the vocabulary, or no cells left; the message
        names the key, condition or gene.
    """
    def step(name: str) -> None:
        log.info("prepare: %s", name)
        if on_step is not None:
            on_step(name)

    check_prepare_params(vocabulary=vocabulary, min_genes=min_genes, target_sum=target_sum, n_de=n_de,
                         cell_type_default=cell_type_default)
    step("validate")
    report = validate_adata(adata, expect="counts", min_cells_per_condition=1, check_perturbed_genes=False,
                            counts_layer=COUNTS_LAYER)
    report.raise_for_errors()
    genes = gene_names(adata)
    vocab = genes if vocabulary is None else pd.Index([str(g) for g in vocabulary])
    mapping = unify_spellings(adata.obs[CONDITION].astype(str))
    conditions = adata.obs[CONDITION].astype(str).map(mapping)
    outside = sorted({g for c in mapping.values() for g in condition_genes(c)} - set(vocab))
    if outside:
        raise DataError(f"var: perturbed genes missing from the {'vocabulary' if vocabulary is not None else 'data'}: "
                        + ", ".join(outside[:10]) + (f", ... ({len(outside)} in all)" if len(outside) > 10 else ""))

    step("align")
    source = adata.layers[COUNTS_LAYER] if COUNTS_LAYER in adata.layers else adata.X
    counts = _align(sp.csr_matrix(source), genes, vocab)
    zero_filled = vocab.difference(genes)
    if len(zero_filled):
        log.warning("%d of %d vocabulary genes are absent from the data and zero-filled (e.g. %s)",
                    len(zero_filled), len(vocab), ", ".join(map(str, zero_filled[:5])))
    n_dropped_genes = len(genes.difference(vocab))
    if n_dropped_genes:
        log.info("%d data genes are not in the vocabulary and are dropped", n_dropped_genes)
    keep = np.diff(counts.indptr) >= min_genes
    log.info("%d of %d cells have >= %d detected genes", int(keep.sum()), len(keep), min_genes)
    if not keep.any():
        raise DataError(f"no cell has >= {min_genes} detected genes (min_genes)")
    counts = counts[keep] if not keep.all() else counts
    obs = adata.obs.iloc[np.flatnonzero(keep)].copy()
    obs[CONDITION] = conditions.to_numpy()[keep]
    if CELL_TYPE not in obs:
        obs[CELL_TYPE] = cell_type_default
    obs[TOTAL_COUNT] = np.asarray(counts.sum(axis=1)).ravel().round()
    var = pd.DataFrame({GENE_NAME: vocab.to_numpy(), MEASURED: vocab.isin(genes)}, index=vocab)
    out = ad.AnnData(X=counts.copy(), obs=obs, var=var)
    out.layers[COUNTS_LAYER] = counts
    out = _drop_small_groups(out)

    step("normalize")
    used_target = normalize_log1p(out.X, target_sum)
    out.uns["log1p"] = {"base": None}

    step("de")
    add_de_genes(out, n_de=n_de)
    out.uns[PREPARE_KEY] = {"min_genes": min_genes, "target_sum": used_target, "n_de": n_de,
                            "n_genes_zero_filled": len(zero_filled), "n_genes_dropped": n_dropped_genes,
                            "n_cells_in": adata.n_obs}
    log.info("prepared %d cells x %d genes, %d conditions", out.n_obs, out.n_vars, len(out.uns[DE_KEY]))
    return out
