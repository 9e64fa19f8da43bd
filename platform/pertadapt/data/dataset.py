"""Training dataset: each perturbed cell paired with a randomly drawn control cell of its cell type.

Works on a prepared AnnData (``pertadapt data prepare`` layout); ``X`` stays sparse and rows are
densified one micro-batch at a time, so memory is bounded by the matrix itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from pertadapt.data import keys
from pertadapt.data.conditions import condition_genes
from pertadapt.data.io import DataError, read_h5ad, read_h5ad_lazy
from pertadapt.types import Batch

#: DE genes kept per condition for the metrics (GEARS' frac_correct_direction_200).
N_METRIC_DE = 200
#: Rows read at a time when averaging over cells.
_CHUNK = 4096

__all__ = ["N_METRIC_DE", "PairedCells", "PerturbData", "draw_control_pool", "load_perturb_data",
           "read_perturb_data"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerturbData:
    """A prepared dataset in array form: the one reader every consumer uses.

    Training, ``pertadapt eval``, ``pertadapt baselines`` and the sweep's baseline arms all read a
    prepared ``.h5ad`` through :func:`read_perturb_data` (the role scvi-tools' ``AnnDataManager``
    plays), so condition means, DE lists and gene names mean the same thing everywhere.

    Attributes
    ----------
    genes
        ``(N,)`` model gene order (``var_names``).
    X
        ``(n_cells, N)`` log1p-normalised expression: an in-memory CSR matrix, or the file-backed
        sparse dataset of an AnnData opened with ``backed='r'`` (rows are then read on demand).
    total_count
        ``(n_cells,)`` raw UMI totals (``None`` when the file has none; training requires them).
    cell_condition
        ``(n_cells,)`` condition index into ``conditions``.
    cell_type
        ``(n_cells,)`` cell-type index.
    conditions
        Condition names (GEARS style, sorted), ``ctrl`` included.
    de_idx
        condition → top DE gene positions in rank order, at least the first 200 (training uses the first
        ``n_de``; the direction metrics use up to 200); absent for ctrl.
    nz_idx
        condition → sorted positions of genes with non-zero mean (absent for ctrl; empty when the file
        has no ``uns['non_zeros_gene_idx']`` and was read for evaluation only).
    non_dropout_de_idx
        condition → positions of ``uns['top_non_dropout_de_20']`` (empty when the file has none).
    measured
        ``(N,)`` bool, genes the dataset measured (``var['measured']``; ``False`` = zero-filled by
        ``pertadapt data prepare --vocab``); ``None`` = every gene measured.
    columns
        ``(N,)`` positions of ``genes`` among the columns of ``X`` in a gene-subset view
        (:meth:`gene_subset`); ``None`` = ``X``'s columns are ``genes``. :meth:`rows` reads ``genes``
        only, :meth:`input_rows` every column of ``X`` (a backbone's input).
    """

    genes: tuple[str, ...]
    X: object
    total_count: np.ndarray | None
    cell_condition: np.ndarray
    cell_type: np.ndarray
    conditions: tuple[str, ...]
    de_idx: dict[str, np.ndarray]
    nz_idx: dict[str, np.ndarray]
    non_dropout_de_idx: dict[str, np.ndarray] = field(default_factory=dict)
    measured: np.ndarray | None = None
    columns: np.ndarray | None = None

    def cells_of(self, conditions: Sequence[str]) -> np.ndarray:
        """Indices of the cells whose condition is in ``conditions``."""
        wanted = np.isin(np.asarray(self.conditions), list(conditions))
        return np.flatnonzero(wanted[self.cell_condition])

    @property
    def control_cells(self) -> np.ndarray:
        """Indices of all control cells."""
        return self.cells_of([keys.CONTROL])

    def rows(self, cells: np.ndarray) -> sp.csr_matrix:
        """``(len(cells), N)`` rows ``cells`` (any order, repeats allowed) over ``genes``, as CSR; works in
        memory and backed."""
        block = self.input_rows(cells)
        return block if self.columns is None else block[:, self.columns]

    def input_rows(self, cells: np.ndarray) -> sp.csr_matrix:
        """Rows ``cells`` over every column of ``X`` (the genes a backbone reads), as CSR."""
        unique, inverse = np.unique(cells, return_inverse=True)
        block = self.X[unique]
        block = block if sp.issparse(block) else sp.csr_matrix(block)
        return sp.csr_matrix(block)[inverse]

    @property
    def measured_positions(self) -> np.ndarray:
        """``(M,)`` sorted positions of the measured genes in ``genes`` (all of them without flags)."""
        return np.arange(len(self.genes)) if self.measured is None else np.flatnonzero(self.measured)

    def gene_subset(self, positions: np.ndarray) -> PerturbData:
        """A view over the genes at sorted ``positions``: the same cells and ``X``, gene-indexed fields remapped.

        DE rankings, non-zero and non-dropout lists keep their order and drop the genes outside the view.
        ``self`` itself when ``positions`` are every gene.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if np.array_equal(positions, np.arange(len(self.genes))):
            return self
        new = np.full(len(self.genes), -1, dtype=np.int64)
        new[positions] = np.arange(len(positions))

        def remap(lists: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {c: new[idx][new[idx] >= 0] for c, idx in lists.items()}

        base = np.arange(len(self.genes)) if self.columns is None else self.columns
        return PerturbData(tuple(self.genes[i] for i in positions), self.X, self.total_count, self.cell_condition,
                           self.cell_type, self.conditions, remap(self.de_idx), remap(self.nz_idx),
                           remap(self.non_dropout_de_idx),
                           None if self.measured is None else self.measured[positions], base[positions])

    def measured_only(self) -> PerturbData:
        """The view over the measured genes (:meth:`gene_subset`); ``self`` when every gene is measured."""
        return self.gene_subset(self.measured_positions)

    @functools.cached_property
    def condition_means(self) -> dict[str, np.ndarray]:
        """condition → ``(N,)`` float64 mean of ``X`` over its cells (every condition, ctrl included).

        Computed once, ``_CHUNK`` rows at a time (bounded memory in backed mode), as D⁻¹ Aᵀ X with the
        one-hot condition indicator A.
        """
        sums = np.zeros((len(self.conditions), len(self.genes)))
        n = self.cell_condition.size
        for start in range(0, n, _CHUNK):
            cells = np.arange(start, min(start + _CHUNK, n))
            onehot = sp.csr_matrix((np.ones(cells.size), (self.cell_condition[cells], np.arange(cells.size))),
                                   shape=(len(self.conditions), cells.size))
            sums += np.asarray((onehot @ self.rows(cells).astype(np.float64)).todense())
        counts = np.bincount(self.cell_condition, minlength=len(self.conditions)).astype(np.float64)
        return {c: sums[i] / counts[i] for i, c in enumerate(self.conditions)}

    @property
    def ctrl_mean(self) -> np.ndarray:
        """``(N,)`` float64 mean over **all** control cells (GEARS's c)."""
        return self.condition_means[keys.CONTROL]


def _ranked_positions(key: str, name: str, ranked: Sequence[str], pos: Mapping[str, int]) -> np.ndarray:
    missing = [str(g) for g in ranked if str(g) not in pos]
    if missing:
        raise KeyError(f"uns['{key}'][{name!r}]: gene {missing[0]!r} is not in var_names")
    return np.array([pos[str(g)] for g in ranked], dtype=np.int64)


def load_perturb_data(adata: ad.AnnData, *, n_de: int = 20, for_training: bool = True,
                      X: object | None = None) -> PerturbData:
    """Turn a prepared AnnData (in memory or opened with ``backed='r'``) into :class:`PerturbData`.

    Reads ``obs['condition']``, ``obs['condition_name']``, ``obs['cell_type']`` (optional),
    ``obs['total_count']``, ``X`` (log1p) and ``uns['rank_genes_groups_cov_all']``,
    ``uns['non_zeros_gene_idx']`` and (optional) ``uns['top_non_dropout_de_20']`` and ``var['measured']``. With
    ``for_training=False`` (evaluation, baselines) ``total_count`` and the non-zero lists may be absent.
    ``X``, when given, is the file-backed ``(n_cells, N)`` matrix to use instead of ``adata.X``
    (:func:`~pertadapt.data.io.read_h5ad_lazy`).
    """
    required = (keys.CONDITION, keys.CONDITION_NAME, keys.TOTAL_COUNT) if for_training else (
        keys.CONDITION, keys.CONDITION_NAME)
    for key in required:
        if key not in adata.obs:
            raise KeyError(f"obs['{key}'] is missing; run `pertadapt data prepare` first")
    for key in (keys.DE_KEY, keys.NON_ZERO_KEY) if for_training else (keys.DE_KEY,):
        if key not in adata.uns:
            raise KeyError(f"uns['{key}'] is missing (DE genes are not computed); run `pertadapt data prepare` "
                           "on this dataset first")
    genes = tuple(map(str, adata.var_names))
    pos = {g: i for i, g in enumerate(genes)}
    cond = adata.obs[keys.CONDITION].astype(str).to_numpy()
    conditions, cell_condition = np.unique(cond, return_inverse=True)
    ctype = adata.obs[keys.CELL_TYPE].astype(str).to_numpy() if keys.CELL_TYPE in adata.obs else np.zeros(len(cond))
    _, cell_type = np.unique(ctype, return_inverse=True)
    name_of = dict(zip(cond, adata.obs[keys.CONDITION_NAME].astype(str), strict=True))
    non_zero = adata.uns.get(keys.NON_ZERO_KEY, {})
    non_dropout = adata.uns.get(keys.TOP_NON_DROPOUT_DE_KEY, {})
    de_idx, nz_idx, nd_idx = {}, {}, {}
    for c in conditions:
        if c == keys.CONTROL:
            continue
        name = name_of[c]
        ranked = adata.uns[keys.DE_KEY].get(name)
        if ranked is None:
            raise KeyError(f"uns['{keys.DE_KEY}'] has no entry {name!r} for condition {c!r}; run "
                           "`pertadapt data prepare` again")
        de_idx[c] = _ranked_positions(keys.DE_KEY, name, list(ranked)[:max(n_de, N_METRIC_DE)], pos)
        if name in non_zero:
            nz_idx[c] = np.asarray(non_zero[name], dtype=np.int64)
        elif for_training:
            raise KeyError(f"uns['{keys.NON_ZERO_KEY}'] has no entry {name!r} for condition {c!r}")
        if name in non_dropout:
            nd_idx[c] = _ranked_positions(keys.TOP_NON_DROPOUT_DE_KEY, name, list(non_dropout[name]), pos)
    if X is None and adata.isbacked:
        X = adata.X  # file-backed; rows are read per batch
    elif X is None:
        X = sp.csr_matrix(adata.X if sp.issparse(adata.X) else np.asarray(adata.X), dtype=np.float32)
    total = adata.obs[keys.TOTAL_COUNT].to_numpy(np.float32) if keys.TOTAL_COUNT in adata.obs else None
    measured = adata.var[keys.MEASURED].to_numpy(bool) if keys.MEASURED in adata.var else None
    return PerturbData(genes, X, total, cell_condition.astype(np.int64), cell_type.astype(np.int64),
                       tuple(map(str, conditions)), de_idx, nz_idx, nd_idx,
                       None if measured is None or measured.all() else measured)


def read_perturb_data(path: str | Path, *, n_de: int = 20, backed: bool = False,
                      for_training: bool = True) -> PerturbData:
    """Read a prepared ``.h5ad`` into :class:`PerturbData`.

    Parameters
    ----------
    path
        Prepared file (``pertadapt data prepare`` layout).
    n_de
        DE genes per condition used by training.
    backed
        Keep ``X`` on disk and read the rows of each batch on demand, so memory stays bounded by
        ``obs``/``var``/``uns`` and one batch (the file must hold a sparse CSR ``X``); no other element
        (``layers['counts']``, ``obsm``, ...) is read.
    for_training
        Require what training needs (``obs['total_count']``, ``uns['non_zeros_gene_idx']``).

    Raises
    ------
    DataError
        Not a readable ``.h5ad`` (missing, a directory, not HDF5, truncated) or a missing key; the
        message names the file and the key.
    """
    p = Path(path)
    adata, X = read_h5ad_lazy(p) if backed else (read_h5ad(p), None)
    try:
        return load_perturb_data(adata, n_de=n_de, for_training=for_training, X=X)
    except KeyError as e:
        raise DataError(f"{p}: {e.args[0]}") from e


def draw_control_pool(data: PerturbData, size: int | None, seed: int) -> np.ndarray:
    """The control pool: the control cells perturbed cells are paired with (``data.control_pool``).

    Parameters
    ----------
    data
        The dataset arrays.
    size
        Pool size; ``None`` (or at least the number of control cells) = every control cell.
    seed
        Seed of the draw without replacement (``data.control_pool_seed``).

    Returns
    -------
    np.ndarray
        ``(pool,)`` sorted int64 cell indices.
    """
    ctrl = data.control_cells
    if size is None or size >= len(ctrl):
        if size is not None:
            log.info("data.control_pool=%d: the data has %d control cells; the pool is all of them", size, len(ctrl))
        return ctrl
    return np.sort(np.random.default_rng(seed).choice(ctrl, size=size, replace=False))


class PairedCells(torch.utils.data.Dataset):
    """Cells of some conditions, each paired with one control cell of the same cell type (seeded).

    Control cells are paired with themselves (``x = y``), as in the reference; with a control pool, a
    control cell outside the pool is paired with a pool control of its cell type instead.

    Parameters
    ----------
    data
        The dataset arrays.
    conditions
        Conditions to include (e.g. the training split, ``ctrl`` included).
    pert_vocab
        Perturbation vocabulary; ``pert_idx`` indexes into it.
    seed
        Seed of the control pairing.
    n_de
        Number of DE genes per cell in the batch.
    pool
        ``(pool,)`` sorted cell indices of the control pool (:func:`draw_control_pool`); ``None`` = every
        control cell. ``Batch.ctrl_idx`` is the paired control's position in it.
    """

    def __init__(self, data: PerturbData, conditions: Sequence[str], pert_vocab: Sequence[str], *, seed: int,
                 n_de: int = 20, pool: np.ndarray | None = None) -> None:
        self.data, self.n_de = data, n_de
        self._control_means: dict[str, np.ndarray] | None = None  # computed on first use (reads X)
        self.cells = data.cells_of(conditions)
        ctrl = data.control_cells if pool is None else np.asarray(pool, dtype=np.int64)
        if len(ctrl) == 0:
            raise ValueError("no control cells ('ctrl') in the data")
        self.pool = ctrl
        rng = np.random.default_rng(seed)
        self.pair = self.cells.copy()
        is_ctrl = data.cell_condition[self.cells] == self._ctrl_id
        types = np.unique(data.cell_type[self.cells])
        for t in types:
            pool_t = ctrl[data.cell_type[ctrl] == t]
            if len(pool_t) == 0:
                raise ValueError(f"no control cells for cell type index {t}"
                                 + ("" if pool is None else " in the control pool (data.control_pool)"))
            sel = (data.cell_type[self.cells] == t) & ~is_ctrl
            self.pair[sel] = rng.choice(pool_t, size=int(sel.sum()))
        outside = is_ctrl & ~np.isin(self.cells, ctrl)
        for t in types if outside.any() else ():
            sel = outside & (data.cell_type[self.cells] == t)
            self.pair[sel] = rng.choice(ctrl[data.cell_type[ctrl] == t], size=int(sel.sum()))
        self.pair_pool_idx = np.searchsorted(ctrl, self.pair)
        vocab = {g: i for i, g in enumerate(pert_vocab)}
        gpos = {g: i for i, g in enumerate(data.genes)}
        n_cond = len(data.conditions)
        self.cond_pert = np.full((n_cond, 2), -1, dtype=np.int64)
        self.cond_pos = np.full((n_cond, 2), -1, dtype=np.int64)
        for ci, c in enumerate(data.conditions):
            for j, g in enumerate(condition_genes(c)[:2]):
                self.cond_pert[ci, j] = vocab.get(g, -1)
                self.cond_pos[ci, j] = gpos.get(g, -1)

    @classmethod
    def for_evaluation(cls, data: PerturbData, conditions: Sequence[str], pert_vocab: Sequence[str], *, seed: int,
                       n_de: int = 20, controls: int | None = None, controls_seed: int = 0,
                       pool: np.ndarray | None = None) -> PairedCells:
        """Evaluation cells: each perturbed condition's control cells, so that its mean prediction averages
        the model over ``controls`` controls instead of one random control per perturbed cell.

        Row ``r`` is a cell of the condition (its ``y``, DE genes and perturbation) with control cell
        ``pair[r]`` as input. A condition gets, per cell type among its cells, ``controls`` distinct control
        cells of that type (all of them when ``None`` or when the pool is smaller), so several cell types are
        weighted by the controls drawn for each. The draw of a condition and cell type is seeded by
        ``controls_seed``, the condition's name and the cell type only: the same subset whatever the run
        seed, the split or the other conditions evaluated. ``ctrl`` has no rows.

        Parameters
        ----------
        data, conditions, pert_vocab, seed, n_de
            As for the class (``seed`` does not reach the evaluation rows).
        controls
            Control cells per condition and cell type (``eval.val_controls``, ``eval.test_controls``);
            ``None`` = the whole pool.
        controls_seed
            Seed of the subsets (``eval.controls_seed``).
        pool
            The control pool (:func:`draw_control_pool`) the controls are drawn from; ``None`` = every
            control cell.
        """
        self = cls(data, conditions, pert_vocab, seed=seed, n_de=n_de, pool=pool)
        ctrl = self.pool
        cells, pairs = [], []
        for c in sorted(set(conditions) - {keys.CONTROL}):
            own = data.cells_of([c])
            for t in np.unique(data.cell_type[own]):
                pool = ctrl[data.cell_type[ctrl] == t]
                if controls is not None and controls < len(pool):
                    rng = np.random.default_rng([controls_seed, int(t), len(c), *c.encode()])
                    pool = np.sort(rng.choice(pool, size=controls, replace=False))
                cells.append(np.full(len(pool), own[data.cell_type[own] == t][0]))
                pairs.append(pool)
        self.cells = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)
        self.pair = np.concatenate(pairs) if pairs else np.zeros(0, dtype=np.int64)
        self.pair_pool_idx = np.searchsorted(self.pool, self.pair)  # rows of the embedding cache
        return self

    def control_means(self) -> dict[str, np.ndarray]:
        """Mean of each condition's paired control cells: what a model that predicts no change averages to.

        Returns
        -------
        dict of str to np.ndarray
            Condition -> ``(N,)`` float64 mean of ``x`` over its rows' control cells; a condition paired with
            every control cell once gets :attr:`PerturbData.ctrl_mean` itself. Computed once (the pairing is
            fixed when the set is built).
        """
        if self._control_means is not None:
            return self._control_means
        d, out = self.data, {}
        cond = d.cell_condition[self.cells]
        every = np.sort(d.control_cells)
        for ci in np.unique(cond):
            pairs = self.pair[cond == ci]
            if len(pairs) == len(every) and np.array_equal(np.sort(pairs), every):
                out[d.conditions[ci]] = d.ctrl_mean
                continue
            total = np.zeros(len(d.genes))
            for start in range(0, len(pairs), _CHUNK):
                total += np.asarray(d.rows(pairs[start: start + _CHUNK]).astype(np.float64).sum(axis=0)).ravel()
            out[d.conditions[ci]] = total / len(pairs)
        self._control_means = out
        return out

    @property
    def _ctrl_id(self) -> int:
        return self.data.conditions.index(keys.CONTROL)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> int:
        return i

    def batch(self, items: Sequence[int]) -> Batch:
        """Collate positions ``items`` of this dataset into a :class:`~pertadapt.types.Batch`."""
        d = self.data
        items = np.asarray(items)
        cells, pairs = self.cells[items], self.pair[items]
        cond = d.cell_condition[cells]
        n = len(d.genes)
        is_ctrl = cond == self._ctrl_id
        de = np.zeros((len(cells), self.n_de), dtype=np.int64)
        nz = np.ones((len(cells), n), dtype=bool)
        for r, c in enumerate(cond):
            if not is_ctrl[r]:
                name = d.conditions[c]
                idx = d.de_idx[name]
                de[r, : len(idx)] = idx[: self.n_de]
                nz[r] = False
                nz[r, d.nz_idx[name]] = True
        return Batch(
            x_ctrl=torch.from_numpy(d.rows(pairs).toarray().astype(np.float32)),
            x_input=None if d.columns is None else torch.from_numpy(
                d.input_rows(pairs).toarray().astype(np.float32)),
            total_count=torch.from_numpy(d.total_count[pairs]),
            y=torch.from_numpy(d.rows(cells).toarray().astype(np.float32)),
            pert_idx=torch.from_numpy(self.cond_pert[cond]),
            pert_gene_pos=torch.from_numpy(self.cond_pos[cond]),
            cond_id=torch.from_numpy(cond),
            is_ctrl=torch.from_numpy(is_ctrl),
            de_idx=torch.from_numpy(de),
            nz_mask=torch.from_numpy(nz),
            ctrl_idx=torch.from_numpy(self.pair_pool_idx[items]),
        )
