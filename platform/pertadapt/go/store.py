"""Save, load and cache GO masks and gene graphs (``.npz`` arrays + ``.json`` gene order and hash).

Writes are atomic (:func:`pertadapt.files.atomic_write`); the JSON is written last, so a pair whose
JSON exists is complete. Loading recomputes the sha256 and refuses a mismatch. The cache key is the
sha256 of (annotation content hash, gene list, the symbols the genes resolve to, parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pertadapt.files import atomic_write, atomic_write_json
from pertadapt.files import cache_dir as cache_root
from pertadapt.go.annotations import GOAnnotations, resolve_symbols
from pertadapt.go.errors import GOError
from pertadapt.go.similarity import GeneGraph, GOMask, build_gene_graph, build_go_mask

__all__ = ["cache_key", "cached_gene_graph", "cached_go_mask", "load_gene_graph", "load_go_mask",
           "save_gene_graph", "save_go_mask"]

_FORMAT = 1


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays)

    atomic_write(path, write)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


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
    if mask.csr is not None:
        _write_npz(npz, indptr=mask.csr.indptr.astype(np.int64), indices=mask.csr.indices.astype(np.int32))
    _write_json(js, {"format": _FORMAT, "type": "go_mask", "kind": mask.kind, "genes": list(mask.genes),
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
    _write_npz(npz, src=graph.src, dst=graph.dst, weight=graph.weight)
    _write_json(js, {"format": _FORMAT, "type": "gene_graph", "genes": list(graph.genes),
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
    """Cache key: sha256 of the annotation content, the ordered gene list, the symbols they resolve to
    (so a changed alias table or symbol mapping invalidates) and the parameters."""
    h = hashlib.sha256(ann.sha256().encode())
    h.update("\n".join(genes).encode())
    h.update("\n".join(s or "" for s in resolve_symbols(ann, genes).symbols).encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _built_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "go" / "built"


def cached_go_mask(ann: GOAnnotations, genes: Sequence[str], *, threshold: float = 0.1, kind: str = "go",
                   seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> GOMask:
    """:func:`build_go_mask`, cached by (annotations, gene list, parameters) under the cache dir.

    The seed is part of the key only for ``random_degree_matched``: the ``go`` and ``none`` masks do
    not depend on it, so every seed of a sweep shares one cached file.

    Returns
    -------
    GOMask
    """
    params: dict[str, object] = {"threshold": threshold, "kind": kind}
    if kind == "random_degree_matched":
        params["seed"] = seed
    stem = _built_dir(cache_dir) / f"mask-{cache_key(ann, genes, **params)}"
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
    stem = _built_dir(cache_dir) / f"graph-{cache_key(ann, genes, threshold=threshold, top_k=top_k)}"
    if _paths(stem)[1].is_file():
        return load_gene_graph(stem)
    graph = build_gene_graph(ann, genes, threshold=threshold, top_k=top_k)
    save_gene_graph(graph, stem)
    return graph
