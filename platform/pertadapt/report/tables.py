"""A sweep directory → tidy tables: trials (every status), long per-condition values, per-arm summaries.

Pure pandas/scipy; consumed by the HTML/Markdown report, the console table and the W&B tables.

Naming: a *metric* is a per-condition name such as ``mse_de`` (the columns of a run's per-condition
table); the trial-level value of metric ``m`` in ``results.csv`` is ``test_<m>`` overall and
``test_<subgroup>_<m>`` per GEARS subgroup. ``--metric test_mse_de`` and ``--metric mse_de`` mean the same
thing. Directions and the default metrics come from the metric registry (:mod:`pertadapt.config.metrics`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pertadapt.config.metrics import SUBGROUPS as METRIC_SUBGROUPS
from pertadapt.config.metrics import default_report_metrics, lower_is_better, metric_spec
from pertadapt.data.io import DataError
from pertadapt.report.bootstrap import hierarchical_bootstrap
from pertadapt.report.results import PLAN_FILE, RESULTS_FILE, check_columns
from pertadapt.rundir import RunDir

__all__ = [
    "OVERALL",
    "PAIRING_NOISE_COLUMN",
    "COST_COLUMNS",
    "SUBGROUPS",
    "LayoutTable",
    "SweepData",
    "arm_label",
    "arm_of_label",
    "arm_order",
    "cost_per_arm",
    "default_metrics",
    "describe_metric",
    "format_cell",
    "layout_tables",
    "load_results",
    "load_sweep",
    "lower_is_better",
    "metric_column",
    "normalise_metric",
    "planned_gpu_hours",
    "summarise",
]

log = logging.getLogger(__name__)

#: GEARS test subgroups, in the paper's column order (the metric registry's list).
SUBGROUPS = METRIC_SUBGROUPS
#: Scope name of the metrics over all test conditions.
OVERALL = "overall"
#: Baseline arms in display order (others after them).
_BASELINE_NAMES = ("baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear", "gears")
#: What a trial without an error message and without success means, by status.
_STATUS_ERRORS = {"stopped_early": "stopped early by the scheduler (ASHA)", "pending": "not run (sweep interrupted?)"}
_GROUP = ("dataset", "backbone", "arm")


def normalise_metric(name: str) -> str:
    """``test_mse_de`` → ``mse_de`` (per-condition name); other names unchanged."""
    return name.removeprefix("test_")


#: The ``results.csv`` column of the test controls' pairing noise (``mse_de`` they add; 0 = the whole pool).
PAIRING_NOISE_COLUMN = "test_pairing_noise_mse_de"


def metric_column(metric: str, scope: str = OVERALL) -> str:
    """The ``results.csv`` column of ``metric`` over ``scope`` (``overall`` or a subgroup)."""
    m = normalise_metric(metric)
    return f"test_{m}" if scope == OVERALL else f"test_{scope}_{m}"


def describe_metric(metric: str) -> str:
    """``metric`` with its registered display name and direction, e.g. ``mse_de (MSE (top-20 DE), lower is
    better)``; a ``truth_`` metric is the same against the simulator's noise-free truth."""
    spec = metric_spec(metric)
    truth = " against the truth" if normalise_metric(metric).startswith("truth_") else ""
    return f"{normalise_metric(metric)} ({spec.display}{truth}, {spec.direction} is better)"


def default_metrics(trials: pd.DataFrame) -> list[str]:
    """The registry's default report metrics that ``trials`` has (per-condition names)."""
    return default_report_metrics(set(trials.columns))


@dataclass(frozen=True)
class SweepData:
    """Everything the report reads from a sweep directory.

    Attributes
    ----------
    root
        The sweep directory.
    name
        Ablation name (``sweep.json``; the directory name when absent).
    reference
        The arm every other arm is tested against.
    trials
        One row per trial of ``results.csv`` whatever its status, with ``dataset``, ``backbone``, ``arm``,
        ``seed``, ``status``, ``error``, ``is_baseline``, ``run_path`` (the run directory found on this
        machine) and every metric column.
    per_condition
        Long table ``dataset, backbone, arm, seed, condition, subgroup, metric, value``: the union of the
        ok trials' per-condition tables.
    missing_per_condition
        Keys of ok trials without a per-condition table (left out of the paired tests).
    planned_gpu_hours
        Trial name → the GPU-hours its sweep's plan gave it (``plan.json``'s ``cost.gpu_hours``; empty when the
        sweep directory has no plan with costs).
    """

    root: Path
    name: str
    reference: str
    trials: pd.DataFrame
    per_condition: pd.DataFrame
    missing_per_condition: tuple[str, ...]
    planned_gpu_hours: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> pd.DataFrame:
        """The trials with ``status == ok``."""
        return self.trials[self.trials["status"] == "ok"]

    @property
    def not_ok(self) -> pd.DataFrame:
        """Failed, stopped and missing trials."""
        return self.trials[self.trials["status"] != "ok"]


def _read_results(path: Path) -> pd.DataFrame:
    """The rows of a results table (:class:`~pertadapt.report.results.ResultRow` columns), checked and typed."""
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    check_columns(path, df.columns)
    for col in ("dataset", "backbone", "error", "run_dir", "gene_space", "fm_weights", "backbone_weights",
                "device_kind"):
        df[col] = df[col].fillna("").astype(str)
    df["arm"] = df["arm"].astype(str)
    for col in ("wall_s", "device_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["status"] = df["status"].fillna("missing").astype(str)
    df["is_baseline"] = df["is_baseline"].astype(str).str.lower().isin(("true", "1"))
    unexplained = (df["status"] != "ok") & (df["error"] == "")
    df.loc[unexplained, "error"] = df.loc[unexplained, "status"].map(_STATUS_ERRORS).fillna(
        "no final metrics (no error recorded)")
    return df


def planned_gpu_hours(sweep_dir: Path) -> dict[str, float]:
    """Trial name → planned GPU-hours (``cost.gpu_hours``) from the sweep's ``plan.json``; a run's aliases (the
    trials sharing its config hash) get the run's. Empty without a plan, or a plan without costs.

    Raises
    ------
    DataError
        ``plan.json`` is not valid JSON.
    """
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        return {}
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    out = {}
    for t in plan.get("trials", []):
        hours = (t.get("cost") or {}).get("gpu_hours")
        if hours is not None:
            out.update({str(name["key"]): float(hours) for name in (t, *t.get("aliases", []))})
    return out


def load_results(path: Path) -> pd.DataFrame:
    """Read ``results.csv``: only the rows with ``status == ok`` (see :func:`load_sweep` for all rows)."""
    df = _read_results(Path(path))
    return df[df["status"] == "ok"].copy()


def _run_path(sweep_dir: Path, row: pd.Series) -> Path:
    """The trial's run directory: ``run_dir`` when it exists here, else (a moved sweep) the same run under
    ``<sweep>/runs/`` (a trial that shared another's run: that run's key, as deep as the trial's own key)."""
    recorded = Path(row["run_dir"]) if row["run_dir"] else None
    if recorded is not None and recorded.is_dir():
        return recorded
    depth = len(str(row["trial"]).split("/"))
    return sweep_dir / "runs" / (Path(*recorded.parts[-depth:]) if recorded is not None else str(row["trial"]))


def _read_per_condition(path: Path, row: pd.Series) -> pd.DataFrame:
    wide = pd.read_csv(path, keep_default_na=False, na_values=[""])
    if "condition" not in wide:
        raise DataError(f"{path}: no 'condition' column (expected one row per test condition)")
    if "subgroup" not in wide:
        wide["subgroup"] = ""
    wide["subgroup"] = wide["subgroup"].fillna("").astype(str)
    values = [c for c in wide if c not in ("condition", "subgroup")]
    long = wide.melt(id_vars=["condition", "subgroup"], value_vars=values, var_name="metric", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    for col in ("dataset", "backbone", "arm", "seed"):
        long.insert(len(long.columns) - 4, col, row[col])
    return long


def load_sweep(sweep_dir: Path, reference: str | None = None) -> SweepData:
    """Read a sweep directory (``results.csv``, ``sweep.json``, each run's per-condition table).

    Parameters
    ----------
    sweep_dir
        Directory with ``results.csv``.
    reference
        Reference arm; default ``sweep.json``'s ``reference_arm``, else ``full``.

    Raises
    ------
    DataError
        ``results.csv`` missing or without the :class:`~pertadapt.report.results.ResultRow` columns; a
        per-condition table without ``condition``.
    """
    sweep_dir = Path(sweep_dir)
    results = sweep_dir / RESULTS_FILE
    if not results.is_file():
        raise DataError(f"{results}: not found (is {sweep_dir} a sweep directory?)")
    meta_file = sweep_dir / "sweep.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    trials = _read_results(results)
    trials["run_path"] = [str(_run_path(sweep_dir, r)) for _, r in trials.iterrows()]
    frames, missing = [], []
    for _, row in trials[trials["status"] == "ok"].iterrows():
        path = RunDir(row["run_path"]).per_condition_file
        if path.is_file():
            frames.append(_read_per_condition(path, row))
        else:
            missing.append(str(row["trial"]))
    if missing:
        log.warning("%d ok trial(s) have no per-condition table and are left out of the paired tests, first %s",
                    len(missing), missing[0])
    cols = ["dataset", "backbone", "arm", "seed", "condition", "subgroup", "metric", "value"]
    per = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    return SweepData(root=sweep_dir, name=str(meta.get("name") or sweep_dir.name),
                     reference=reference or str(meta.get("reference_arm") or "full"), trials=trials,
                     per_condition=per, missing_per_condition=tuple(missing),
                     planned_gpu_hours=planned_gpu_hours(sweep_dir))


def arm_order(trials: pd.DataFrame, reference: str) -> list[str]:
    """Arms for display: the reference first, the other model arms in file order, the baselines last."""
    arms = list(dict.fromkeys(trials["arm"]))
    base = set(trials.loc[trials["is_baseline"], "arm"]) if "is_baseline" in trials else set()
    rank = {name: i for i, name in enumerate(_BASELINE_NAMES)}
    models = [a for a in arms if a not in base and a != reference]
    baselines = sorted((a for a in arms if a in base and a != reference), key=lambda a: rank.get(a, len(rank)))
    return ([reference] if reference in arms else []) + models + baselines


#: The columns of :func:`cost_per_arm` after the arm's coordinates.
COST_COLUMNS = ("n_ran", "wall_s_mean", "wall_s_total", "gpu_s_total", "cpu_s_total", "plan_gpu_h_per_trial",
                "gpu_h_per_trial")


def cost_per_arm(trials: pd.DataFrame, planned: dict[str, float] | None = None) -> pd.DataFrame:
    """The measured cost of each (dataset, backbone, arm), and the plan's next to it.

    Parameters
    ----------
    trials
        Rows of ``results.csv`` (:func:`load_sweep`), any status: a failed trial's time counts too.
    planned
        Trial name → planned GPU-hours (:func:`planned_gpu_hours`).

    Returns
    -------
    pandas.DataFrame
        ``dataset, backbone, arm, is_baseline, n_trials``, ``n_ran`` (trials with a measured ``wall_s``),
        ``wall_s_mean`` and ``wall_s_total`` over those, ``gpu_s_total`` and ``cpu_s_total`` (the sum of
        ``device_s`` over its trials of each ``device_kind``: GPU-seconds of GPU trials, measured CPU-seconds
        of the others; NaN when none), ``plan_gpu_h_per_trial`` (the plan's mean GPU-hours per trial; NaN
        without a plan) and ``gpu_h_per_trial`` (measured GPU-hours per GPU trial; NaN without one).
    """
    planned = planned or {}
    rows = []
    for key, g in trials.groupby(list(_GROUP), sort=False):
        wall = g["wall_s"].dropna()
        kinds = {k: g.loc[g["device_kind"] == k, "device_s"].dropna() for k in ("gpu", "cpu")}
        plan = [planned[t] for t in g["trial"] if t in planned]
        rows.append({"dataset": key[0], "backbone": key[1], "arm": key[2], "is_baseline": bool(g["is_baseline"].any()),
                     "n_trials": len(g), "n_ran": len(wall),
                     "wall_s_mean": float(wall.mean()) if len(wall) else math.nan,
                     "wall_s_total": float(wall.sum()) if len(wall) else math.nan,
                     "gpu_s_total": float(kinds["gpu"].sum()) if len(kinds["gpu"]) else math.nan,
                     "cpu_s_total": float(kinds["cpu"].sum()) if len(kinds["cpu"]) else math.nan,
                     "plan_gpu_h_per_trial": float(np.mean(plan)) if plan else math.nan,
                     "gpu_h_per_trial": float(kinds["gpu"].mean()) / 3600 if len(kinds["gpu"]) else math.nan})
    cols = ["dataset", "backbone", "arm", "is_baseline", "n_trials", *COST_COLUMNS]
    return pd.DataFrame(rows, columns=cols)


def _t_interval(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and the 95% t-interval over seeds (NaN bounds for fewer than two values)."""
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, math.nan, math.nan
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=mean, scale=stats.sem(x))
    return mean, float(lo), float(hi)


def _bootstrap_interval(pc: pd.DataFrame, metric: str, scope: str) -> tuple[float, float]:
    """Hierarchical-bootstrap 95% interval of the mean of one arm's per-condition values (seeds, conditions)."""
    sel = pc[pc["metric"] == metric].dropna(subset=["value"])
    if scope != OVERALL:
        sel = sel[sel["subgroup"] == scope]
    return hierarchical_bootstrap([g.to_numpy(dtype=float) for _, g in sel.groupby("seed")["value"]])


def summarise(trials: pd.DataFrame, metrics: Sequence[str], scopes: Sequence[str] = (OVERALL,),
              per_condition: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (dataset, backbone, arm): trial counts and, per metric and scope, seed statistics.

    Parameters
    ----------
    trials
        Rows of ``results.csv`` (:func:`load_sweep`), any status.
    metrics
        Metric names (``mse_de`` or ``test_mse_de``); the ``results.csv`` column of each metric and scope is
        :func:`metric_column` (absent ones are skipped).
    scopes
        ``overall`` and subgroup names.
    per_condition
        The long per-condition table; when it holds every ok seed of an arm, that arm's intervals are the
        hierarchical bootstrap of the mean over (seed, condition) values (seeds, then conditions within a
        seed), which stays inside the data's range; otherwise they are 95% t-intervals over seeds.

    Returns
    -------
    pandas.DataFrame
        ``dataset, backbone, arm, is_baseline, gene_space`` (``model.gene_space`` of its trials, ``""`` when
        unknown), ``fm_weights`` (``none``, ``random`` or ``pretrained``: its trials' FM weights) and
        ``backbone_weights`` (those weights in words, ``; ``-joined when its trials differ), ``n_trials, n``
        (ok trials), ``n_failed`` (not ok),
        ``ci_method`` (``bootstrap`` or ``t``) and per column ``c``: ``c_mean`` (mean over the ok seeds with a
        finite value), ``c_sd``, ``c_ci_low``, ``c_ci_high`` and ``c_n`` (those seeds), and ``test_pairing_noise_mse_de_mean`` when the trials report it. Failed trials count in
        ``n_trials``, never in means.
    """
    df = trials
    pcs = dict(iter(per_condition.groupby(list(_GROUP), sort=False))) if per_condition is not None else {}
    rows = []
    for key, g in df.groupby(list(_GROUP), sort=False):
        ok = g[g["status"] == "ok"]
        pc = pcs.get(key)
        boot = pc is not None and len(ok) > 0 and set(pc["seed"]) == set(ok["seed"])
        row: dict[str, object] = {"dataset": key[0], "backbone": key[1], "arm": key[2],
                                  "is_baseline": bool(g["is_baseline"].any()),
                                  "gene_space": ",".join(sorted(set(g["gene_space"]) - {""})),
                                  "fm_weights": ",".join(sorted(set(g["fm_weights"]) - {""})),
                                  "backbone_weights": "; ".join(sorted(set(g["backbone_weights"]) - {""})),
                                  "n_trials": len(g), "n": len(ok),
                                  "n_failed": len(g) - len(ok), "ci_method": "bootstrap" if boot else "t"}
        for scope in scopes:
            for metric in metrics:
                col = metric_column(metric, scope)
                if col not in g:
                    continue
                x = pd.to_numeric(ok[col], errors="coerce").to_numpy(dtype=float)
                x = x[np.isfinite(x)]
                mean, lo, hi = _t_interval(x)
                if boot and len(x):
                    lo, hi = _bootstrap_interval(pc, normalise_metric(metric), scope)
                row.update({f"{col}_mean": mean, f"{col}_sd": float(np.std(x, ddof=1)) if len(x) > 1 else math.nan,
                            f"{col}_ci_low": lo, f"{col}_ci_high": hi, f"{col}_n": len(x)})
        if PAIRING_NOISE_COLUMN in g:
            noise = pd.to_numeric(ok[PAIRING_NOISE_COLUMN], errors="coerce").to_numpy(dtype=float)
            noise = noise[np.isfinite(noise)]
            row[f"{PAIRING_NOISE_COLUMN}_mean"] = float(noise.mean()) if len(noise) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class LayoutTable:
    """A table in the paper's layout: rows = arms, columns = datasets × metrics, cells as text.

    Attributes
    ----------
    scope
        ``overall`` or a subgroup name.
    columns
        Column headers (``<metric>`` or ``<dataset>/<backbone> <metric>`` when there are several).
    rows
        ``(arm, is_baseline, cells, best)``: cell text ``mean [ci_low, ci_high] n=k/N`` (``†`` after a
        t-interval over seeds, used where per-condition values are missing) and whether the
        cell is the best of its column (lowest error, highest correlation).
    """

    scope: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, bool, tuple[str, ...], tuple[bool, ...]], ...]

    def to_frame(self) -> pd.DataFrame:
        """The table as strings, ``arm`` first."""
        return pd.DataFrame([[arm, *cells] for arm, _, cells, _ in self.rows], columns=["arm", *self.columns])


#: How an arm label names the FM weights of a model arm (``fm_weights`` of ``results.csv``).
_FM_LABELS = {"none": "no FM", "random": "random FM", "pretrained": "pretrained FM"}


def arm_label(arm: str, gene_spaces: set[str], fm_weights: set[str] = frozenset()) -> str:
    """``arm`` as a table shows it: ``arm [vocabulary, pretrained FM]``.

    The suffix names the vocabulary gene space when its trials ran in it (``model.gene_space``; the default
    ``measured`` space and an unknown one are not named) and the FM weights of its trials (``fm_weights``:
    ``no FM``, ``random FM``, ``pretrained FM``; pass none for a baseline, which has no FM to name).
    """
    shown = sorted(gene_spaces - {"", "measured"}) + [_FM_LABELS[w] for w in sorted(fm_weights) if w in _FM_LABELS]
    return f"{arm} [{', '.join(shown)}]" if shown else arm


def arm_of_label(label: str) -> str:
    """The arm behind an :func:`arm_label`."""
    return label.partition(" [")[0]


def format_cell(r: pd.Series, col: str, *, with_n: bool = True) -> str:
    """A summary cell as text: ``mean [ci_low, ci_high] n=k/N`` (``†``: t-interval over seeds; ``—``: no value).

    Parameters
    ----------
    r
        A :func:`summarise` row.
    col
        ``results.csv`` column (e.g. ``test_mse_de``).
    with_n
        Append ``n=<ok seeds with a value>/<trials>``.
    """
    mean = r.get(f"{col}_mean", math.nan)
    n = f" n={int(r.get(f'{col}_n', 0))}/{int(r['n_trials'])}" if with_n else ""
    if not np.isfinite(mean):
        return f"—{n}"
    ci = (f" [{r[f'{col}_ci_low']:.3g}, {r[f'{col}_ci_high']:.3g}]{'†' if r['ci_method'] == 't' else ''}"
          if np.isfinite(r[f"{col}_ci_low"]) else "")
    return f"{mean:.4g}{ci}{n}"


def layout_tables(summary: pd.DataFrame, metrics: Sequence[str], reference: str,
                  scopes: Sequence[str]) -> list[LayoutTable]:
    """The paper's tables, one per scope that has values: reference first, baselines last, best in bold.

    Parameters
    ----------
    summary
        :func:`summarise` output over the columns of ``metrics`` × ``scopes``.
    metrics
        Per-condition metric names.
    reference
        Reference arm (first row).
    scopes
        ``overall`` and subgroup names.
    """
    if summary.empty:
        return []
    keys = list(dict.fromkeys(zip(summary["dataset"], summary["backbone"], strict=True)))
    several = len(keys) > 1
    order = arm_order(summary, reference)
    by = summary.set_index(list(_GROUP))
    tables = []
    for scope in scopes:
        cols = [(k, m) for k in keys for m in metrics if f"{metric_column(m, scope)}_mean" in summary
                and summary.loc[(summary["dataset"] == k[0]) & (summary["backbone"] == k[1]),
                                f"{metric_column(m, scope)}_mean"].notna().any()]
        if not cols:
            continue
        best = {}
        for k, m in cols:
            values = summary.loc[(summary["dataset"] == k[0]) & (summary["backbone"] == k[1]),
                                 f"{metric_column(m, scope)}_mean"]
            best[(k, m)] = values.min() if lower_is_better(m) else values.max()
        rows = []
        for arm in order:
            cells, bold, base, spaces, weights = [], [], False, set(), set()
            for k, m in cols:
                col = metric_column(m, scope)
                if (*k, arm) not in by.index:
                    cells.append("")
                    bold.append(False)
                    continue
                r = by.loc[(*k, arm)]
                base = base or bool(r["is_baseline"])
                spaces.add(str(r.get("gene_space", "")))
                weights.update(str(r.get("fm_weights", "")).split(","))
                cells.append(format_cell(r, col))
                bold.append(bool(np.isfinite(r[f"{col}_mean"]) and r[f"{col}_mean"] == best[(k, m)]))
            rows.append((arm_label(arm, spaces, set() if base else weights), base, tuple(cells), tuple(bold)))
        headers = tuple(f"{'/'.join(p for p in k if p)} {m}" if several else m for k, m in cols)
        tables.append(LayoutTable(scope=scope, columns=headers, rows=tuple(rows)))
    return tables
