"""`pertadapt` commands of the go area (registered by :mod:`pertadapt.cli.main`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
