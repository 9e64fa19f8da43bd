"""`pertadapt data` commands: ``prepare``, ``validate``, ``split`` (registered by :mod:`pertadapt.cli.main`).

Bad input exits with code 1 and a one-line message naming the file, key, condition or gene; output
files are written atomically, so a failed command leaves none behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)

data_app = typer.Typer(help="Read, preprocess, validate and split Perturb-seq AnnData.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@data_app.command("prepare")
def prepare(
    in_path: Path = typer.Argument(..., metavar="IN", help="Raw-counts .h5ad (counts in X or layers['counts'])."),
    out: Path = typer.Option(..., "--out", help="Output .h5ad in the GEARS/PertAdapt processed layout."),
    vocab: Path | None = typer.Option(None, "--vocab", help="Gene vocabulary, one symbol per line."),
    min_genes: int = typer.Option(200, "--min-genes", help="Drop cells with fewer detected genes."),
    target_sum: float | None = typer.Option(None, "--target-sum",
                                            help="normalize_total target (default: median library size)."),
    n_de: int = typer.Option(20, "--n-de", help="Length of the top_non_*_de_20 lists."),
    cell_type: str = typer.Option("K562", "--cell-type", help="Cell type when obs['cell_type'] is absent."),
    perturbation_column: str | None = typer.Option(
        None, "--perturbation-column", help="Raw layout: obs column with perturbation labels (e.g. gene)."),
    control_label: list[str] = typer.Option(["non-targeting"], "--control-label",
                                            help="Raw layout: control label (repeatable)."),
    delimiter: str = typer.Option("_", "--delimiter", help="Raw layout: separator of combined genes."),
) -> None:
    """Preprocess raw counts: align genes, filter cells, normalise, log1p, GEARS DE keys."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pertadapt.data.conditions import ConditionError
    from pertadapt.data.io import DataError, read_counts, write_h5ad_atomic
    from pertadapt.data.prepare import PREPARE_STEPS, prepare_adata

    vocabulary = None
    if vocab is not None:
        if not vocab.is_file():
            raise _fail(f"--vocab {vocab}: no such file")
        vocabulary = [line.strip() for line in vocab.read_text().splitlines() if line.strip()]
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("read", total=len(PREPARE_STEPS) + 2)

        def on_step(name: str) -> None:
            progress.update(task, description=name, advance=1)

        try:
            adata = read_counts(in_path, perturbation_column=perturbation_column, control_labels=control_label,
                                delimiter=delimiter)
            result = prepare_adata(adata, vocabulary=vocabulary, min_genes=min_genes, target_sum=target_sum,
                                   n_de=n_de, cell_type_default=cell_type, on_step=on_step)
        except DataError as e:
            raise _fail(str(e)) from e
        except ConditionError as e:
            raise _fail(f"{in_path}: {e}") from e
        del adata
        progress.update(task, description="write", advance=1)
        write_h5ad_atomic(result, out)
        progress.update(task, advance=1)
    log.info("wrote %s (%d cells x %d genes)", out, result.n_obs, result.n_vars)


@data_app.command("validate")
def validate(
    file: Path = typer.Argument(..., metavar="FILE", help=".h5ad to check."),
    expect: str | None = typer.Option(None, "--expect", help="What X must hold: counts or log1p."),
    min_cells: int = typer.Option(2, "--min-cells", help="Conditions with fewer cells are errors."),
) -> None:
    """Summarise a file and list every problem; exit 1 if there is an error."""
    from rich.console import Console
    from rich.table import Table

    from pertadapt.data.io import DataError
    from pertadapt.data.validate import EXPECT, validate_file

    if expect is not None and expect not in EXPECT:
        raise _fail(f"--expect {expect!r} is not one of {', '.join(EXPECT)}")
    try:
        report = validate_file(file, expect=expect, min_cells_per_condition=min_cells)
    except DataError as e:
        raise _fail(str(e)) from e
    table = Table(title=str(file), show_header=False)
    for key, value in report.summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("errors", str(len(report.errors)))
    table.add_row("warnings", str(len(report.warnings)))
    Console().print(table)
    for problem in report.problems:
        typer.echo(str(problem), err=problem.severity == "error")
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("split")
def split(
    data: Path = typer.Argument(..., metavar="DATA", help=".h5ad with obs['condition']."),
    kind: str = typer.Option("simulation", "--kind", help="simulation or single (as in GEARS)."),
    seed: int = typer.Option(..., "--seed", help="Split seed (GEARS seed)."),
    train_gene_frac: float = typer.Option(0.75, "--train-gene-frac", help="simulation: train gene fraction."),
    combo_seen2_train_frac: float = typer.Option(0.75, "--combo-seen2-train-frac",
                                                 help="simulation: fraction of both-seen doubles in train."),
    test_frac: float = typer.Option(0.1, "--test-frac", help="single: test gene draw fraction."),
    out: Path = typer.Option(..., "--out", help="Output SPLIT.json."),
) -> None:
    """Split conditions into train/val/test exactly as GEARS does and write SPLIT.json."""
    from pertadapt.data.conditions import ConditionError
    from pertadapt.data.io import DataError, read_conditions
    from pertadapt.data.splits import SplitError, split_conditions
    from pertadapt.files import sha256_file

    if not data.is_file():
        raise _fail(f"{data}: no such file")
    try:
        conditions = read_conditions(data)
        result = split_conditions(conditions, kind, seed=seed, train_gene_frac=train_gene_frac,
                                  combo_seen2_train_frac=combo_seen2_train_frac, test_frac=test_frac)
    except (DataError, SplitError, ConditionError, OSError) as e:
        raise _fail(f"{data}: {e}") from e
    result.to_json(out, sha256_file(data))
    typer.echo(f"{kind} split, seed {seed}: {len(result.train)} train, {len(result.val)} val, "
               f"{len(result.test)} test conditions -> {out}")


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the root app."""
    app.add_typer(data_app, name="data")
