"""Metric-logger protocol and the null logger (tests, ``logging.wandb=disabled``, ranks > 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["NullLogger", "RunLogger"]


class RunLogger(Protocol):
    """Where one run's metrics go."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one row of metrics."""
        ...

    def finish(self, summary: Mapping[str, float]) -> None:
        """Set the run summary and close the run."""
        ...


class NullLogger:
    """Discards everything."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Do nothing."""

    def finish(self, summary: Mapping[str, float]) -> None:
        """Do nothing."""
