"""Wall-clock marks of a run's phases in the run directory's timeline (:class:`~pertadapt.rundir.RunDir`): where a trial's time goes.

Each process that reaches a phase appends one line ``{"phase", "t", "pid"}`` (``t``: Unix seconds): the
Tune trial function marks ``trial_start``/``trial_end``, rank 0 of the run marks the rest. A retried or
resumed run appends again; :func:`read_timeline` keeps the last attempt. ``pertadapt bench sweep`` turns
the marks into start-up / training / evaluation / teardown seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pertadapt.rundir import RunDir

__all__ = ["PHASES", "mark", "read_timeline"]

#: In order: the trial function starts; a (rank-0) worker starts; data, split and GO inputs are ready;
#: the model and engine are built (and a checkpoint restored); the last epoch ends; the test evaluation
#: ends; the run directory is written; the trial function returns.
PHASES = ("trial_start", "worker_start", "data_ready", "model_ready", "train_end", "eval_end", "run_end",
          "trial_end")


def mark(run: RunDir | Path, phase: str, *, at: float | None = None) -> None:
    """Append ``phase`` at ``at`` (default: now) to the run's timeline (one short ``O_APPEND`` write)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    run = RunDir.at(run)
    run.path.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"phase": phase, "t": time.time() if at is None else at, "pid": os.getpid()}) + "\n"
    fd = os.open(run.timeline_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_timeline(run: RunDir | Path) -> dict[str, float]:
    """Phase → time of the last attempt (the marks after the last ``trial_start``, or all of them)."""
    path = RunDir.at(run).timeline_file
    if not path.is_file():
        return {}
    marks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, m in enumerate(marks) if m["phase"] == "trial_start"]
    last = marks[starts[-1]:] if starts else marks
    return {m["phase"]: float(m["t"]) for m in last}
