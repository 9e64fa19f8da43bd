"""A sweep's results table (``results.csv``, ``hpo_results.csv``): one :class:`ResultRow` per trial, written by
the sweep (:mod:`pertadapt.sweep.results`) and read by the report (:mod:`pertadapt.report.tables`).

Columns, in order: the fixed fields of :class:`ResultRow` (:data:`HEAD`), ``cfg.<dotted key>`` for the config
values that vary across the trials, the final val/test metrics and an HPO sample's ``param.<dotted key>``
(sorted), then ``run_dir`` and ``wandb_run`` (:data:`TAIL`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertadapt.config.components import FM_WEIGHTS
from pertadapt.data.io import DataError

__all__ = ["DEVICE_KINDS", "HEAD", "HPO_RESULTS_FILE", "PLAN_FILE", "REQUIRED", "RESULTS_FILE", "RESULT_STATUSES",
           "TAIL", "ResultRow", "check_columns", "device_seconds", "result_columns"]

#: The results table of a sweep's grid (and final) trials, in the sweep directory.
RESULTS_FILE = "results.csv"
#: The results table of a sweep's Optuna samples.
HPO_RESULTS_FILE = "hpo_results.csv"
#: The plan a sweep directory was started with (:mod:`pertadapt.sweep.plan`; its trials' planned ``cost``).
PLAN_FILE = "plan.json"
#: What a trial's ``device_s`` counts: GPU-seconds or CPU-seconds (:func:`device_seconds`).
DEVICE_KINDS = ("gpu", "cpu")
#: What became of a trial.
RESULT_STATUSES = ("ok", "failed", "stopped_early", "pending")
#: The first columns, one per fixed field of :class:`ResultRow`.
HEAD = ("trial", "dataset", "backbone", "arm", "seed", "stage", "status", "attempts", "error", "wall_s",
        "device_s", "device_kind", "best_epoch", "config_hash", "is_baseline", "fm_weights", "backbone_weights", "gene_space")
#: The last columns.
TAIL = ("run_dir", "wandb_run")
#: Every column a results table must have.
REQUIRED = (*HEAD, *TAIL)
CONFIG_PREFIX, PARAM_PREFIX = "cfg.", "param."


@dataclass(frozen=True)
class ResultRow:
    """One trial of a sweep.

    Attributes
    ----------
    trial, dataset, backbone, arm, seed
        The trial's key and coordinates in the grid (``dataset``/``backbone``: the named sets, ``""`` when
        the ablation has none).
    stage
        ``grid``, ``final`` (after HPO) or ``hpo``; ``""`` for a trial that never ran.
    status
        One of :data:`RESULT_STATUSES`.
    attempts
        Starts of training (retries and resumes included).
    error
        The last line of a failed trial's exception (``""`` otherwise).
    wall_s
        Tune's ``time_total_s`` (``None``: never ran).
    device_s, device_kind
        The device-seconds the trial held (:func:`device_seconds`; ``None``: not measured) and what they count
        (``gpu`` or ``cpu``; ``""`` when not measured).
    best_epoch
        The selected epoch (``None`` without results).
    config_hash
        Hash of the config the trial ran.
    is_baseline
        Whether the arm is a baseline model.
    fm_weights
        Which FM weights the run used: ``none`` (no FM: FM off or a baseline), ``random`` or ``pretrained``
        (provenance's ``backbone_weights.fm``; ``""`` when unknown).
    backbone_weights
        What the backbone's weights were, in words (provenance's ``backbone_weights.summary``: a pretrained
        checkpoint's source data, cells, steps and weights digest).
    run_dir
        The run directory.
    wandb_run
        The run's last offline W&B run directory (``""`` when none).
    gene_space
        The run's ``model.gene_space`` (``measured`` or ``vocabulary``; ``""`` when unknown).
    config
        dotted config key → value, for the keys that vary across the trials (``cfg.<key>`` columns).
    metrics
        Final val/test metrics (flat names such as ``test_mse_de``).
    params
        An HPO sample's parameters (``param.<key>`` columns).
    """

    trial: str
    dataset: str
    backbone: str
    arm: str
    seed: int
    stage: str
    status: str
    attempts: int
    error: str
    wall_s: float | None
    best_epoch: int | None
    config_hash: str
    is_baseline: bool
    backbone_weights: str
    run_dir: str
    wandb_run: str
    gene_space: str = ""
    fm_weights: str = ""
    device_s: float | None = None
    device_kind: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in RESULT_STATUSES:
            raise ValueError(f"status: {self.status!r} is not one of {', '.join(RESULT_STATUSES)}")
        if self.fm_weights not in ("", *FM_WEIGHTS):
            raise ValueError(f"fm_weights: {self.fm_weights!r} is not one of {', '.join(FM_WEIGHTS)} (or empty)")
        if self.device_kind not in ("", *DEVICE_KINDS):
            raise ValueError(f"device_kind: {self.device_kind!r} is not one of {', '.join(DEVICE_KINDS)} (or empty)")

    def record(self) -> dict[str, Any]:
        """The row as ``column → value``."""
        return {**{c: getattr(self, c) for c in HEAD}, **{f"{CONFIG_PREFIX}{k}": v for k, v in self.config.items()},
                **self.metrics, **{f"{PARAM_PREFIX}{k}": v for k, v in self.params.items()},
                **{c: getattr(self, c) for c in TAIL}}


def device_seconds(*, wall_s: float | None, gpus: float, cpu_s: float | None) -> tuple[float | None, str]:
    """The device-seconds a trial held, and what they count.

    A trial that asked for GPUs held ``gpus`` of them (workers × GPUs per worker) for its wall seconds:
    GPU-seconds, ``wall_s × gpus``. Any other trial (CPU training, a baseline's fit and evaluation) held the
    CPU time its processes used: CPU-seconds, ``cpu_s`` (the run's measured process CPU time summed over its
    ranks, :meth:`~pertadapt.rundir.RunDir.cost`).

    Parameters
    ----------
    wall_s
        The trial's wall seconds (``None``: it never ran).
    gpus
        GPUs the trial held (0 on CPU).
    cpu_s
        The run's measured CPU seconds (``None``: not recorded).

    Returns
    -------
    tuple
        ``(device_s, device_kind)``: ``device_kind`` ``gpu`` or ``cpu``; ``(None, "")`` when not measured.
    """
    if gpus > 0:
        return (wall_s * gpus, "gpu") if wall_s is not None else (None, "")
    return (float(cpu_s), "cpu") if cpu_s is not None else (None, "")


def result_columns(rows: Sequence[ResultRow]) -> list[str]:
    """The table's columns for ``rows`` (see the module docstring for the order)."""
    config = list(dict.fromkeys(f"{CONFIG_PREFIX}{k}" for r in rows for k in r.config))
    rest = sorted({k for r in rows for k in r.metrics} | {f"{PARAM_PREFIX}{k}" for r in rows for k in r.params})
    return [*HEAD, *config, *rest, *TAIL]


def check_columns(path: Path, columns: Iterable[str]) -> None:
    """Refuse a results table without every :data:`REQUIRED` column.

    Raises
    ------
    DataError
        Naming the file and the missing columns: not a sweep's results table, or one written by an older
        version of pertadapt.
    """
    present = set(columns)
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise DataError(f"{path}: column(s) {', '.join(missing)} missing: not a sweep's {RESULTS_FILE}, or one "
                        "written by an older version of pertadapt; report it with the version that wrote it, or "
                        "run the sweep again with this one")
