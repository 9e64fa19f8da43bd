"""``pertadapt bench go``: GO graph + mask for the full 19,264-gene foundation-model vocabulary."""

from __future__ import annotations

import difflib
import logging
import time

from pertadapt.bench.measure import cpu_seconds, peak_rss_mib
from pertadapt.files import fm_gene_vocabulary
from pertadapt.go.annotations import load_annotations, resolve_symbols, suggest
from pertadapt.go.similarity import build_graph_and_mask

__all__ = ["fm_genes", "run_go_benchmark"]

log = logging.getLogger(__name__)

#: scFoundation / AIDO.Cell input vocabulary (package data), one symbol per line in model order.


def fm_genes(n_genes: int | None = None) -> list[str]:
    """The first ``n_genes`` symbols of the FM vocabulary in model order (default, or 0: all 19,264)."""
    return list(fm_gene_vocabulary()[:n_genes or None])


def run_go_benchmark(n_genes: int | None = None, *, threshold: float = 0.1, top_k: int = 20) -> dict:
    """Time the GEARS graph + GO mask build from the bundled table (one blocked sparse pass), and the
    "did you mean" suggestions ``pertadapt go build`` prints for the unknown and ambiguous names.

    Parameters
    ----------
    n_genes
        Use the first ``n_genes`` genes of the vocabulary (default: all 19,264).
    threshold
        Jaccard threshold of both structures.
    top_k
        Graph neighbours per gene.

    Returns
    -------
    dict
        ``n_genes``, ``n_genes_with_go``, ``n_unknown``, ``n_ambiguous`` (names without a symbol),
        ``load_s`` (annotation load + symbol resolution), ``suggest_s`` ("did you mean" suggestions
        for every unknown or ambiguous name, as ``go build`` prints them, including the one-time
        sorted symbol list), ``n_spelling_probes``, ``spelling_ms_per_name`` and
        ``spelling_difflib_ms_per_name`` (a spelling suggestion for the unknown names plus
        misspelled vocabulary names, by :func:`suggest` and by the naive path it replaced,
        ``difflib.get_close_matches`` over every symbol, in the same run), ``spelling_speedup``,
        ``build_s`` (graph + mask), ``total_s`` (load, resolution, suggestions and build), ``cpu_s``
        (user + system CPU of all of it: robust to a busy machine),
        ``peak_rss_mb`` (process peak, ``getrusage``), ``mask_density``,
        ``mask_mean_degree``, ``mask_min_degree``, ``mask_max_degree``, ``graph_edges``,
        ``graph_mean_in_degree``, ``go_release``; targets: total <= 15 s and <= 1.5 GB on 2 cores.
    """
    genes = fm_genes(n_genes)
    c0, t0 = cpu_seconds(), time.perf_counter()
    ann = load_annotations("bundled")
    res = resolve_symbols(ann, genes)
    t1 = time.perf_counter()
    for name in (*res.unknown, *res.ambiguous):
        suggest(ann, name)
    t2 = time.perf_counter()
    graph, mask = build_graph_and_mask(ann, genes, graph_threshold=threshold, top_k=top_k, mask_threshold=threshold)
    t3 = time.perf_counter()
    cpu = cpu_seconds() - c0
    # Spelling suggestions against the naive path, same names, same run: the unknown names plus
    # misspellings of every 400th vocabulary name (last letter replaced), all needing the fuzzy step.
    probes = [*res.unknown, *(g[:-1] + "Q" for g in genes[::400])]
    t4 = time.perf_counter()
    for name in probes:
        suggest(ann, name)
    t5 = time.perf_counter()
    for name in probes:  # what each unknown name cost before: difflib over every symbol
        difflib.get_close_matches(name.upper(), ann.sorted_symbols, n=3, cutoff=0.85)
    t6 = time.perf_counter()
    deg = mask.degrees()
    out = {
        "n_genes": len(genes),
        "n_genes_with_go": sum(1 for s in res.symbols if s in ann.gene2terms),
        "n_unknown": len(res.unknown),
        "n_ambiguous": len(res.ambiguous),
        "load_s": round(t1 - t0, 3),
        "suggest_s": round(t2 - t1, 4),
        "n_spelling_probes": len(probes),
        "spelling_ms_per_name": round(1000 * (t5 - t4) / len(probes), 2),
        "spelling_difflib_ms_per_name": round(1000 * (t6 - t5) / len(probes), 2),
        "spelling_speedup": round((t6 - t5) / max(t5 - t4, 1e-9), 1),
        "build_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(peak_rss_mib(), 1),
        "mask_density": mask.density,
        "mask_mean_degree": mask.mean_degree,
        "mask_min_degree": int(deg.min()),
        "mask_max_degree": int(deg.max()),
        "graph_edges": graph.n_edges,
        "graph_mean_in_degree": graph.n_edges / len(genes),
        "go_release": ann.version.get("go_release", "?"),
        "targets": {"total_s": 15.0, "peak_rss_mb": 1536.0},
    }
    log.info("GO benchmark: %s", out)
    return out
