"""``pertadapt report SWEEP_DIR``: the ablation report of a sweep directory (registered by :mod:`pertadapt.cli.main`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pertadapt.config.errors import ConfigError

log = logging.getLogger("pertadapt")


def report_command(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep directory (with results.csv).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default: SWEEP_DIR/report).")] = None,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", help="Metric to tabulate and test (repeatable), e.g. mse_de or test_mse_de; the first is "
        "the headline. Default: mse_de, mse, pearson_delta, pearson_delta_de (+ truth metrics on simulated data).")
    ] = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="Reference arm (default: the ablation's reference_arm from sweep.json, else full).")
    ] = None,
    publish: Annotated[bool, typer.Option(
        "--publish", help="Also log the report's tables and figures to an online summary run and create the W&B "
        "Report from report/wandb_report.json (needs WANDB_API_KEY).")
    ] = False,
    wandb_project: Annotated[str | None, typer.Option(
        "--wandb-project", help="W&B project of the Report spec (default: $WANDB_PROJECT, else pertadapt).")
    ] = None,
    wandb_entity: Annotated[str | None, typer.Option(
        "--wandb-entity", help="W&B entity (default: $WANDB_ENTITY, else your default entity when publishing).")
    ] = None,
) -> None:
    """Paired per-condition tests, paper-layout tables, figures, report.md and a self-contained report.html.

    Also saves the W&B Report spec (``wandb_report.json``, offline) and, with ``--publish``, creates it.
    """
    from pertadapt.report.console import print_summary
    from pertadapt.report.html import write_sweep_report
    from pertadapt.report.results import RESULTS_FILE
    from pertadapt.report.wandb import build_wandb_report_spec, publish_wandb_report
    from pertadapt.sweep.lock import running_sweep

    holder = running_sweep(sweep_dir)  # read without taking the sweep's lock
    if holder is not None:
        if not (sweep_dir / RESULTS_FILE).is_file():
            raise ConfigError(f"{sweep_dir}: the sweep is still running ({holder.describe()}); its results.csv is "
                              "written when it ends")
        log.warning("%s: the sweep is still running (%s); this report reads the results.csv of its earlier run",
                    sweep_dir, holder.describe())
    paths = write_sweep_report(sweep_dir, out=out, metrics=metric or None, reference=reference)
    print_summary(paths.report)
    spec = build_wandb_report_spec(paths, project=wandb_project, entity=wandb_entity)
    log.info("report: %s (markdown %s); W&B Report spec %s", paths.html, paths.markdown, spec)
    if publish:
        log.info("W&B Report: %s (learning curves need the trials' offline runs synced: wandb sync "
                 "%s/runs/*/**/wandb/offline-run-*)", publish_wandb_report(spec, paths), sweep_dir)


def register(app: typer.Typer) -> None:
    """Add ``report`` to the root app."""
    app.command("report")(report_command)
