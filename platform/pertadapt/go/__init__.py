"""Gene Ontology layer: real GO annotations, the GEARS-style gene graph and the sparse attention mask.

Sources: the bundled human table (default, offline), Debian's Bioconductor GO packages
(``apt-get download``), or any OBO + GAF through goatools. Names are imported lazily so that
``import pertadapt.go`` stays light (numpy/scipy/goatools load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pertadapt.go.annotations import (
        GOAnnotations,
        SymbolResolution,
        load_annotations,
        resolve_symbols,
        suggest,
    )
    from pertadapt.go.bench import run_go_benchmark
    from pertadapt.go.errors import GeneListError, GOError, GOFormatError, GOSourceUnavailable
    from pertadapt.go.similarity import (
        GeneGraph,
        GOMask,
        build_gene_graph,
        build_go_mask,
        build_graph_and_mask,
        jaccard_matrix,
    )
    from pertadapt.go.sources import export_bundled_table, fetch_debian
    from pertadapt.go.stats import coverage, read_gene_list, read_h5ad_genes
    from pertadapt.go.store import (
        cached_gene_graph,
        cached_go_mask,
        cached_graph_and_mask,
        load_gene_graph,
        load_go_mask,
        save_gene_graph,
        save_go_mask,
    )

_WHERE = {
    "GOAnnotations": "annotations", "SymbolResolution": "annotations", "load_annotations": "annotations",
    "resolve_symbols": "annotations", "suggest": "annotations",
    "run_go_benchmark": "bench",
    "coverage": "stats", "read_gene_list": "stats", "read_h5ad_genes": "stats",
    "GOError": "errors", "GOFormatError": "errors", "GOSourceUnavailable": "errors", "GeneListError": "errors",
    "GOMask": "similarity", "GeneGraph": "similarity", "build_gene_graph": "similarity",
    "build_go_mask": "similarity", "build_graph_and_mask": "similarity", "jaccard_matrix": "similarity",
    "export_bundled_table": "sources", "fetch_debian": "sources",
    "cached_gene_graph": "store", "cached_go_mask": "store", "cached_graph_and_mask": "store",
    "load_gene_graph": "store", "load_go_mask": "store", "save_gene_graph": "store", "save_go_mask": "store",
}

__all__ = [
    "GOAnnotations",
    "GOError",
    "GOFormatError",
    "GOMask",
    "GOSourceUnavailable",
    "GeneGraph",
    "GeneListError",
    "SymbolResolution",
    "build_gene_graph",
    "build_go_mask",
    "build_graph_and_mask",
    "cached_gene_graph",
    "cached_go_mask",
    "cached_graph_and_mask",
    "coverage",
    "export_bundled_table",
    "fetch_debian",
    "jaccard_matrix",
    "load_annotations",
    "load_gene_graph",
    "load_go_mask",
    "read_gene_list",
    "read_h5ad_genes",
    "resolve_symbols",
    "run_go_benchmark",
    "save_gene_graph",
    "save_go_mask",
    "suggest",
]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pertadapt.go' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pertadapt.go.{module}"), name)
