"""The single ``pertadapt`` entry point; sub-command groups live in sibling modules."""

from pertadapt.cli.main import app, main

__all__ = ["app", "main"]
