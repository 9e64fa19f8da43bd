"""``pertadapt train``, ``sweep``, ``report`` and ``demo``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
import yaml

from pertadapt.config import ConfigError, config_to_dict, load_run_config

log = logging.getLogger("pertadapt")


def _train(config: Path = typer.Argument(..., help="Run config YAML (may use base:)."),
           overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=0.001."),
           workers: int = typer.Option(None, "--workers", help="Ray Train workers (DeepSpeed); default from config."),
           out: Path = typer.Option(None, "--out", help="Run directory (default: <logging.out_dir>/<name>)."),
           resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's last checkpoint.")) -> None:
    """Train one run: single process (torch engine) or N Ray Train workers with DeepSpeed."""
    ov = list(overrides or [])
    if workers is not None:
        ov += [f"engine.workers={workers}"] + (["engine.name=deepspeed"] if workers > 1 else [])
    cfg = load_run_config(config, ov)
    run_dir = (out or Path(cfg.logging.out_dir) / cfg.name).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} exists and is not a directory")
    from pertadapt.train.setup import ensure_data_file
    from pertadapt.train.worker import launch

    ensure_data_file(cfg)
    launch(cfg, run_dir, resume=resume)
    _print_metrics(run_dir)


def _print_metrics(run_dir: Path) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    table = Table(title=f"final metrics ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(metrics):
        if k.startswith(("test_", "val_")) and k.count("_") <= 3 or k == "best_epoch":
            table.add_row(k, f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]))
    Console().print(table)


def _sweep(ablation: Path = typer.Argument(..., help="Ablation YAML (arms × seeds × datasets × backbones)."),
           overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides for every trial."),
           search_space: Path = typer.Option(None, "--search-space", help="Optuna search-space YAML."),
           out: Path = typer.Option(None, "--out", help="Sweep directory (default: runs/<ablation name>)."),
           report: bool = typer.Option(True, help="Write report.html at the end.")) -> None:
    """Run an ablation grid through Ray Tune (trials = Ray Train + DeepSpeed runs), then report."""
    from pertadapt.sweep.ablation import load_ablation
    from pertadapt.sweep.search_space import load_search_space

    extra = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. optim.epochs=2)")
        k, v = item.split("=", 1)
        extra[k] = yaml.safe_load(v)
    abl = load_ablation(ablation, extra_overrides=extra)
    space = load_search_space(search_space) if search_space else (
        load_search_space(abl.search_space) if abl.search_space else None)
    sweep_dir = (out or Path("runs") / abl.name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("sweep %s: %d trials (%d arms × %d seeds) → %s", abl.name, len(abl.trials), len(abl.arms),
             len(abl.seeds), sweep_dir)
    from pertadapt.sweep.tuner import run_sweep
    from pertadapt.train.setup import ensure_data_file

    data_paths = {t.key: str(ensure_data_file(t.config).resolve()) for t in abl.trials}
    t0 = time.time()
    results = run_sweep(abl, sweep_dir, search_space=space, data_paths=data_paths)
    log.info("sweep finished in %.0f s; results: %s", time.time() - t0, results)
    _print_summary(results, abl.reference_arm)
    if report:
        from pertadapt.report.html import write_report

        html = write_report(results, sweep_dir / "report.html", name=abl.name, reference=abl.reference_arm)
        log.info("HTML report: %s", html)
    log.info("W&B offline runs: %s/runs/*/**/wandb/offline-run-* (sync with `wandb sync`)", sweep_dir)


def _print_summary(results: Path, reference: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from pertadapt.report.tables import KEY_METRICS, load_results, summarise

    s = summarise(load_results(results))
    table = Table(title=f"mean ± sd over seeds (reference: {reference})")
    table.add_column("arm", no_wrap=True)
    table.add_column("n", justify="right")
    for m in KEY_METRICS:
        table.add_column(m.removeprefix("test_"), justify="right", no_wrap=True)
    for _, r in s.iterrows():
        table.add_row(str(r["arm"]), str(r["n"]), *[f"{r[f'{m}_mean']:.4f}±{r[f'{m}_sd']:.4f}" for m in KEY_METRICS])
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def _report(sweep_dir: Path = typer.Argument(..., help="A sweep directory (with results.csv)."),
            reference: str = typer.Option("full", help="Reference arm for paired tests.")) -> None:
    """Print the summary table and write ``report.html`` for a finished sweep."""
    from pertadapt.report.html import write_report

    results = sweep_dir / "results.csv"
    if not results.is_file():
        raise ConfigError(f"{results}: not found (is {sweep_dir} a sweep directory?)")
    _print_summary(results, reference)
    log.info("HTML report: %s", write_report(results, sweep_dir / "report.html", name=sweep_dir.name,
                                            reference=reference))


def _demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Sweep directory.")) -> None:
    """The embedded default: simulated Perturb-seq on real GO → paper ablation grid → W&B offline → HTML."""
    from pertadapt.config.load import resolve_config_path

    _sweep(resolve_config_path("demo.yaml", kind="ablations"), [], None, out, True)


def _config_show(config: Path = typer.Argument(..., help="Run config YAML (may use base:)."),
                 overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides.")) -> None:
    """Print the fully resolved run config as YAML (what a run, or an arm, really runs)."""
    cfg = load_run_config(config, list(overrides or []))
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)


config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
config_app.command("show")(_config_show)


def register(app: typer.Typer) -> None:
    """Add the run commands to the root app."""
    app.add_typer(config_app, name="config")
    app.command("train")(_train)
    app.command("sweep")(_sweep)
    app.command("report")(_report)
    app.command("demo")(_demo)
