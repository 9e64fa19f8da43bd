"""`pertadapt go ...`: build the GO gene graph + attention mask, and report GO coverage of a dataset.

Exit codes (as ``pertadapt.cli.main`` documents): 2 for configuration mistakes, i.e. bad options and
bad gene lists given with ``--genes`` / ``--vocab`` (missing, not text, duplicated or unknown
names); 1 for bad data, i.e. the ``.h5ad`` (missing, not HDF5, truncated, or its genes) and the GO
source files. Every failure is one message naming the file, without a traceback, and nothing is
written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from pertadapt.go import GOAnnotations

log = logging.getLogger("pertadapt.cli.go")

go_app = typer.Typer(help="Gene Ontology: gene graph, attention mask, coverage.", no_args_is_help=True)

# Options shared by both commands: where the GO annotations come from.
SourceOption = Annotated[str, typer.Option(
    "--source", help="GO source: bundled (offline, shipped), debian (apt-get download), obo (--obo + --gaf).")]
OboOption = Annotated[Path | None, typer.Option("--obo", help="OBO ontology file (source obo).")]
GafOption = Annotated[Path | None, typer.Option("--gaf", help="GAF annotation file (source obo).")]
PropagateOption = Annotated[bool, typer.Option("--propagate/--direct", help="Propagate annotations up is_a.")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(go_app, name="go")


def _pct(a: int, b: int) -> str:
    return f"{a:,} / {b:,} ({100.0 * a / max(b, 1):.1f}%)"


_CONFIG_ERROR = 2
_DATA_ERROR = 1


def _fail(message: str, code: int = _CONFIG_ERROR) -> typer.Exit:
    log.error(message)
    return typer.Exit(code=code)


@contextmanager
def _exit_on_go_error(code: int, origin: str | None = None) -> Iterator[None]:
    """Turn a ``GOError`` into one logged message (prefixed by ``origin`` unless it names it) and exit ``code``."""
    from pertadapt.go import GOError

    try:
        yield
    except GOError as e:
        message = str(e)
        if origin is not None and not message.startswith(origin):
            message = f"{origin}: {message}"
        raise _fail(message, code) from e


def _load(source: str, obo: Path | None, gaf: Path | None, propagate: bool) -> GOAnnotations:
    from pertadapt.go import load_annotations

    return load_annotations(source, obo=obo, gaf=gaf, propagate=propagate)


def _check_names(ann: GOAnnotations, genes: list[str], origin: str, allow_unknown: bool, code: int) -> None:
    from pertadapt.go import resolve_symbols, suggest

    res = resolve_symbols(ann, genes)
    bad = [*res.unknown, *res.ambiguous]
    if not bad:
        return
    lines = []
    for g in bad[:25]:
        hint = suggest(ann, g)
        lines.append(f"  {g}" + (f"  (did you mean: {', '.join(hint)}?)" if hint else ""))
    more = f"\n  … and {len(bad) - 25} more" if len(bad) > 25 else ""
    msg = (f"{origin}: {len(res.unknown)} unknown gene symbol(s) and {len(res.ambiguous)} ambiguous alias(es) "
           f"in the {ann.source} GO source:\n" + "\n".join(lines) + more)
    if not allow_unknown:
        raise _fail(msg + "\nFix the names, or pass --allow-unknown to give them no GO terms.", code)
    log.warning(msg)


@go_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", help="Output directory (gene_graph.* and go_mask.*)."),
    genes_file: Path | None = typer.Option(None, "--genes", help="Gene list, one symbol per line, in model order."),
    from_data: Path | None = typer.Option(None, "--from-data", help="Take the genes from an .h5ad's var."),
    source: SourceOption = "bundled",
    obo: OboOption = None,
    gaf: GafOption = None,
    propagate: PropagateOption = False,
    threshold: float = typer.Option(0.1, help="Jaccard threshold (exclusive) of graph and mask."),
    top_k: int = typer.Option(20, "--top-k", help="Graph neighbours per gene besides the self-loop."),
    mask_kind: str = typer.Option("go", "--mask-kind", help="go, random_degree_matched or none."),
    seed: int = typer.Option(0, help="Seed of random_degree_matched."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="Unknown symbols get no GO terms."),
) -> None:
    """Build the GEARS-style GO gene graph and the sparse GO attention mask for a gene list."""
    from rich.progress import Progress

    from pertadapt.go import (
        build_gene_graph,
        build_go_mask,
        build_graph_and_mask,
        check_build_options,
        check_source,
        read_gene_list,
        read_h5ad_genes,
        save_gene_graph,
        save_go_mask,
    )

    if (genes_file is None) == (from_data is None):
        raise _fail("give exactly one of --genes FILE or --from-data H5AD")
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out}: an existing file; expected a directory (created if missing)")
    with _exit_on_go_error(_CONFIG_ERROR):
        check_source(source, obo=obo, gaf=gaf)
        check_build_options(threshold, top_k, mask_kind)
    origin = str(genes_file or from_data)
    code = _CONFIG_ERROR if genes_file is not None else _DATA_ERROR
    with _exit_on_go_error(code, origin):
        genes = read_gene_list(genes_file) if genes_file is not None else read_h5ad_genes(from_data)[0]
    with _exit_on_go_error(_DATA_ERROR):
        ann = _load(source, obo, gaf, propagate)
    with _exit_on_go_error(code, origin):
        _check_names(ann, genes, origin, allow_unknown, code)
        with Progress(transient=True) as bar:
            task = bar.add_task("GO Jaccard blocks", total=len(genes))

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            if mask_kind == "go":
                graph, mask = build_graph_and_mask(ann, genes, graph_threshold=threshold, top_k=top_k,
                                                   mask_threshold=threshold, progress=tick)
            else:
                graph = build_gene_graph(ann, genes, threshold=threshold, top_k=top_k, progress=tick)
                mask = build_go_mask(ann, genes, threshold=threshold, kind=mask_kind, seed=seed, progress=tick)
    save_gene_graph(graph, out / "gene_graph")
    save_go_mask(mask, out / "go_mask")
    log.info("wrote %s: graph %d edges (sha256 %s…), mask %s density %.4f, mean degree %.1f (sha256 %s…)",
             out, graph.n_edges, graph.sha256[:12], mask.kind, mask.density, mask.mean_degree, mask.sha256[:12])


@go_app.command("coverage")
def coverage_cmd(
    h5ad: Path = typer.Argument(..., help="GEARS-layout .h5ad (var gene_name, obs condition)."),
    vocab: Path | None = typer.Option(None, "--vocab", help="Model vocabulary file (default: the data's genes)."),
    source: SourceOption = "bundled",
    obo: OboOption = None,
    gaf: GafOption = None,
    propagate: PropagateOption = False,
    threshold: float = typer.Option(0.1, help="Mask Jaccard threshold."),
) -> None:
    """Report how many vocabulary genes and perturbation targets have GO, and the mask density."""
    from rich.console import Console
    from rich.table import Table

    from pertadapt.go import check_build_options, check_source, coverage, read_gene_list, read_h5ad_genes

    with _exit_on_go_error(_CONFIG_ERROR):
        check_source(source, obo=obo, gaf=gaf)
        check_build_options(threshold)
    with _exit_on_go_error(_DATA_ERROR, str(h5ad)):
        genes, targets = read_h5ad_genes(h5ad)
    with _exit_on_go_error(_CONFIG_ERROR, str(vocab)):
        vocabulary = read_gene_list(vocab) if vocab is not None else genes
    with _exit_on_go_error(_DATA_ERROR):
        ann = _load(source, obo, gaf, propagate)
    with _exit_on_go_error(_CONFIG_ERROR if vocab is not None else _DATA_ERROR, str(vocab or h5ad)):
        rep = coverage(ann, vocabulary, targets, threshold=threshold)
    table = Table(title=f"GO coverage of {h5ad.name} ({rep['go_source']}, GO {rep['go_version'].get('go_release', '?')})")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("vocabulary genes with GO", _pct(rep["n_vocab_with_go"], rep["n_vocab"]))
    table.add_row("perturbation targets with GO", _pct(rep["n_targets_with_go"], rep["n_targets"]))
    table.add_row("mask density", f"{rep['mask_density']:.4f}")
    table.add_row("mask mean degree", f"{rep['mask_mean_degree']:.1f}")
    table.add_row("unknown vocabulary symbols", str(len(rep["vocab_unknown"])))
    table.add_row("targets not in vocabulary", ", ".join(rep["targets_not_in_vocab"]) or "-")
    table.add_row("targets without GO", ", ".join(rep["targets_without_go"]) or "-")
    Console().print(table)
