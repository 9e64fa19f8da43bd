"""The sweep report on disk: ``report.html`` (self-contained), ``report.md``, CSVs and PNGs.

Entry point: :func:`write_sweep_report` (``pertadapt report`` and the end of ``pertadapt sweep``).
"""

from __future__ import annotations

import base64
import html as html_lib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from pertadapt.files import atomic_write_bytes, atomic_write_text
from pertadapt.report.bootstrap import BOOTSTRAP_RESAMPLES
from pertadapt.report.document import SweepReport, build_report
from pertadapt.report.stats import ALPHA
from pertadapt.report.tables import LayoutTable, arm_of_label, describe_metric, load_sweep

__all__ = ["ReportPaths", "render_html", "render_layout_markdown", "render_markdown", "write_sweep_report"]

log = logging.getLogger(__name__)

_TRIAL_COLUMNS = ("trial", "dataset", "backbone", "arm", "seed", "status", "attempts", "error")
_TEST_COLUMNS = ("dataset", "backbone", "arm", "metric", "n_pairs", "mean_diff", "ci_low", "ci_high", "p", "p_holm",
                 "verdict")
_METHOD = (f"Paired tests: pairs are the (test condition, seed) combinations present in both the arm and the "
           f"reference; Wilcoxon signed-rank on arm − reference (two-sided, zeros dropped); p-values Holm-corrected "
           f"across every row of the table; verdicts at Holm {ALPHA}. CIs of the mean difference: hierarchical "
           f"bootstrap ({BOOTSTRAP_RESAMPLES} resamples of seeds, then conditions within each seed; percentile "
           f"95%). Table cells: mean over successful seeds [95% CI: the same hierarchical bootstrap of the mean over "
           f"(seed, condition) values; † marks a t-interval over seeds, used where per-condition files are "
           f"missing] n=successful/all trials; "
           f"bold = best in its column (lowest error, highest correlation); grey rows are baselines.")

_HTML = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pertadapt report: {{ r.sweep.name }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
tr.baseline td{color:#888;background:#fafafa} tr.reference td:first-child{font-weight:bold}
td.best{font-weight:bold} .alert{background:#fdecea;border:1px solid #e0a9a4;padding:.7em 1em}
.worse{color:#b2182b} .better{color:#1a7837} figure{margin:1em 0} img{max-width:100%}
figcaption{font-size:13px;color:#555} .wrap{overflow-x:auto} code{background:#f5f5f5}
</style></head><body>
<h1>Ablation report: {{ r.sweep.name }}</h1>
<p>{{ counts }} Reference arm: <b>{{ r.sweep.reference }}</b>. Metrics: {{ metrics | join(", ") }}.</p>
{% if not n_ok %}<p class="alert">{{ all_failed }}</p>{% endif %}
{% if r.sentences %}<h2>Findings</h2><ul id="findings">
{% for s in sentences %}<li>{{ s }}</li>{% endfor %}</ul>{% endif %}
{% if r.fm_weights %}<h2>FM weights</h2><div class="wrap"><table id="fm-weights">
<thead><tr><th>arm</th><th>FM</th><th>weights</th></tr></thead><tbody>
{% for arm, fm, weights in r.fm_weights %}<tr><td>{{ arm }}</td><td>{{ fm }}</td><td style="text-align:left">{{ weights }}</td></tr>
{% endfor %}</tbody></table></div>{% endif %}
{% if cost_rows %}<h2>Cost per arm</h2><div class="wrap"><table id="cost-per-arm">
<thead><tr>{% for c in cost_headers %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in cost_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</tbody></table></div>
<p>{{ cost_note }}</p>{% endif %}
{% if r.notes %}<h2>Notes</h2><ul>{% for n in r.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
{% for t in tables %}<h2>Test metrics: {{ t.scope }}</h2><div class="wrap"><table>
<thead><tr><th>arm</th>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for arm, base, cells, best in t.rows %}<tr class="{{ 'baseline' if base }}{{ ' reference' if arm_of_label(arm) == r.sweep.reference }}">
<td>{{ arm }}</td>{% for c, b in zip(cells, best) %}<td class="{{ 'best' if b }}">{{ c }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table></div>{% endfor %}
{% if tests %}<h2>Paired tests against {{ r.sweep.reference }}</h2><div class="wrap"><table>
<thead><tr>{% for c in test_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in tests %}<tr>{% for c in row[:-1] %}<td>{{ c }}</td>{% endfor %}
<td class="{{ row[-1] }}">{{ row[-1] }}</td></tr>{% endfor %}</tbody></table></div>{% endif %}
{% for f in figures %}<figure><img src="data:image/png;base64,{{ f.b64 }}" alt="{{ f.caption }}">
<figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% if failed %}<h2>Failed, stopped or missing trials ({{ failed | length }})</h2><div class="wrap"><table>
<thead><tr>{% for c in failed_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in failed %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</tbody></table></div>{% endif %}
<h2>Method</h2><p>{{ method }}</p>
<p>Source: <code>{{ r.sweep.root }}</code></p>
</body></html>
""")


_COST_NOTE = ("Measured per arm over its trials that ran (failed ones included): wall seconds; device-seconds are "
              "GPU-seconds (wall seconds × workers × GPUs per worker) for trials that asked for GPUs, else the CPU "
              "seconds their processes used (summed over ranks; a baseline's fit and evaluation). Planned GPU-hours "
              "per trial: the sweep's plan.json at its stated throughput.")


def _fmt(x: object) -> str:
    if isinstance(x, float | np.floating):
        return "" if not np.isfinite(x) else f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.4g}"
    return str(x)


def _counts(r: SweepReport) -> str:
    t = r.sweep.trials
    n_ok = int((t["status"] == "ok").sum())
    seeds = sorted(t["seed"].unique().tolist())
    return (f"{len(t)} trials: {n_ok} ok, {len(t) - n_ok} failed/stopped/missing; {t['arm'].nunique()} arms; "
            f"seeds {', '.join(map(str, seeds))}.")


def _all_failed(r: SweepReport) -> str:
    return (f"Every one of the {len(r.sweep.trials)} trials failed: there are no metrics to compare. "
            "The errors are listed below.")


def _shown(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` of ``df`` that exist and are not all empty (no blank ``backbone`` column)."""
    return [c for c in columns if c in df and not (df[c].astype(str) == "").all()]


def _rows(df: pd.DataFrame, columns: Sequence[str]) -> list[list[str]]:
    cols = _shown(df, columns)
    return [[_fmt(v) for v in row] for row in df[cols].itertuples(index=False)]


def render_html(r: SweepReport) -> str:
    """The self-contained HTML page (figures inline as base64 PNG, no external resources)."""
    failed_cols = _shown(r.sweep.not_ok, _TRIAL_COLUMNS)
    return _HTML.render(
        r=r, counts=_counts(r), n_ok=len(r.sweep.ok), all_failed=_all_failed(r), zip=zip, arm_of_label=arm_of_label,
        metrics=[describe_metric(m) for m in r.metrics],
        sentences=[s.replace("`", "") for s in r.sentences], tables=r.tables,
        test_columns=_shown(r.tests, _TEST_COLUMNS), tests=_rows(r.tests, _TEST_COLUMNS),
        figures=[{"caption": f.caption, "b64": base64.b64encode(f.png).decode()} for f in r.figures],
        failed_columns=failed_cols, failed=_rows(r.sweep.not_ok, failed_cols), method=_METHOD,
        cost_headers=r.cost_table[0], cost_rows=r.cost_table[1], cost_note=_COST_NOTE)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return html_lib.escape(str(s)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_layout_markdown(t: LayoutTable, reference: str) -> str:
    """A paper-layout table in Markdown: reference in bold, baselines marked, best cells in bold."""
    rows = []
    for arm, base, cells, best in t.rows:
        name = f"**{arm}**" if arm_of_label(arm) == reference else f"*{arm}* (baseline)" if base else arm
        rows.append([name, *(f"**{c}**" if b else c for c, b in zip(cells, best, strict=True))])
    return _md_table(["arm", *t.columns], rows)


def render_markdown(r: SweepReport) -> str:
    """``report.md``: the same content as the HTML, figures linked as the PNG files next to it."""
    parts = [f"# Ablation report: {r.sweep.name}", "",
             f"{_counts(r)} Reference arm: **{r.sweep.reference}**. Metrics: {', '.join(describe_metric(m) for m in r.metrics)}.", ""]
    if r.sweep.ok.empty:
        parts += [f"> **{_all_failed(r)}**", ""]
    if r.sentences:
        parts += ["## Findings", "", *(f"- {s}" for s in r.sentences), ""]
    if r.fm_weights:
        parts += ["## FM weights", "", _md_table(["arm", "FM", "weights"], r.fm_weights), ""]
    if r.cost_table[1]:
        parts += ["## Cost per arm", "", _md_table(*r.cost_table), "", _COST_NOTE, ""]
    if r.notes:
        parts += ["## Notes", "", *(f"- {n}" for n in r.notes), ""]
    for t in r.tables:
        parts += [f"## Test metrics: {t.scope}", "", render_layout_markdown(t, r.sweep.reference), ""]
    if not r.tests.empty:
        cols = _shown(r.tests, _TEST_COLUMNS)
        parts += [f"## Paired tests against {r.sweep.reference}", "", _md_table(cols, _rows(r.tests, cols)), ""]
    for f in r.figures:
        parts += [f"![{f.caption}]({f.name})", "", f"*{f.caption}*", ""]
    if not r.sweep.not_ok.empty:
        cols = _shown(r.sweep.not_ok, _TRIAL_COLUMNS)
        parts += [f"## Failed, stopped or missing trials ({len(r.sweep.not_ok)})", "",
                  _md_table(cols, _rows(r.sweep.not_ok, cols)), ""]
    parts += ["## Method", "", _METHOD, "", f"Source: `{r.sweep.root}`", ""]
    return "\n".join(parts)


@dataclass(frozen=True)
class ReportPaths:
    """The files of a written report and the report itself.

    Attributes
    ----------
    directory
        Where everything went (``SWEEP/report`` by default).
    html, markdown
        ``report.html`` (self-contained) and ``report.md``.
    summary_csv, paired_tests_csv, per_condition_csv
        ``summary.csv`` (one row per dataset × backbone × arm, with its measured cost:
        :func:`~pertadapt.report.tables.cost_per_arm`), ``paired_tests.csv``, ``per_condition.csv``
        (long).
    tables
        ``table_<scope>.csv``: the paper-layout tables as text.
    figures
        The PNGs.
    report
        The content (for the console table and W&B).
    """

    directory: Path
    html: Path
    markdown: Path
    summary_csv: Path
    paired_tests_csv: Path
    per_condition_csv: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]
    report: SweepReport


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def write_sweep_report(sweep_dir: Path, *, out: Path | None = None, metrics: Sequence[str] | None = None,
                       reference: str | None = None) -> ReportPaths:
    """Analyse a sweep directory and write its report (every file atomically).

    Parameters
    ----------
    sweep_dir
        Directory with ``results.csv`` (and ``sweep.json``, the run directories' per-condition tables).
    out
        Output directory (default ``sweep_dir/report``).
    metrics
        Metrics to tabulate and test (``mse_de`` or ``test_mse_de``); default the key metrics plus the
        truth metrics on simulated data. The first is the headline of the sentences.
    reference
        Reference arm (default ``sweep.json``'s ``reference_arm``, else ``full``).

    Returns
    -------
    ReportPaths
        What was written, plus the report content.

    Raises
    ------
    DataError
        ``results.csv`` missing or malformed.
    ConfigError
        Unknown metric or reference arm.
    """
    sweep_dir = Path(sweep_dir)
    report = build_report(load_sweep(sweep_dir, reference), metrics)
    directory = Path(out) if out is not None else sweep_dir / "report"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"summary": directory / "summary.csv", "tests": directory / "paired_tests.csv",
             "per_condition": directory / "per_condition.csv"}
    _write_csv(paths["summary"], report.summary)
    _write_csv(paths["tests"], report.tests)
    _write_csv(paths["per_condition"], report.sweep.per_condition)
    tables = []
    for t in report.tables:
        tables.append(directory / f"table_{t.scope}.csv")
        _write_csv(tables[-1], t.to_frame())
    figures = []
    for f in report.figures:
        figures.append(directory / f.name)
        atomic_write_bytes(figures[-1], f.png)
    atomic_write_text(directory / "report.md", render_markdown(report))
    atomic_write_text(directory / "report.html", render_html(report))
    log.info("report: %d trials (%d ok), %d paired tests, %d figures -> %s", len(report.sweep.trials),
             len(report.sweep.ok), len(report.tests), len(figures), directory / "report.html")
    return ReportPaths(directory=directory, html=directory / "report.html", markdown=directory / "report.md",
                       summary_csv=paths["summary"], paired_tests_csv=paths["tests"],
                       per_condition_csv=paths["per_condition"], tables=tuple(tables), figures=tuple(figures),
                       report=report)

