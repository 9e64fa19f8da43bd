"""Save, load and cache GO masks and gene graphs (``.npz`` arrays + ``.json`` gene order and hash).

Writes are atomic (:func:`pertadapt.files.atomic_write`); the JSON is written last, so a pair whose
JSON exists is complete. Loading recomputes the sha256 and refuses a mismatch. The cache key is the
sha256 of (annotation content hash, gene list, the symbols the genes resolve to, parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
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


def _save(stem: str | os.PathLike[str], info: dict, arrays: dict[str, np.ndarray] | None) -> Path:
    npz, js = _paths(stem)
    if arrays is not None:
        _write_npz(npz, **arrays)
    _write_json(js, {"format": _FORMAT, **info})  # last: a JSON file marks a complete pair
    return js


def _open(stem: str | os.PathLike[str], kind: str, what: str) -> tuple[Path, Path, dict]:
    """``(npz path, json path, json content)`` of a stored pair, checked to be of type ``kind``."""
    npz, js = _paths(stem)
    if not js.is_file():
        raise GOError(f"{js}: no such {what} file")
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GOError(f"{js}: not a {what} JSON file ({e})") from e
    if not isinstance(info, dict) or info.get("type") != kind:
        raise GOError(f"{js}: not a {what} (type={info.get('type') if isinstance(info, dict) else None!r})")
    return npz, js, info


def _arrays(npz: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(npz) as z:  # allow_pickle stays False
            return {k: z[k] for k in names}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GOError(f"{npz}: missing or unreadable arrays {', '.join(names)} ({e})") from e


def _verified(obj: GOMask | GeneGraph, npz: Path, js: Path, info: dict) -> None:
    if obj.sha256 != info.get("sha256"):
        raise GOError(f"{npz}: sha256 {obj.sha256} does not match {info.get('sha256')} recorded in {js}")


def save_go_mask(mask: GOMask, stem: str | os.PathLike[str]) -> Path:
    """Write ``<stem>.npz`` (CSR indptr/indices, no values: all True) and ``<stem>.json``.

    Returns
    -------
    Path
        The JSON path.
    """
    arrays = None if mask.csr is None else {"indptr": mask.csr.indptr.astype(np.int64),
                                            "indices": mask.csr.indices.astype(np.int32)}
    return _save(stem, {"type": "go_mask", "kind": mask.kind, "genes": list(mask.genes), "sha256": mask.sha256,
                        "density": mask.density, "mean_degree": mask.mean_degree, "meta": dict(mask.meta)}, arrays)


def load_go_mask(stem: str | os.PathLike[str]) -> GOMask:
    """Read a mask written by :func:`save_go_mask` and verify its sha256.

    Raises
    ------
    GOError
        Missing or unreadable files, wrong type, or a hash mismatch (corrupt or edited file).
    """
    npz, js, info = _open(stem, "go_mask", "GO mask")
    genes = tuple(info["genes"])
    csr = None
    if info["kind"] != "none":
        z = _arrays(npz, ("indptr", "indices"))
        csr = sp.csr_matrix((np.ones(z["indices"].size, dtype=bool), z["indices"], z["indptr"]),
                            shape=(len(genes), len(genes)))
    mask = GOMask(genes, csr, info["kind"], info.get("meta", {}))
    _verified(mask, npz, js, info)
    return mask


def save_gene_graph(graph: GeneGraph, stem: str | os.PathLike[str]) -> Path:
    """Write ``<stem>.npz`` (src, dst, weight) and ``<stem>.json`` (genes, sha256, meta).

    Returns
    -------
    Path
        The JSON path.
    """
    return _save(stem, {"type": "gene_graph", "genes": list(graph.genes), "sha256": graph.sha256,
                        "n_edges": graph.n_edges, "meta": dict(graph.meta)},
                 {"src": graph.src, "dst": graph.dst, "weight": graph.weight})


def load_gene_graph(stem: str | os.PathLike[str]) -> GeneGraph:
    """Read a graph written by :func:`save_gene_graph` and verify its sha256.

    Raises
    ------
    GOError
        Missing or unreadable files, wrong type, or a hash mismatch.
    """
    npz, js, info = _open(stem, "gene_graph", "gene graph")
    z = _arrays(npz, ("src", "dst", "weight"))
    graph = GeneGraph(tuple(info["genes"]), z["src"], z["dst"], z["weight"], info.get("meta", {}))
    _verified(graph, npz, js, info)
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
