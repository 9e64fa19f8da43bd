"""Save, load and cache GO masks and gene graphs (``.npz`` arrays + ``.json`` gene order and hash).

Writes are atomic (temporary file in the same directory, then :func:`os.replace`); the JSON is
written last, so a pair whose JSON exists is complete. Loading recomputes the sha256 and refuses a
mismatch. The cache key is the sha256 of (annotation content hash, gene list, parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pertadapt.go.annotations import GOAnnotations
from pertadapt.go.errors import GOError
from pertadapt.go.similarity import GeneGraph, GOMask, build_gene_graph, build_go_mask, build_graph_and_mask
from pertadapt.go.sources import default_cache_dir

__all__ = ["cache_key", "cached_gene_graph", "cached_go_mask", "cached_graph_and_mask", "load_gene_graph",
           "load_go_mask", "save_gene_graph",
           "save_go_mask"]

_FORMAT = 1


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _paths(stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    base = Path(stem)
    base = base.with_suffix("") if base.suffix in (".npz", ".json") else base
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def save_go_mask(mask: GOMask, stem: str | os.PathLike[str]) -> Path:
    """Write ``<stem>.npz`` (CSR indptr/indices, no values: all True) and ``<stem>.json``.

    Returns
    -------
    Path
        The JSON path.
    """
    npz, js = _paths(stem)
    npz.parent.mkdir(parents=True, exist_ok=True)
    if mask.csr is not None:
        _atomic_npz(npz, indptr=mask.csr.indptr.astype(np.int64), indices=mask.csr.indices.astype(np.int32))
    _atomic_json(js, {"format": _FORMAT, "type": "go_mask", "kind": mask.kind, "genes": list(mask.genes),
                      "sha256": mask.sha256, "density": mask.density, "mean_degree": mask.mean_degree,
                      "meta": dict(mask.meta)})
    return js


def load_go_mask(stem: str | os.PathLike[str]) -> GOMask:
    """Read a mask written by :func:`save_go_mask` and verify its sha256.

    Raises
    ------
    GOError
        Missing files, wrong type, or a hash mismatch (corrupt or edited file).
    """
    npz, js = _paths(stem)
    if not js.is_file():
        raise GOError(f"{js}: no such mask file")
    info = json.loads(js.read_text())
    if info.get("type") != "go_mask":
        raise GOError(f"{js}: not a GO mask (type={info.get('type')!r})")
    genes = tuple(info["genes"])
    csr = None
    if info["kind"] != "none":
        with np.load(npz) as z:
            indptr, indices = z["indptr"], z["indices"]
        csr = sp.csr_matrix((np.ones(indices.size, dtype=bool), indices, indptr), shape=(len(genes), len(genes)))
    mask = GOMask(genes, csr, info["kind"], info.get("meta", {}))
    if mask.sha256 != info["sha256"]:
        raise GOError(f"{npz}: sha256 {mask.sha256} does not match {info['sha256']} recorded in {js}")
    return mask


def save_gene_graph(graph: GeneGraph, stem: str | os.PathLike[str]) -> Path:
    """Write ``<stem>.npz`` (src, dst, weight) and ``<stem>.json`` (genes, sha256, meta).

    Returns
    -------
    Path
        The JSON path.
    """
    npz, js = _paths(stem)
    npz.parent.mkdir(parents=True, exist_ok=True)
    _atomic_npz(npz, src=graph.src, dst=graph.dst, weight=graph.weight)
    _atomic_json(js, {"format": _FORMAT, "type": "gene_graph", "genes": list(graph.genes),
                      "sha256": graph.sha256, "n_edges": graph.n_edges, "meta": dict(graph.meta)})
    return js


def load_gene_graph(stem: str | os.PathLike[str]) -> GeneGraph:
    """Read a graph written by :func:`save_gene_graph` and verify its sha256.

    Raises
    ------
    GOError
        Missing files, wrong type, or a hash mismatch.
    """
    npz, js = _paths(stem)
    if not js.is_file():
        raise GOError(f"{js}: no such graph file")
    info = json.loads(js.read_text())
    if info.get("type") != "gene_graph":
        raise GOError(f"{js}: not a gene graph (type={info.get('type')!r})")
    with np.load(npz) as z:
        graph = GeneGraph(tuple(info["genes"]), z["src"], z["dst"], z["weight"], info.get("meta", {}))
    if graph.sha256 != info["sha256"]:
        raise GOError(f"{npz}: sha256 {graph.sha256} does not match {info['sha256']} recorded in {js}")
    return graph


def cache_key(ann: GOAnnotations, genes: Sequence[str], **params: object) -> str:
    """Cache key: sha256 of the annotation content, the ordered gene list and the parameters."""
    h = hashlib.sha256(ann.sha256().encode())
    h.update("\n".join(genes).encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "go" / "built"


def cached_go_mask(ann: GOAnnotations, genes: Sequence[str], *, threshold: float = 0.1, kind: str = "go",
                   seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> GOMask:
    """:func:`build_go_mask`, cached by (annotations, gene list, parameters) under the cache dir.

    Returns
    -------
    GOMask
    """
    stem = _cache_root(cache_dir) / f"mask-{cache_key(ann, genes, threshold=threshold, kind=kind, seed=seed)}"
    if _paths(stem)[1].is_file():
        return load_go_mask(stem)
    mask = build_go_mask(ann, genes, threshold=threshold, kind=kind, seed=seed)
    save_go_mask(mask, stem)
    return mask


def cached_gene_graph(ann: GOAnnotations, genes: Sequence[str], *, threshold: float = 0.1, top_k: int = 20,
                      cache_dir: str | os.PathLike[str] | None = None) -> GeneGraph:
    """:func:`build_gene_graph`, cached by (annotations, gene list, parameters) under the cache dir.

    Returns
    -------
    GeneGraph
    """
    stem = _cache_root(cache_dir) / f"graph-{cache_key(ann, genes, threshold=threshold, top_k=top_k)}"
    if _paths(stem)[1].is_file():
        return load_gene_graph(stem)
    graph = build_gene_graph(ann, genes, threshold=threshold, top_k=top_k)
    save_gene_graph(graph, stem)
    return graph


def cached_graph_and_mask(ann: GOAnnotations, genes: Sequence[str], *, graph_threshold: float = 0.1,
                          top_k: int = 20, mask_threshold: float = 0.1,
                          cache_dir: str | os.PathLike[str] | None = None) -> tuple[GeneGraph, GOMask]:
    """:func:`build_graph_and_mask` (one pass) with both results stored in the same cache slots.

    Returns
    -------
    tuple
        ``(GeneGraph, GOMask)``; the ``go`` mask is shared with :func:`cached_go_mask` (seed 0).
    """
    g_stem = _cache_root(cache_dir) / f"graph-{cache_key(ann, genes, threshold=graph_threshold, top_k=top_k)}"
    m_stem = _cache_root(cache_dir) / f"mask-{cache_key(ann, genes, threshold=mask_threshold, kind='go', seed=0)}"
    if _paths(g_stem)[1].is_file() and _paths(m_stem)[1].is_file():
        return load_gene_graph(g_stem), load_go_mask(m_stem)
    graph, mask = build_graph_and_mask(ann, genes, graph_threshold=graph_threshold, top_k=top_k,
                                       mask_threshold=mask_threshold)
    save_gene_graph(graph, g_stem)
    save_go_mask(mask, m_stem)
    return graph, mask
