"""Offline HTML report of a sweep: summary table, paired tests, and plots (self-contained file)."""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from pertadapt.report.tables import KEY_METRICS, TRUTH_METRICS, load_results, paired_tests, summarise

__all__ = ["write_report"]

_TEMPLATE = jinja2.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>pertadapt report: {{ name }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3} td:first-child{text-align:left}
.ref{font-weight:bold} .baseline{color:#666}</style></head><body>
<h1>Ablation report: {{ name }}</h1>
<p>{{ n_trials }} finished trials ({{ n_failed }} failed), {{ n_arms }} arms, seeds {{ seeds }}.
Reference arm: <b>{{ reference }}</b>. Values are mean ± sd over seeds, [95% t-interval half-width];
in the plot, bars are means, whiskers the 95% t-interval and dots the individual seeds.
Metrics follow GEARS semantics (lower MSE and higher Pearson are better). On simulated data,
<code>test_truth_*</code> columns score the predictions against the simulator's noise-free truth.</p>
<h2>Summary</h2>{{ summary_html }}
<h2>Test MSE on the top-20 DE genes</h2><img src="data:image/png;base64,{{ plot }}" alt="test_mse_de per arm">
{% for title, table in tests %}<h2>{{ title }}</h2>{{ table }}{% endfor %}
<p>Source: {{ results }}</p></body></html>""")


def _fmt(mean: float, sd: float, ci: float) -> str:
    if math.isnan(sd):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {sd:.4f} [{ci:.4f}]"


def _plot(summary: pd.DataFrame, df: pd.DataFrame, metric: str, reference: str) -> str:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(summary)), 3.5))
    colors = ["#c0392b" if a == reference else "#95a5a6" if str(a).startswith("baseline_") else "#2980b9"
              for a in summary["arm"]]
    err = summary[f"{metric}_ci95"].fillna(0.0)
    arms = summary["arm"].astype(str).tolist()
    ax.bar(arms, summary[f"{metric}_mean"], yerr=err, color=colors, capsize=3, alpha=0.8)
    for i, arm in enumerate(arms):  # one dot per seed
        ys = df.loc[df["arm"].astype(str) == arm, metric].astype(float)
        ax.scatter([i] * len(ys), ys, color="black", s=10, zorder=3)
    ax.set_ylabel(metric)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(results_csv: Path, out: Path, *, name: str, reference: str) -> Path:
    """Render the HTML report of ``results.csv`` into ``out`` (atomic write).

    Parameters
    ----------
    results_csv
        The sweep's ``results.csv``.
    out
        Output ``.html`` path.
    name
        Ablation name (title).
    reference
        The arm every other arm is tested against (the full model).
    """
    raw = pd.read_csv(results_csv)
    df = load_results(results_csv)
    metrics = [*KEY_METRICS, *(m for m in TRUTH_METRICS if m in df)]
    summary = summarise(df, metrics)
    table = pd.DataFrame({"arm": summary["arm"], "seeds": summary["n"]})
    for m in metrics:
        if f"{m}_mean" in summary:
            table[m] = [_fmt(a, b, c) for a, b, c in zip(summary[f"{m}_mean"], summary[f"{m}_sd"],
                                                         summary[f"{m}_ci95"], strict=True)]
    tests = [(f"Paired t-tests against {reference} (test_mse_de)",
              paired_tests(df, reference, "test_mse_de").to_html(index=False, float_format="%.4g"))]
    for base in sorted(a for a in df["arm"].unique() if str(a).startswith("baseline_")):
        tests.append((f"Paired t-tests against {base} (test_mse_de)",
                      paired_tests(df, base, "test_mse_de").to_html(index=False, float_format="%.4g")))
    html = _TEMPLATE.render(name=name, n_trials=len(df), n_failed=len(raw) - len(df), n_arms=df["arm"].nunique(),
                            seeds=sorted(df["seed"].unique().tolist()), reference=reference,
                            summary_html=table.to_html(index=False), plot=_plot(summary, df, "test_mse_de", reference),
                            tests=tests, results=results_csv)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(html)
    os.replace(tmp, out)
    return out
