"""`pertadapt data` commands: ``prepare``, ``validate``, ``split`` (registered by :mod:`pertadapt.cli.main`).

Every failure is one line naming the file, key, condition, gene or option, without a traceback.
Exit codes (as :func:`pertadapt.cli.main.main` documents): 2 for a bad option or gene list (a value
outside its range, an ``--out`` that is a directory, a ``--vocab`` that is missing, not UTF-8 text,
empty or duplicated), checked before any data is read; 1 for bad data (a file that is missing, a
directory, not HDF5, truncated, or whose content breaks the data contract). Output files are
written atomically, so a failed command leaves none behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import typer

log = logging.getLogger(__name__)

data_app = typer.Typer(help="Read, preprocess, validate and split Perturb-seq AnnData.", no_args_is_help=True)

#: Exit code of bad data.
DATA_ERROR = 1
#: Exit code of a bad option (a configuration mistake).
OPTION_ERROR = 2


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: {message}`` on one stderr line and return the ``typer.Exit`` to raise with ``code``."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def exit_on_error(origin: str | None = None, options: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turn the data layer's errors into one ``error:`` line and an exit code.

    Parameters
    ----------
    origin
        The input file; a data error's message is prefixed with it unless it already names it.
    options
        Parameter name -> option text shown for a :class:`~pertadapt.data.io.ParamError` (default
        ``--`` + the name with dashes, e.g. ``target_sum`` -> ``--target-sum``).

    Raises
    ------
    typer.Exit
        Code :data:`OPTION_ERROR` for a ``ParamError``, :data:`DATA_ERROR` for a ``DataError``,
        ``ConditionError`` or ``SplitError``.
    """
    from pertadapt.data.conditions import ConditionError
    from pertadapt.data.io import DataError, ParamError
    from pertadapt.data.splits import SplitError

    try:
        yield
    except ParamError as e:
        flag = (options or {}).get(e.name, "--" + e.name.replace("_", "-"))
        raise fail(f"{flag}: {e.problem}", OPTION_ERROR) from e
    except (DataError, ConditionError, SplitError) as e:
        message = str(e)
        if origin is not None and not message.startswith(origin):
            message = f"{origin}: {message}"
        raise fail(message, DATA_ERROR) from e


@data_app.command("prepare")
def prepare(
    in_path: Path = typer.Argument(..., metavar="IN", help="Raw-counts .h5ad (counts in X or layers['counts'])."),
    out: Path = typer.Option(..., "--out", help="Output .h5ad in the GEARS/PertAdapt processed layout."),
    vocab: Path | None = typer.Option(
        None, "--vocab", help="Gene vocabulary: one symbol per line (# comments skipped); its genes absent from "
        "the data are zero-filled and flagged var['measured']=False."),
    min_genes: int = typer.Option(200, "--min-genes", help="Drop cells with fewer detected genes (>= 0)."),
    target_sum: float | None = typer.Option(None, "--target-sum",
                                            help="normalize_total target, > 0 (default: median library size)."),
    n_de: int = typer.Option(20, "--n-de", help="Length of the top_non_*_de_20 lists (>= 1)."),
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

    from pertadapt.data.io import check_output_path, check_raw_params, read_counts, write_h5ad_atomic
    from pertadapt.data.prepare import PREPARE_STEPS, check_prepare_params, prepare_adata
    from pertadapt.go import GeneListError, read_gene_list

    vocabulary = None
    if vocab is not None:
        try:
            vocabulary = read_gene_list(vocab)
        except GeneListError as e:
            raise fail(f"--vocab: {e}", OPTION_ERROR) from e
    options = {"vocabulary": f"--vocab {vocab}", "cell_type_default": "--cell-type",
               "control_labels": "--control-label"}
    with exit_on_error(str(in_path), options):
        check_output_path(out)
        check_prepare_params(vocabulary=vocabulary, min_genes=min_genes, target_sum=target_sum, n_de=n_de,
                             cell_type_default=cell_type)
        if perturbation_column is not None:
            check_raw_params(control_labels=control_label, delimiter=delimiter)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("read", total=len(PREPARE_STEPS) + 2)

        def on_step(name: str) -> None:
            progress.update(task, description=name, advance=1)

        with exit_on_error(str(in_path), options):
            adata = read_counts(in_path, perturbation_column=perturbation_column, control_labels=control_label,
                                delimiter=delimiter)
            result = prepare_adata(adata, vocabulary=vocabulary, min_genes=min_genes, target_sum=target_sum,
                                   n_de=n_de, cell_type_default=cell_type, on_step=on_step)
        del adata
        progress.update(task, description="write", advance=1)
        with exit_on_error():
            write_h5ad_atomic(result, out)
        progress.update(task, advance=1)
    log.info("wrote %s (%d cells x %d genes)", out, result.n_obs, result.n_vars)


@data_app.command("validate")
def validate(
    file: Path = typer.Argument(..., metavar="FILE", help=".h5ad to check."),
    expect: str | None = typer.Option(None, "--expect", help="What X must hold: counts or log1p."),
    min_cells: int = typer.Option(2, "--min-cells", help="Conditions with fewer cells are errors (>= 1)."),
) -> None:
    """Summarise a file and list every problem; exit 1 if there is an error."""
    from rich.console import Console
    from rich.table import Table

    from pertadapt.data.validate import validate_file

    with exit_on_error(str(file), {"min_cells_per_condition": "--min-cells"}):
        report = validate_file(file, expect=expect, min_cells_per_condition=min_cells)
    table = Table(title=str(file), show_header=False)
    for key, value in report.summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("errors", str(len(report.errors)))
    table.add_row("warnings", str(len(report.warnings)))
    Console().print(table)
    for problem in report.problems:
        typer.echo(str(problem), err=problem.severity == "error")
    if not report.ok:
        raise typer.Exit(DATA_ERROR)


@data_app.command("split")
def split(
    data: Path = typer.Argument(..., metavar="DATA", help=".h5ad with obs['condition']."),
    kind: str = typer.Option("simulation", "--kind", help="simulation or single (as in GEARS)."),
    seed: int = typer.Option(..., "--seed", help="Split seed (GEARS seed, 0 .. 2**32 - 1)."),
    train_gene_frac: float = typer.Option(0.75, "--train-gene-frac", help="simulation: train gene fraction, in (0, 1)."),
    combo_seen2_train_frac: float = typer.Option(0.75, "--combo-seen2-train-frac",
                                                 help="simulation: fraction of both-seen doubles in train, in [0, 1]."),
    test_frac: float = typer.Option(0.1, "--test-frac", help="single: test gene draw fraction, in [0, 1]."),
    out: Path = typer.Option(..., "--out", help="Output SPLIT.json."),
) -> None:
    """Split conditions into train/val/test exactly as GEARS does and write SPLIT.json."""
    from pertadapt.data.io import check_output_path, read_conditions
    from pertadapt.data.splits import check_split_params, split_conditions
    from pertadapt.files import sha256_file

    params = {"seed": seed, "train_gene_frac": train_gene_frac, "combo_seen2_train_frac": combo_seen2_train_frac,
              "test_frac": test_frac}
    with exit_on_error(str(data)):
        check_output_path(out)
        check_split_params(kind, **params)
        result = split_conditions(read_conditions(data), kind, **params)
        data_hash = sha256_file(data)
    with exit_on_error():
        result.to_json(out, data_hash)
    typer.echo(f"{kind} split, seed {seed}: {len(result.train)} train, {len(result.val)} val, "
               f"{len(result.test)} test conditions -> {out}")


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the root app."""
    app.add_typer(data_app, name="data")
