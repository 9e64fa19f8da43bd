"""The sweep summary as a rich console table (what ``pertadapt sweep`` and ``pertadapt report`` print)."""

from __future__ import annotations

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pertadapt.report.document import SweepReport
from pertadapt.report.tables import PAIRING_NOISE_COLUMN, arm_label, arm_order, format_cell, metric_column

__all__ = ["cost_table", "print_summary", "summary_table"]


def summary_table(report: SweepReport) -> Table:
    """Overall test metrics per dataset × backbone × arm (mean [95% CI], as in the report), plus the verdict.

    Columns: ``dataset`` (when there are several), ``arm`` (with its FM weights, as the report's tables label
    it: :func:`~pertadapt.report.tables.arm_label`), ``n`` (ok/all trials), one per metric, the
    pairing noise of the test controls (``mse_de`` they add, mean over seeds; when reported) and the
    paired-test verdict on the headline metric.
    """
    s = report.summary
    several = s[["dataset", "backbone"]].drop_duplicates().shape[0] > 1 if not s.empty else False
    table = Table(title=f"{report.sweep.name}: test metrics, mean over seeds [95% CI] "
                        f"(reference: {report.sweep.reference})")
    if several:
        table.add_column("dataset", no_wrap=True)
    table.add_column("arm", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True, min_width=3)
    for m in report.metrics:
        table.add_column(m, justify="right", overflow="fold")
    noise = f"{PAIRING_NOISE_COLUMN}_mean"
    with_noise = noise in s
    if with_noise:
        table.add_column("pairing noise (mse_de)", justify="right", overflow="fold")
    table.add_column(f"vs {report.sweep.reference} ({report.metrics[0]})", overflow="fold")
    verdicts = {(r["dataset"], r["backbone"], r["arm"]): r["verdict"]
                for _, r in report.tests[report.tests["metric"] == report.metrics[0]].iterrows()}
    if s.empty:  # a results.csv without trials
        return table
    order = {a: i for i, a in enumerate(arm_order(report.sweep.trials, report.sweep.reference))}
    for _, r in s.assign(_o=s["arm"].map(order)).sort_values(["dataset", "backbone", "_o"]).iterrows():
        cells = [format_cell(r, metric_column(m), with_n=False) for m in report.metrics]
        if with_noise:
            cells.append(f"{r[noise]:.3g}" if np.isfinite(r[noise]) else "—")
        style = "dim" if r["is_baseline"] else "bold" if r["arm"] == report.sweep.reference else None
        verdict = "reference" if r["arm"] == report.sweep.reference else verdicts.get(
            (r["dataset"], r["backbone"], r["arm"]), "")
        where = ["/".join(p for p in (r["dataset"], r["backbone"]) if p)] if several else []
        weights = set() if r["is_baseline"] else set(str(r["fm_weights"]).split(","))
        label = arm_label(str(r["arm"]), set(str(r["gene_space"]).split(",")), weights)
        table.add_row(*where, escape(label), f"{r['n']}/{r['n_trials']}", *cells, verdict, style=style)
    return table


def cost_table(report: SweepReport) -> Table:
    """The report's "Cost per arm" table (:attr:`~pertadapt.report.document.SweepReport.cost_table`)."""
    headers, rows = report.cost_table
    table = Table(title=f"{report.sweep.name}: cost per arm (measured; planned GPU-hours from plan.json)",
                  box=box.SIMPLE_HEAD)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    return table


def print_summary(report: SweepReport, console: Console | None = None) -> None:
    """Print :func:`summary_table` and :func:`cost_table`; off a terminal (logs, CI) the console is as wide as the
    table needs."""
    table = summary_table(report)
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(160, Console(width=1000).measure(table).maximum))
    console.print(table)
    if report.cost_table[1]:
        console.print(cost_table(report))
    failed = report.sweep.not_ok
    for _, r in failed.iterrows():
        console.print(f"[red]{r['status']}[/red] {r['trial']}: {r['error']}")
