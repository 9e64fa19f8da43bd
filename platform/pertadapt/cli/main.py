"""``pertadapt`` command line (typer). Heavy frameworks are imported inside commands only."""

from __future__ import annotations

import logging

import typer

from pertadapt.config import ConfigError

app = typer.Typer(help="PertAdapt ablation and hyperparameter platform.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
log = logging.getLogger("pertadapt")


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        fmt = "%(message)s"
    else:  # logs and CI: one plain line per message, never wrapped or padded
        handler, fmt = logging.StreamHandler(), "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, handlers=[handler], force=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    _setup_logging(verbose)


def main() -> None:
    """Console-script entry point.

    Config errors exit with code 2 and a one-line message naming the file and key; data, GO and
    checkpoint errors (all ``ValueError`` subclasses that name the offending file, gene or condition)
    exit with code 1 and a one-line message (``-v`` shows the traceback). A sweep stopped by a signal
    exits with 128 + the signal (143 for SIGTERM) once its state is saved; a failed sweep driver with 1.
    """
    from pertadapt.sweep.command import SweepFailed
    from pertadapt.sweep.stop import SweepStopped

    try:
        app()
    except SweepStopped as e:
        raise SystemExit(128 + e.signum) from None
    except SweepFailed as e:
        log.error("%s", e)
        raise SystemExit(1) from e
    except ConfigError as e:
        log.error("config error: %s", e)
        raise SystemExit(2) from e
    except ValueError as e:
        log.error("error: %s", e, exc_info=log.isEnabledFor(logging.DEBUG))
        raise SystemExit(1) from e


def _register_groups() -> None:
    from pertadapt.cli import bench, cluster, data, embed, evaluate, go, pretrain, report, runs, simulate

    for module in (runs, report, simulate, data, go, evaluate, embed, pretrain, bench, cluster):
        module.register(app)


_register_groups()
