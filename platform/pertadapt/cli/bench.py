"""``pertadapt bench``: speed and memory targets, measured in one run each and printed as tables."""

from __future__ import annotations

import typer

bench = typer.Typer(help="Benchmarks (speed and memory targets); results printed as tables.", no_args_is_help=True)


def _show(title: str, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        if isinstance(v, (list, tuple, dict)):
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


@bench.command("go")
def _go(n_genes: int = typer.Option(None, help="First N vocabulary genes (default: all 19,264).")) -> None:
    """GO graph + attention mask over the FM vocabulary (target ≤ 15 s, ≤ 1.5 GB on 2 cores)."""
    from pertadapt.go.bench import run_go_benchmark

    _show("GO graph + mask", run_go_benchmark(n_genes))


@bench.command("data")
def _data(n_cells: int = typer.Option(200_000), n_genes: int = typer.Option(5_000),
          density: float = typer.Option(0.1)) -> None:
    """``data prepare`` on a large sparse matrix (target peak RSS ≤ 4 GB)."""
    from pertadapt.data.bench import run_data_benchmark

    _show("data prepare", run_data_benchmark(n_cells, n_genes, density))


@bench.command("baselines")
def _baselines(n_genes: int = typer.Option(2000), n_conditions: int = typer.Option(250)) -> None:
    """Fit + predict of the four baselines (target < 60 s on 2 cores)."""
    from pertadapt.baselines.bench import run_baseline_benchmark

    _show("baselines", run_baseline_benchmark(n_genes, n_conditions))


@bench.command("adapter")
def _adapter(n_genes: int = typer.Option(None, help="First N vocabulary genes (default: all 19,264)."),
             chunk_size: int = typer.Option(2048), device: str = typer.Option("cpu", help="cpu or cuda.")) -> None:
    """Paper-size PA forward + backward over the FM vocabulary with the real GO mask, batch 1."""
    from pertadapt.train.bench import run_adapter_benchmark

    _show(f"perturbation adapter ({device})", run_adapter_benchmark(n_genes, chunk_size=chunk_size, device=device))


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the root app."""
    app.add_typer(bench, name="bench")
