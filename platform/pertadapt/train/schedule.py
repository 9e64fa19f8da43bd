"""The learning-rate schedule (``optim.schedule`` with optional warmup): the rate of every optimiser step.

A pure function of the epoch and the step within it, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pertadapt.config.schema import OptimConfig

__all__ = ["SCHEDULES", "LRSchedule"]

#: Registry: ``optim.schedule`` → factor of ``optim.lr`` as a function of ``(epoch, progress)``, where
#: ``progress`` in ``[0, 1)`` is the fraction of the post-warmup optimiser steps already taken.
SCHEDULES: dict[str, Callable[[OptimConfig, int, float], float]] = {
    "step": lambda o, epoch, progress: o.step_gamma ** epoch,
    "cosine": lambda o, epoch, progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda o, epoch, progress: 1.0,
}


class LRSchedule:
    """Learning rate of each optimiser step.

    Parameters
    ----------
    optim
        ``optim.lr``, ``schedule``, ``step_gamma``, ``epochs`` and ``warmup_epochs`` / ``warmup_steps``.
    steps_per_epoch
        Optimiser steps in one epoch (``>= 1``).
    """

    def __init__(self, optim: OptimConfig, steps_per_epoch: int) -> None:
        self.optim, self.steps_per_epoch = optim, max(1, steps_per_epoch)
        self.warmup = optim.warmup_steps or optim.warmup_epochs * self.steps_per_epoch
        self.total = optim.epochs * self.steps_per_epoch

    def lr(self, epoch: int, step: int) -> float:
        """The rate of optimiser step ``step`` (0-based) of ``epoch``.

        During the warmup: ``lr × (t + 1) / warmup`` for global step ``t``; after it, ``lr ×`` the schedule's
        factor (``step``: ``step_gamma ** epoch``; ``cosine``: ``(1 + cos(π p)) / 2`` with ``p`` the fraction
        of the post-warmup steps taken; ``constant``: 1).
        """
        t = epoch * self.steps_per_epoch + step
        if t < self.warmup:
            return self.optim.lr * (t + 1) / self.warmup
        progress = (t - self.warmup) / max(1, self.total - self.warmup)
        return self.optim.lr * SCHEDULES[self.optim.schedule](self.optim, epoch, progress)
