"""``pertadapt bench``: speed and memory targets, measured in one run each (:mod:`pertadapt.bench`) and printed as
tables."""

from __future__ import annotations

from pathlib import Path

import typer

bench = typer.Typer(help="Benchmarks (speed and memory targets); results printed as tables.", no_args_is_help=True)


def _show(title: str, result: dict, json_path: Path | None = None) -> None:
    """Print ``result`` as a table and, with ``json_path``, write it there as JSON (atomically)."""
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
    if json_path is not None:
        from pertadapt.files import atomic_write_json

        atomic_write_json(json_path, result)


@bench.command("go")
def _go(n_genes: int = typer.Option(None, help="First N vocabulary genes (default: all 19,264).")) -> None:
    """GO graph + attention mask over the FM vocabulary (target ≤ 15 s, ≤ 1.5 GB on 2 cores)."""
    from pertadapt.bench.go import run_go_benchmark

    _show("GO graph + mask", run_go_benchmark(n_genes))


@bench.command("data")
def _data(n_cells: int = typer.Option(200_000), n_genes: int = typer.Option(5_000),
          density: float = typer.Option(0.1)) -> None:
    """``data prepare`` on a large sparse matrix (target peak RSS ≤ 4 GB); its normalisation against scanpy's."""
    from pertadapt.bench.data import run_data_benchmark

    _show("data prepare", run_data_benchmark(n_cells, n_genes, density))


@bench.command("baselines")
def _baselines(n_genes: int = typer.Option(2000), n_conditions: int = typer.Option(250)) -> None:
    """Fit + predict of the four baselines (target < 60 s on 2 cores)."""
    from pertadapt.bench.baselines import run_baseline_benchmark

    _show("baselines", run_baseline_benchmark(n_genes, n_conditions))


_JSON = typer.Option(None, "--json", help="Also write the figures to this JSON file.")
_DEVICE = typer.Option("cpu", help="cpu or cuda.")


@bench.command("adapter")
def _adapter(n_genes: int = typer.Option(None, help="First N vocabulary genes (default: all 19,264)."),
             chunk_size: int = typer.Option(2048), device: str = _DEVICE,
             attention_impl: str = typer.Option("auto", help="chunked, sparse or auto (adapter.attention_impl)."),
             json_path: Path = _JSON) -> None:
    """Paper-size PA forward + backward over the FM vocabulary with the real GO mask, batch 1."""
    from pertadapt.bench.train import run_adapter_benchmark

    result = run_adapter_benchmark(n_genes, chunk_size=chunk_size, device=device, attention_impl=attention_impl)
    _show(f"perturbation adapter ({device})", result, json_path)


@bench.command("attention")
def _attention(n_genes: int = typer.Option(None, help="First N vocabulary genes (default: all 19,264)."),
               heads: int = typer.Option(8), d: int = typer.Option(512, help="Model width (head dim d / heads)."),
               chunk_size: int = typer.Option(2048, help="Queries per chunk of the chunked path."),
               device: str = _DEVICE, json_path: Path = _JSON) -> None:
    """Sparse vs chunked GO-masked attention, forward + backward, batch 1 (target: >= 3x faster, <= 1/2 memory)."""
    from pertadapt.bench.train import run_attention_benchmark

    result = run_attention_benchmark(n_genes, heads=heads, d=d, chunk_size=chunk_size, device=device)
    _show(f"GO-masked attention, sparse vs chunked ({device})", result, json_path)


@bench.command("sweep")
def _sweep_bench(ablation: Path = typer.Argument(None, help="Ablation YAML (default: the shipped demo grid)."),
                 overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides for every trial."),
                 out: Path = typer.Option(Path("runs/bench-sweep"), "--out", help="Sweep directory (started over)."),
                 existing: Path = typer.Option(None, "--from", help="Only analyse this finished sweep directory."),
                 naive: bool = typer.Option(False, "--naive", help="Also run the grid on the naive path (no "
                                            "embedding cache, chunked attention) into OUT-naive and compare."),
                 naive_from: Path = typer.Option(None, "--naive-from", help="With --from: the finished naive-path "
                                                 "sweep to compare against."),
                 json_path: Path = _JSON) -> None:
    """Run a sweep (default: the demo grid) and print where each trial's time goes (target: overhead <= 35 %);
    with --naive, the same grid on the naive path in the same command, and the ratios."""
    from pertadapt.bench.sweep import NAIVE_OVERRIDES, compare_sweeps, sweep_timings
    from pertadapt.config.errors import ConfigError
    from pertadapt.config.load import resolve_config_path
    from pertadapt.sweep.command import SWEEP_FILE, SweepRequest, run_sweep_from_files

    if naive_from is not None and existing is None:
        raise ConfigError("--naive-from: only with --from (the sweep to compare)")
    if existing is None:
        ablation = ablation or resolve_config_path("demo.yaml", kind="ablations")
        runs = [(out, [])] + ([(out.with_name(out.name + "-naive"), list(NAIVE_OVERRIDES))] if naive else [])
        for sweep_dir, extra in runs:
            run_sweep_from_files(SweepRequest(ablation, (*(overrides or []), *extra), out=sweep_dir, report=False,
                                              overwrite=(sweep_dir / SWEEP_FILE).is_file()))
        existing, naive_from = out, (runs[1][0] if naive else None)
    result = sweep_timings(existing.resolve())
    _trial_table(result)
    if naive_from is None:
        _show("sweep overhead", result, json_path)
        return
    slow = sweep_timings(naive_from.resolve())
    _trial_table(slow, "naive path")
    ratios = compare_sweeps(result, slow)
    _show("sweep: as configured vs the naive path", ratios)
    if json_path is not None:
        from pertadapt.files import atomic_write_json

        atomic_write_json(json_path, {**ratios, "sweep": result, "naive": slow})


def _trial_table(result: dict, label: str = "") -> None:
    """Print the per-trial phase seconds of :func:`pertadapt.bench.sweep.sweep_timings`."""
    from rich.console import Console
    from rich.table import Table

    from pertadapt.bench.sweep import PHASE_SPANS

    table = Table(title=f"sweep {result['sweep']}{f' ({label})' if label else ''}: seconds per trial")
    for col in ("trial", *PHASE_SPANS, "total"):
        table.add_column(col, justify="left" if col == "trial" else "right")
    for t in result["trials"]:
        table.add_row(t["trial"], *[f"{t[p]:.1f}" for p in (*PHASE_SPANS, "total")])
    Console().print(table)


@bench.command("cache")
def _cache(n_genes: int = typer.Option(2000, help="Genes of the simulated screen."),
           hidden_size: int = typer.Option(128, help="AIDO.Cell hidden size (3M: 128)."),
           layers: int = typer.Option(6, help="AIDO.Cell layers (3M: 6)."),
           heads: int = typer.Option(4, help="AIDO.Cell heads (3M: 4)."),
           pool: int = typer.Option(32, help="Control cells (the cache's rows)."),
           steps: int = typer.Option(2, help="Optimiser steps per epoch."),
           repeats: int = typer.Option(2, help="Epochs timed per mode, alternating; the fastest counts."),
           device: str = _DEVICE, json_path: Path = _JSON) -> None:
    """Training epoch with the frozen-FM embedding cache vs recomputing the FM, same run (target >= 10x)."""
    from pertadapt.bench.train import run_cache_benchmark

    result = run_cache_benchmark(n_genes, hidden_size=hidden_size, layers=layers, heads=heads, pool=pool, steps=steps,
                                 repeats=repeats, device=device)
    _show(f"frozen-FM embedding cache vs recomputing ({result['config']})", result, json_path)


@bench.command("quality")
def _quality(overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides for every run."),
             config: str = typer.Option("benchmark.yaml", "--config", help="Run config (default: the shipped one)."),
             seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated run seeds."),
             epochs: int = typer.Option(None, "--epochs", help="Override optim.epochs (a shorter run)."),
             steps: int = typer.Option(None, "--steps", help="Override optim.max_steps_per_epoch."),
             controls: int = typer.Option(None, "--controls", help="Override eval.val_controls and eval.test_controls."),
             out: Path = typer.Option(Path("runs/bench-quality"), "--out", help="Root of the run directories."),
             json_path: Path = _JSON) -> None:
    """Full model vs the four baselines on the benchmark preset, per seed and paired (target: beats no-change
    and mean on test mse_de in every seed, all-gene mse <= 1.1 x no-change's)."""
    from rich.console import Console
    from rich.table import Table

    from pertadapt.bench.quality import QUALITY_METRICS, run_quality_benchmark
    from pertadapt.config.schema import BASELINE_MODELS

    ov = list(overrides or [])
    for key, value in (("optim.epochs", epochs), ("optim.max_steps_per_epoch", steps),
                       ("eval.val_controls", controls), ("eval.test_controls", controls)):
        if value is not None:
            ov.append(f"{key}={value}")
    result = run_quality_benchmark(out, config=config, seeds=[int(s) for s in seeds.split(",")], overrides=ov)
    console = Console()
    for row in result["seeds"]:
        table = Table(title=f"seed {row['seed']}: test metrics (no-change from the eval controls: mse "
                            f"{row['nochange_eval_controls_mse']:.4g}, mse_de {row['nochange_eval_controls_mse_de']:.4g})")
        table.add_column("model")
        for m in QUALITY_METRICS:
            table.add_column(m.removeprefix("test_"), justify="right")
        for model in ("pertadapt", *BASELINE_MODELS):
            table.add_row(model, *[f"{row[model][m]:.4g}" for m in QUALITY_METRICS])
        console.print(table)
    targets = result["targets"]
    paired = Table(title="paired, per seed: full model - baseline (test mse_de), mse / no-change mse")
    for col in targets["paired"][0]:
        paired.add_column(col, justify="right")
    for p in targets["paired"]:
        paired.add_row(*[str(v) if isinstance(v, int) else f"{v:+.4g}" for v in p.values()])
    console.print(paired)
    _show("quality targets", {k: v for k, v in targets.items() if k != "paired"}, json_path)
    if json_path is not None:
        from pertadapt.files import atomic_write_json

        atomic_write_json(json_path, result)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the root app."""
    app.add_typer(bench, name="bench")
