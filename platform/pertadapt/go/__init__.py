"""Gene Ontology layer: real GO annotations, the GEARS-style gene graph and the sparse attention mask.

Sources: the bundled human table (default, offline), Debian's Bioconductor GO packages
(``apt-get download``), or any OBO + GAF through goatools (imported only for that source).
"""

from __future__ import annotations

from pertadapt.go.annotations import (
    GOAnnotations,
    SymbolResolution,
    check_source,
    load_annotations,
    resolve_symbols,
    suggest,
)
from pertadapt.go.errors import GeneListError, GOError, GOFormatError, GOOptionError, GOSourceUnavailable
from pertadapt.go.similarity import (
    GeneGraph,
    GOMask,
    build_gene_graph,
    build_go_mask,
    build_graph_and_mask,
    check_build_options,
    has_go,
    jaccard_matrix,
    perturbation_vocabulary,
)
from pertadapt.go.sources import export_bundled_table, fetch_debian
from pertadapt.go.stats import coverage, read_gene_list, read_h5ad_genes
from pertadapt.go.store import (
    cached_gene_graph,
    cached_go_mask,
    load_gene_graph,
    load_go_mask,
    save_gene_graph,
    save_go_mask,
)

__all__ = [
    "GOAnnotations",
    "GOError",
    "GOFormatError",
    "GOMask",
    "GOOptionError",
    "GOSourceUnavailable",
    "GeneGraph",
    "GeneListError",
    "SymbolResolution",
    "build_gene_graph",
    "build_go_mask",
    "build_graph_and_mask",
    "cached_gene_graph",
    "cached_go_mask",
    "check_build_options",
    "check_source",
    "coverage",
    "export_bundled_table",
    "fetch_debian",
    "has_go",
    "jaccard_matrix",
    "load_annotations",
    "load_gene_graph",
    "load_go_mask",
    "perturbation_vocabulary",
    "read_gene_list",
    "read_h5ad_genes",
    "resolve_symbols",
    "save_gene_graph",
    "save_go_mask",
    "suggest",
]
