"""GO coverage of a gene vocabulary and of perturbation targets; gene tables from files and h5ad."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pertadapt.go.annotations import GOAnnotations, resolve_symbols
from pertadapt.go.errors import GeneListError, GOError
from pertadapt.go.similarity import GOMask, build_go_mask

__all__ = ["coverage", "read_gene_list", "read_h5ad_genes"]

_CONTROL = "ctrl"


def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """Read one gene name per line (blank lines and ``#`` comments skipped; first column if tabbed).

    Raises
    ------
    GeneListError
        The file is missing, not UTF-8 text, or empty; duplicates are checked by the builders.
    """
    p = Path(path)
    if not p.is_file():
        raise GeneListError(f"{p}: no such gene list file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GeneListError(f"{p}: not a UTF-8 text gene list (undecodable byte at offset {e.start})") from e
    genes = [line.split("\t")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not genes:
        raise GeneListError(f"{p}: the gene list is empty")
    return genes


def read_h5ad_genes(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Genes and perturbation targets of a GEARS-layout ``.h5ad`` (X is not loaded).

    Parameters
    ----------
    path
        AnnData file with ``var['gene_name']`` (or var names) and ``obs['condition']`` entries like
        ``A+ctrl`` / ``A+B`` / ``ctrl``.

    Returns
    -------
    tuple
        ``(genes, targets)``: var genes in order, shape (G,); sorted unique target genes (``ctrl``
        excluded; empty when there is no ``condition`` column).

    Raises
    ------
    GOError
        The file is missing, not HDF5, truncated, or not an AnnData file (a data error naming it).
    """
    import anndata

    p = Path(path)
    if not p.is_file():
        raise GOError(f"{p}: no such h5ad file")
    try:
        adata = anndata.read_h5ad(p, backed="r")
    except (OSError, KeyError, ValueError, TypeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GOError(f"{p}: not a readable .h5ad (AnnData HDF5) file: {detail}") from e
    try:
        var = adata.var
        genes = [str(g) for g in (var["gene_name"] if "gene_name" in var.columns else adata.var_names)]
        targets: set[str] = set()
        if "condition" in adata.obs.columns:
            for cond in adata.obs["condition"].astype(str).unique():
                targets.update(g for g in cond.split("+") if g and g != _CONTROL)
    finally:
        adata.file.close()
    return genes, sorted(targets)


def coverage(ann: GOAnnotations, vocabulary_genes: Sequence[str], perturbation_targets: Sequence[str], *,
             threshold: float = 0.1, mask: GOMask | None = None) -> dict:
    """How much of a vocabulary and of the perturbation targets GO covers, plus mask statistics.

    Parameters
    ----------
    ann
        Annotation table.
    vocabulary_genes
        Model gene vocabulary, shape (N,), unique.
    perturbation_targets
        Perturbed genes, shape (P,), unique.
    threshold
        Mask threshold (used when ``mask`` is not given).
    mask
        A prebuilt mask over ``vocabulary_genes``; built when ``None``.

    Returns
    -------
    dict
        ``n_vocab``, ``n_vocab_with_go``, ``vocab_unknown`` (names), ``vocab_ambiguous``,
        ``n_targets``, ``n_targets_with_go``, ``targets_without_go`` (sorted), ``targets_not_in_vocab``,
        ``mask_density``, ``mask_mean_degree``, ``go_source``, ``go_version``.
    """
    if mask is None:
        mask = build_go_mask(ann, vocabulary_genes, threshold=threshold)
    elif mask.genes != tuple(vocabulary_genes):
        raise GeneListError("the mask's gene order differs from vocabulary_genes")
    vocab = resolve_symbols(ann, vocabulary_genes)
    targ = resolve_symbols(ann, perturbation_targets)
    vocab_go = [s is not None and s in ann.gene2terms for s in vocab.symbols]
    targ_go = {g: s is not None and s in ann.gene2terms for g, s in zip(targ.genes, targ.symbols, strict=True)}
    in_vocab = set(vocabulary_genes)
    return {
        "n_vocab": len(vocabulary_genes),
        "n_vocab_with_go": int(sum(vocab_go)),
        "vocab_unknown": list(vocab.unknown),
        "vocab_ambiguous": sorted(vocab.ambiguous),
        "n_targets": len(perturbation_targets),
        "n_targets_with_go": int(sum(targ_go.values())),
        "targets_without_go": sorted(g for g, ok in targ_go.items() if not ok),
        "targets_not_in_vocab": sorted(g for g in perturbation_targets if g not in in_vocab),
        "mask_density": mask.density,
        "mask_mean_degree": mask.mean_degree,
        "go_source": ann.source,
        "go_version": dict(ann.version),
    }
