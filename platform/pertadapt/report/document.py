"""What the report says, independent of its format: tables, verdict sentences, figures and notes.

:func:`build_report` turns a loaded sweep into a :class:`SweepReport`; :mod:`pertadapt.report.html`
renders it as HTML and Markdown and writes the files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pertadapt.config import ConfigError
from pertadapt.config.metrics import registered_metrics
from pertadapt.data.io import DataError
from pertadapt.files import sha256_file
from pertadapt.report import plots
from pertadapt.report.results import RESULTS_FILE
from pertadapt.report.stats import paired_tests, sentence
from pertadapt.report.tables import (
    COST_COLUMNS,
    OVERALL,
    PAIRING_NOISE_COLUMN,
    SUBGROUPS,
    LayoutTable,
    SweepData,
    arm_order,
    cost_per_arm,
    default_metrics,
    layout_tables,
    metric_column,
    normalise_metric,
    summarise,
)
from pertadapt.rundir import RunDir

__all__ = ["N_DE_PLOT", "N_DE_PLOT_CONDITIONS", "Figure", "SweepReport", "build_report"]

log = logging.getLogger(__name__)

#: Test perturbations shown in the predicted-vs-observed figure.
N_DE_PLOT_CONDITIONS = 4
#: Top DE genes per perturbation in that figure.
N_DE_PLOT = 20


@dataclass(frozen=True)
class Figure:
    """One PNG of the report: file name, caption and bytes."""

    name: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class SweepReport:
    """Everything the report shows.

    Attributes
    ----------
    sweep
        The loaded sweep.
    metrics
        Per-condition metric names, the first one is the headline (sentences, learning curves).
    scopes
        ``overall`` and the subgroups with values.
    summary
        :func:`~pertadapt.report.tables.summarise` rows over metrics × scopes.
    tests
        :func:`~pertadapt.report.stats.paired_tests` rows.
    tables
        Paper-layout tables (one per scope).
    sentences
        One sentence per (dataset, backbone, arm) on the headline metric.
    figures
        The PNG figures.
    notes
        What was skipped and why (figures that could not be drawn, trials without per-condition data).
    cost
        :func:`~pertadapt.report.tables.cost_per_arm`: the measured wall and device seconds of each
        (dataset, backbone, arm), and the plan's GPU-hours per trial when ``plan.json`` has them (its columns
        are also in ``summary``).
    cost_table
        ``cost`` as text, ``(headers, rows)``: what the HTML, Markdown and console "Cost per arm" tables show.
    fm_weights
        One row per model arm (per dataset/backbone when there are several, in display order): the arm,
        its FM weights (``none``, ``random``, ``pretrained``) and those weights in words (a pretrained
        checkpoint's source data, cells, steps and weights digest).
    """

    sweep: SweepData
    metrics: tuple[str, ...]
    scopes: tuple[str, ...]
    summary: pd.DataFrame
    tests: pd.DataFrame
    tables: tuple[LayoutTable, ...]
    sentences: tuple[str, ...]
    figures: tuple[Figure, ...]
    notes: tuple[str, ...] = field(default=())
    fm_weights: tuple[tuple[str, str, str], ...] = field(default=())
    cost: pd.DataFrame = field(default_factory=pd.DataFrame)
    cost_table: tuple[tuple[str, ...], tuple[tuple[str, ...], ...]] = field(default=((), ()))


def _check_metrics(sweep: SweepData, metrics: Sequence[str]) -> None:
    if sweep.ok.empty:
        return
    known = {normalise_metric(c) for c in sweep.trials if c.startswith("test_")} | set(sweep.per_condition["metric"])
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ConfigError(f"--metric {unknown[0]!r}: not in {sweep.root / RESULTS_FILE} nor any run's per-condition table; "
                          f"known: {', '.join(sorted(k for k in known if not k.startswith(('val_', 'train_'))))}")


def _scopes(sweep: SweepData, metrics: Sequence[str]) -> list[str]:
    extra = sorted(set(sweep.per_condition["subgroup"]) - set(SUBGROUPS) - {""})
    return [OVERALL, *(s for s in (*SUBGROUPS, *extra) if any(metric_column(m, s) in sweep.trials for m in metrics))]


def _describe_arms(trials: pd.DataFrame, reference: str) -> dict[str, str]:
    """Model arm → the ``cfg.*`` values that differ from the reference (``key: value``, at most three; a key the
    arm leaves unset reads ``unset``). Baselines are not described: their name says what they are."""
    cfg = [c for c in trials if c.startswith("cfg.")]
    ref = trials[trials["arm"] == reference]
    if ref.empty or not cfg:
        return {}
    base = ref.iloc[0]
    out = {}
    for arm, g in trials[~trials["is_baseline"].astype(bool)].groupby("arm", sort=False):
        row = g.iloc[0]
        diff = [f"{c.removeprefix('cfg.')}: {'unset' if pd.isna(row[c]) else row[c]}" for c in cfg
                if str(row[c]) != str(base[c]) and not (pd.isna(row[c]) and pd.isna(base[c]))]
        if arm != reference and diff:
            out[str(arm)] = ", ".join(diff[:3]) + (", …" if len(diff) > 3 else "")
    return out


def _fm_weights(summary: pd.DataFrame, arms: Sequence[str]) -> list[tuple[str, str, str]]:
    """(arm, ``fm_weights``, ``backbone_weights``) of each model arm, ``<dataset>/<backbone> arm`` when several."""
    if summary.empty:
        return []
    several = summary[["dataset", "backbone"]].drop_duplicates().shape[0] > 1
    order = {a: i for i, a in enumerate(arms)}
    rows = []
    models = summary[~summary["is_baseline"].astype(bool)]
    for _, r in models.assign(_o=models["arm"].map(order)).sort_values(["dataset", "backbone", "_o"]).iterrows():
        where = "/".join(p for p in (r["dataset"], r["backbone"]) if p)
        rows.append((f"{where} {r['arm']}" if several and where else str(r["arm"]), str(r["fm_weights"]) or "unknown",
                     str(r["backbone_weights"]) or "not recorded"))
    return rows


def _num(x: float, unit: str = "") -> str:
    return f"{x:,.1f}{unit}" if abs(x) >= 100 else f"{x:.3g}{unit}"


def _cost_table(cost: pd.DataFrame, arms: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The cost per arm as text: ``arm`` (``<dataset>/<backbone> arm`` when several), ``trials`` (ran/all),
    wall seconds (mean, total), device-seconds (total, GPU-s and/or CPU-s) and, when the plan has costs, the
    planned and measured GPU-hours per trial."""
    if cost.empty:
        return (), ()
    several = cost[["dataset", "backbone"]].drop_duplicates().shape[0] > 1
    with_plan = bool(cost["plan_gpu_h_per_trial"].notna().any())
    headers = ["arm", "trials", "wall s (mean)", "wall s (total)", "device-s (total)"]
    if with_plan:
        headers += ["planned GPU-h/trial", "measured GPU-h/trial"]
    order = {a: i for i, a in enumerate(arms)}
    rows = []
    for _, r in cost.assign(_o=cost["arm"].map(order)).sort_values(["dataset", "backbone", "_o"]).iterrows():
        where = "/".join(p for p in (r["dataset"], r["backbone"]) if p)
        device = " + ".join(_num(r[c], unit) for c, unit in (("gpu_s_total", " GPU-s"), ("cpu_s_total", " CPU-s"))
                            if np.isfinite(r[c])) or "—"
        row = [f"{where} {r['arm']}" if several and where else str(r["arm"]), f"{r['n_ran']}/{r['n_trials']}",
               *(_num(r[c]) if np.isfinite(r[c]) else "—" for c in ("wall_s_mean", "wall_s_total")), device]
        if with_plan:
            row += [f"{r[c]:.3g}" if np.isfinite(r[c]) else "—" for c in ("plan_gpu_h_per_trial", "gpu_h_per_trial")]
        rows.append(tuple(row))
    return tuple(headers), tuple(rows)


def _consistency_notes(sweep: SweepData, metrics: Sequence[str], scopes: Sequence[str]) -> list[str]:
    """Trials whose per-condition means differ from their ``results.csv`` values (by > 1e-9, relative).

    Both come from the same metric function, so a difference means mixed-up or stale files.
    """
    pc = sweep.per_condition[sweep.per_condition["metric"].isin(list(metrics))]
    if pc.empty:
        return []
    overall = pc.groupby(["dataset", "backbone", "arm", "seed", "metric"])["value"].mean()
    by_group = pc.groupby(["dataset", "backbone", "arm", "seed", "subgroup", "metric"])["value"].mean()
    bad = []
    for _, r in sweep.ok.iterrows():
        key = (r["dataset"], r["backbone"], r["arm"], r["seed"])
        for scope in scopes:
            for m in metrics:
                col = metric_column(m, scope)
                idx = (*key, m) if scope == OVERALL else (*key, scope, m)
                means = overall if scope == OVERALL else by_group
                if col not in r or idx not in means.index or not np.isfinite(r[col]):
                    continue
                if abs(means[idx] - r[col]) > 1e-9 * max(1.0, abs(r[col])):
                    bad.append(f"{r['trial']} {col}: results.csv {r[col]:.10g}, per-condition mean "
                               f"{means[idx]:.10g}")
    return [f"per-condition data disagrees with results.csv for {len(bad)} value(s) (mixed-up or stale files?): "
            + "; ".join(bad[:5]) + ("; …" if len(bad) > 5 else "")] if bad else []


def _read_history(run: RunDir) -> pd.DataFrame | None:
    rows = run.history()
    if not rows:
        return None
    h = pd.DataFrame(rows)
    return h.drop_duplicates("epoch", keep="last").sort_values("epoch") if "epoch" in h else None


def _dataset_of(run: RunDir) -> Path:
    """The prepared dataset a run was trained on: the provenance's ``data_path``, else the config's
    ``data.path``; its SHA-256 must still equal the provenance's ``data_sha256`` when that is recorded.

    Raises
    ------
    DataError
        No recorded path, the file is not here, or it changed since the run.
    """
    prov = run.provenance()
    path = prov.get("data_path") or (run.config().get("data") or {}).get("path")
    if not path or not Path(path).is_file():
        raise DataError(f"{run.path}: the dataset path recorded in {run.provenance_file.name} (data_path) or "
                        f"{run.config_file.name} (data.path), {path!r}, is not a file here")
    if prov.get("data_sha256") and sha256_file(path) != prov["data_sha256"]:
        raise DataError(f"{path}: changed since the run (SHA-256 differs from {run.provenance_file})")
    return Path(path)


def _de_figure(sweep: SweepData, key: tuple[str, str], arms: Sequence[str], colours: dict[str, str],
               label: str, title: str) -> Figure:
    """Predicted vs observed top-DE changes of :data:`N_DE_PLOT_CONDITIONS` test perturbations (one seed)."""
    ok = sweep.ok[(sweep.ok["dataset"] == key[0]) & (sweep.ok["backbone"] == key[1])]
    ref = ok[ok["arm"] == sweep.reference]
    if ref.empty:
        raise DataError(f"no successful {sweep.reference!r} trial")
    first = ref.sort_values("seed").iloc[0]
    data_path = _dataset_of(RunDir(first["run_path"]))
    from pertadapt.data.dataset import read_perturb_data  # imports torch: only when there is data to read
    from pertadapt.data.summaries import read_predictions

    data = read_perturb_data(data_path, for_training=False)
    genes = list(data.genes)
    observed_means = data.condition_means
    ctrl = data.ctrl_mean
    de = {c: idx[:N_DE_PLOT] for c, idx in data.de_idx.items()}
    pc = sweep.per_condition
    mine = pc[(pc["dataset"] == key[0]) & (pc["backbone"] == key[1]) & (pc["arm"] == sweep.reference)
              & (pc["seed"] == first["seed"])].drop_duplicates("condition")
    by_group = mine.groupby("subgroup", sort=True)["condition"].apply(sorted)
    picked: list[str] = [c[0] for c in by_group if c]  # one per subgroup first, then fill up
    picked += [c for c in sorted(mine["condition"]) if c not in picked]
    picked = [c for c in picked if c in de and c in observed_means][:N_DE_PLOT_CONDITIONS]
    if not picked:
        raise DataError("no test condition with observed cells and a DE list")
    observed = {c: ([genes[i] for i in de[c]], observed_means[c][de[c]] - ctrl[de[c]]) for c in picked}
    predicted: dict[str, dict[str, np.ndarray]] = {}
    for arm in arms:
        run = ok[(ok["arm"] == arm) & (ok["seed"] == first["seed"])]
        path = RunDir(run.iloc[0]["run_path"]).predictions_file if not run.empty else None
        if path is None or not path.is_file():
            continue
        conds, matrix = read_predictions(path, genes)
        rows = dict(zip(conds, matrix, strict=True))
        predicted[arm] = {c: rows[c][de[c]] - ctrl[de[c]] for c in picked if c in rows}
    return Figure(f"de_changes{label}.png",
                  f"Predicted vs observed change from control on the top-{N_DE_PLOT} DE genes of "
                  f"{len(picked)} test perturbations (seed {first['seed']}; bars observed, dots predicted)",
                  plots.de_changes_plot(observed, predicted, colours, f"{title}: top-DE changes"))


def _figures(sweep: SweepData, metrics: Sequence[str], scopes: Sequence[str], summary: pd.DataFrame,
             tests: pd.DataFrame, arms: Sequence[str]) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    notes: list[str] = []
    baselines = set(sweep.trials.loc[sweep.trials["is_baseline"], "arm"])
    colours = plots.arm_colours(arms, baselines)
    keys = list(dict.fromkeys(zip(summary["dataset"], summary["backbone"], strict=True)))
    for key in keys:
        where = "/".join(p for p in key if p)
        label = "_" + "_".join(p for p in key if p) if where else ""
        title = where or sweep.name
        s = summary[(summary["dataset"] == key[0]) & (summary["backbone"] == key[1])]
        ok = sweep.ok[(sweep.ok["dataset"] == key[0]) & (sweep.ok["backbone"] == key[1])]
        if ok.empty:
            continue
        t = tests[(tests["dataset"] == key[0]) & (tests["backbone"] == key[1])]
        if t["mean_diff"].notna().any():
            figures.append(Figure(f"forest{label}.png",
                                  f"{title}: mean difference to {sweep.reference} over (condition, seed) pairs, "
                                  "hierarchical-bootstrap 95% CI; green better, red worse, grey no difference "
                                  "(Holm 0.05)", plots.forest_plot(t, metrics, f"{title}: arm − {sweep.reference}")))
        else:
            notes.append(f"{title}: no forest plot (no paired per-condition data)")
        # metrics with a value per subgroup (all of them when the split has no subgroups)
        shown = [m for m in metrics if sum(f"{metric_column(m, sc)}_mean" in s for sc in scopes) > 1
                 or (len(scopes) == 1 and f"{metric_column(m)}_mean" in s)]
        if shown:
            figures.append(Figure(f"subgroups{label}.png",
                                  f"{title}: mean over seeds per subgroup (bars) and the individual seeds (dots)",
                                  plots.subgroup_bars_plot(s, ok, shown, scopes, arms, colours, title)))
        else:
            notes.append(f"{title}: no subgroup bars (none of {', '.join(metrics)} has results.csv columns per "
                         "subgroup)")
        histories = {a: [h for r in ok[ok["arm"] == a]["run_path"] if (h := _read_history(RunDir(r))) is not None]
                     for a in arms}
        histories = {a: h for a, h in histories.items() if h}
        val = f"val_{metrics[0]}"
        if histories and any(val in h for hs in histories.values() for h in hs):
            figures.append(Figure(f"learning_curves{label}.png",
                                  f"{title}: train loss and {val} per epoch (thin: seeds, thick: mean)",
                                  plots.learning_curves_plot(histories, val, colours, title)))
        else:
            notes.append(f"{title}: no learning curves (no epoch history with {val})")
        try:
            figures.append(_de_figure(sweep, key, [a for a in arms if a not in baselines] or list(arms), colours,
                                      label, title))
        except (DataError, OSError) as e:
            notes.append(f"{title}: no predicted-vs-observed DE figure ({e})")
        pairs = [(metric_column(m.name), metric_column(f"truth_{m.name}")) for m in registered_metrics()
                 if m.report_truth and f"{metric_column(f'truth_{m.name}')}_mean" in s
                 and f"{metric_column(m.name)}_mean" in s]
        if pairs:
            figures.append(Figure(f"truth_vs_observed{label}.png",
                                  f"{title} (simulated): error against the observed means (plain) and against "
                                  "the simulator's noise-free truth (hatched), mean over seeds",
                                  plots.truth_vs_observed_plot(s, pairs, arms, colours, title)))
    return figures, notes


def build_report(sweep: SweepData, metrics: Sequence[str] | None = None) -> SweepReport:
    """Tables, tests, sentences and figures of a loaded sweep.

    Parameters
    ----------
    sweep
        From :func:`~pertadapt.report.tables.load_sweep`.
    metrics
        Metric names (``mse_de`` or ``test_mse_de``); default the metric registry's report metrics
        (:func:`~pertadapt.report.tables.default_metrics`).

    Raises
    ------
    ConfigError
        A metric that no trial has; a reference arm that is not in the sweep.
    """
    metrics = [normalise_metric(m) for m in metrics] if metrics else default_metrics(sweep.trials)
    _check_metrics(sweep, metrics)
    if not sweep.trials.empty and sweep.reference not in set(sweep.trials["arm"]):
        raise ConfigError(f"reference arm {sweep.reference!r} is not in {sweep.root / RESULTS_FILE}; arms: "
                          f"{', '.join(dict.fromkeys(sweep.trials['arm']))}")
    scopes = _scopes(sweep, metrics)
    summary = summarise(sweep.trials, metrics, scopes, sweep.per_condition)
    cost = cost_per_arm(sweep.trials, sweep.planned_gpu_hours)
    if not summary.empty:
        summary = summary.merge(cost[["dataset", "backbone", "arm", *COST_COLUMNS]], on=["dataset", "backbone", "arm"],
                                how="left")
    arms = arm_order(sweep.trials, sweep.reference)
    tests = paired_tests(sweep.per_condition, sweep.reference, metrics, arms=arms)
    described = _describe_arms(sweep.trials, sweep.reference)
    headline = tests[tests["metric"] == metrics[0]]
    sentences = [sentence(r, described.get(r["arm"], "")) for _, r in headline.iterrows()]
    notes = []
    if sweep.missing_per_condition:
        notes.append(f"{len(sweep.missing_per_condition)} ok trial(s) have no per-condition table and are not in the "
                     f"paired tests: {', '.join(sweep.missing_per_condition)}")
    notes += _consistency_notes(sweep, metrics, scopes)
    noise = f"{PAIRING_NOISE_COLUMN}_mean"
    if noise in summary and summary[noise].notna().any():
        per_arm = ", ".join(f"{r['arm']} {r[noise]:.3g}" for _, r in summary.iterrows() if np.isfinite(r[noise]))
        notes.append(f"pairing noise of the test controls (mse_de they add to every arm, mean over seeds; 0 = the "
                     f"whole control pool): {per_arm}")
    if not sweep.ok.empty and sweep.ok[sweep.ok["arm"] == sweep.reference].empty:
        notes.append(f"the reference arm {sweep.reference!r} has no successful trial: nothing could be tested")
    figures, fig_notes = _figures(sweep, metrics, scopes, summary, tests, arms) if not sweep.ok.empty else ([], [])
    return SweepReport(sweep=sweep, metrics=tuple(metrics), scopes=tuple(scopes), summary=summary, tests=tests,
                       tables=tuple(layout_tables(summary, metrics, sweep.reference, scopes)),
                       sentences=tuple(sentences), figures=tuple(figures), notes=tuple(notes + fig_notes),
                       fm_weights=tuple(_fm_weights(summary, arms)), cost=cost, cost_table=_cost_table(cost, arms))
