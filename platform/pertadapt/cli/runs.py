"""``pertadapt train``, ``sweep``, ``report`` and ``demo``."""

from __future__ import annotations

import logging
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
    from pertadapt.data.presets import data_file_for

    data_file_for(cfg)  # a data.path that is not there fails now, before torch and the data stack are imported
    from pertadapt.train.setup import ensure_data_file
    from pertadapt.train.worker import launch

    ensure_data_file(cfg)
    launch(cfg, run_dir, resume=resume)
    _print_metrics(run_dir)


def _print_metrics(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from pertadapt.rundir import RunDir

    metrics = RunDir(run_dir).final_metrics() or {}
    table = Table(title=f"final metrics ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(metrics):
        if k.startswith(("test_", "val_")) and k.count("_") <= 3 or k == "best_epoch":
            table.add_row(k, f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]))
    Console().print(table)


def _sweep(ablation: Path = typer.Argument(..., help="Ablation YAML ((factorial) arms × seeds × datasets × backbones)."),
           overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides for every trial; "
                                                 "datasets.<name>.key=value or backbones.<name>.key=value "
                                                 "for one named set of the ablation."),
           search_space: Path = typer.Option(None, "--search-space", help="Optuna search-space YAML."),
           out: Path = typer.Option(None, "--out", help="Sweep directory (default: runs/<ablation name>)."),
           report: bool = typer.Option(True, help="Write the report at the end."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything, print the trial table, "
                                        "write OUT/plan.json; start nothing."),
           resume: bool = typer.Option(False, "--resume", help="Finish the sweep in OUT (same plan): finished "
                                       "trials are kept, interrupted ones continue from their last checkpoint."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Delete the sweep in OUT and start over."),
           address: str = typer.Option(None, "--address", help="Join the Ray cluster at ADDR (also $RAY_ADDRESS) "
                                       "instead of starting a local one."),
           storage: str = typer.Option(None, "--storage", help="Where every node reads and writes: a shared path "
                                       "(NFS, EFS, ...) for Ray storage, the datasets and the caches, or an "
                                       "object-store URI (s3://bucket/prefix, gs://...) for Ray storage, the "
                                       "datasets and the run directories (default: OUT)."),
           tflops: float = typer.Option(None, "--tflops", help="Sustained TFLOP/s of one GPU for the plan's "
                                        "GPU-hours (default 30: float32 on one H100)."),
           gpu_memory_gb: float = typer.Option(None, "--gpu-memory-gb", help="Memory of one GPU: a trial the plan "
                                               "puts above it per worker is refused (exit 2; default 80)."),
           naive: bool = typer.Option(False, "--naive", help="Also plan every trial on the reference's path (FM "
                                      "recomputed every step, vocabulary genes, whole-pool evaluation) and print "
                                      "the ratio.")) -> None:
    """Run an ablation grid through Ray Tune (trials = Ray Train + DeepSpeed runs), then report."""
    from pertadapt.sweep.command import SweepRequest, run_sweep_from_files

    run_sweep_from_files(SweepRequest(ablation, tuple(overrides or ()), search_space=search_space, out=out,
                                      report=report, dry_run=dry_run, resume=resume, overwrite=overwrite,
                                      address=address, storage=storage, tflops=tflops,
                                      gpu_memory_gb=gpu_memory_gb, naive=naive))


def _demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Sweep directory."),
          overwrite: bool = typer.Option(True, help="Start over when OUT holds an earlier demo.")) -> None:
    """The embedded default: simulated Perturb-seq on real GO → paper ablation grid → W&B offline → report."""
    from pertadapt.config.load import resolve_config_path
    from pertadapt.sweep.command import SWEEP_FILE, SweepRequest, run_sweep_from_files

    run_sweep_from_files(SweepRequest(resolve_config_path("demo.yaml", kind="ablations"), out=out,
                                      overwrite=overwrite and (out / SWEEP_FILE).is_file()))


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
    app.command("demo")(_demo)
