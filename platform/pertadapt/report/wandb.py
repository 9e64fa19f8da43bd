"""Weights & Biases: one run per trial (rank 0 only), offline by default; reading offline runs back.

The only module that imports :mod:`wandb`. Secrets (``WANDB_API_KEY``) come from the environment,
never from configs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pertadapt.report.logger import NullLogger, RunLogger

__all__ = ["WandbLogger", "find_offline_runs", "open_logger", "read_offline_run"]

log = logging.getLogger(__name__)


class WandbLogger:
    """A W&B run.

    Parameters
    ----------
    project, group, name
        W&B project, group (``<ablation>/<arm>``) and run name.
    directory
        Where ``wandb/offline-run-*`` goes (the run dir).
    config
        The resolved run config (nested dict).
    mode
        ``offline`` or ``online``.
    """

    def __init__(self, *, project: str, group: str | None, name: str, directory: Path, config: Mapping[str, Any],
                 mode: str) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, group=group, name=name, dir=str(directory), config=dict(config),
                              mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one row (non-finite values are logged as-is; W&B shows them as NaN)."""
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float]) -> None:
        """Write the summary and close the run."""
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.finish()


def open_logger(*, mode: str, rank: int = 0, **kwargs: Any) -> RunLogger:
    """A :class:`WandbLogger` on rank 0 unless ``mode='disabled'``; a :class:`NullLogger` otherwise."""
    if mode == "disabled" or rank != 0:
        return NullLogger()
    return WandbLogger(mode=mode, **kwargs)


def find_offline_runs(root: Path) -> list[Path]:
    """All ``offline-run-*`` directories under ``root``."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """Read an offline run back with wandb's own tool (``wandb leet inspect --summary --json``).

    Returns
    -------
    dict
        ``run_id``, ``project``, ``state``, ``config`` and ``summary`` of the run.
    """
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, check=True)
    data = json.loads(out.stdout)
    summary = data.get("summary", {})
    data["summary"] = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in summary.items()}
    return data
