"""Metric-logger protocol and the null logger (tests, ``logging.wandb=disabled``, ranks > 0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["NullLogger", "RunLogger"]


class RunLogger(Protocol):
    """Where one run's metrics go."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one row of metrics."""
        ...

    def finish(self, summary: Mapping[str, float], *, tags: Sequence[str] = (), exit_code: int = 0) -> None:
        """Set the run summary, add ``tags``, and close the run (``exit_code`` ≠ 0: the run failed)."""
        ...


class NullLogger:
    """Discards everything."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Do nothing."""

    def finish(self, summary: Mapping[str, float], *, tags: Sequence[str] = (), exit_code: int = 0) -> None:
        """Do nothing."""
