"""Paired tests of every arm against the reference over (condition, seed) pairs.

For each (dataset, backbone, arm, metric) the pairs are the (condition, seed) combinations present in
both the arm's and the reference's per-condition values, and ``d = arm − reference``:

* ``statistic``, ``p``: :func:`scipy.stats.wilcoxon` on ``d`` (two-sided, ``zero_method="wilcox"``);
* ``p_holm``: Holm's correction across **all** rows (statsmodels ``multipletests(method="holm")``);
* ``ci_low``, ``ci_high``: 95% percentile interval of the mean of ``d`` under a hierarchical bootstrap
  (:func:`~pertadapt.report.bootstrap.hierarchical_bootstrap`: resample seeds, then conditions within each drawn seed);
* ``verdict``: ``better`` / ``worse`` when ``p_holm < 0.05`` (direction from the sign of ``mean_diff`` and
  whether the metric is an error), ``no difference`` otherwise, ``not tested`` without pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from pertadapt.report.bootstrap import hierarchical_bootstrap
from pertadapt.report.tables import lower_is_better

__all__ = ["ALPHA", "paired_tests", "sentence"]

#: Family-wise error rate of the verdicts (after Holm's correction).
ALPHA = 0.05
_COLUMNS = ["dataset", "backbone", "arm", "reference", "metric", "n_pairs", "n_conditions", "n_seeds",
            "reference_mean", "mean_diff", "ci_low", "ci_high", "statistic", "p", "p_holm", "verdict"]


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    """Wilcoxon signed-rank test of ``d``; all-zero differences (identical arms) give ``(0, 1)``.

    ``zero_method="wilcox"`` drops zeros, so identical arms leave nothing to rank: scipy then returns
    p = 1 for small samples but NaN (0/0 in the normal approximation) above 50 pairs.
    """
    if not len(d):
        return math.nan, math.nan
    if not np.any(d):
        return 0.0, 1.0
    res = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def _verdict(metric: str, mean_diff: float, p_holm: float) -> str:
    if not np.isfinite(p_holm):
        return "not tested"
    if p_holm >= ALPHA or mean_diff == 0:
        return "no difference"
    return "better" if (mean_diff < 0) == lower_is_better(metric) else "worse"


def paired_tests(per_condition: pd.DataFrame, reference: str, metrics: Sequence[str],
                 arms: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (dataset, backbone, arm, metric) against ``reference`` (see module docstring).

    Parameters
    ----------
    per_condition
        Long table ``dataset, backbone, arm, seed, condition, subgroup, metric, value``.
    reference
        Reference arm.
    metrics
        Per-condition metric names to test (absent ones are skipped).
    arms
        Arms to test, in row order (default: every other arm in the table).

    Returns
    -------
    pandas.DataFrame
        Columns ``dataset, backbone, arm, reference, metric, n_pairs, n_conditions, n_seeds,
        reference_mean, mean_diff, ci_low, ci_high, statistic, p, p_holm, verdict``.
    """
    pc = per_condition[per_condition["metric"].isin(list(metrics))].dropna(subset=["value"])
    if arms is None:
        arms = [a for a in dict.fromkeys(pc["arm"]) if a != reference]
    rows = []
    for (dataset, backbone), g in pc.groupby(["dataset", "backbone"], sort=False):
        wide = g.pivot_table(index=["metric", "seed", "condition"], columns="arm", values="value", aggfunc="first")
        for arm in arms:
            if arm == reference or arm not in wide or reference not in wide:
                continue
            for metric in metrics:
                if metric not in wide.index.get_level_values("metric"):
                    continue
                pairs = wide.loc[metric, [arm, reference]].dropna()
                d = (pairs[arm] - pairs[reference]).to_numpy()
                seeds = pairs.index.get_level_values("seed")
                low, high = hierarchical_bootstrap([d[seeds == s] for s in pd.unique(seeds)])
                stat, p = _wilcoxon(d)
                rows.append({"dataset": dataset, "backbone": backbone, "arm": arm, "reference": reference,
                             "metric": metric, "n_pairs": len(d),
                             "n_conditions": pairs.index.get_level_values("condition").nunique(),
                             "n_seeds": len(pd.unique(seeds)),
                             "reference_mean": float(pairs[reference].mean()) if len(d) else math.nan,
                             "mean_diff": float(d.mean()) if len(d) else math.nan, "ci_low": low, "ci_high": high,
                             "statistic": stat, "p": p})
    out = pd.DataFrame(rows, columns=_COLUMNS[:-2])
    out["p_holm"] = math.nan
    tested = out["p"].notna().to_numpy()
    if tested.any():
        out.loc[tested, "p_holm"] = multipletests(out.loc[tested, "p"].to_numpy(), alpha=ALPHA, method="holm")[1]
    out["verdict"] = [_verdict(m, d, p) for m, d, p in zip(out["metric"], out["mean_diff"], out["p_holm"],
                                                          strict=True)]
    return out[_COLUMNS]


def _signed(x: float, digits: str = ".3g") -> str:
    return f"{x:+{digits}}".replace("-", "−")


def sentence(row: pd.Series, description: str = "") -> str:
    """The report's sentence for one ``paired_tests`` row.

    Errors (``mse*``, ``mae*``) are given relative to the reference's mean over the same pairs, in
    percent; other metrics as the signed difference.

    Examples
    --------
    "``no_go`` (adapter.go_mask: false) worsens test mse_de on sim by +12% [+8%, +16%] against ``full``
    (Wilcoxon p = 0.003, Holm 0.01; 130 conditions × 5 seeds)."
    """
    arm = f"`{row['arm']}`" + (f" ({description})" if description else "")
    where = "/".join(p for p in (row["dataset"], row["backbone"]) if p)
    what = f"test {row['metric']}" + (f" on {where}" if where else "")
    if row["verdict"] == "not tested":
        return f"{arm}: {what} could not be tested against `{row['reference']}` (no paired conditions)."
    ref = row["reference_mean"]
    if lower_is_better(row["metric"]) and np.isfinite(ref) and ref > 0:
        size = (f"{_signed(100 * row['mean_diff'] / ref, '.2g')}% [{_signed(100 * row['ci_low'] / ref, '.2g')}%, "
                f"{_signed(100 * row['ci_high'] / ref, '.2g')}%]")
    else:
        size = f"{_signed(row['mean_diff'])} [{_signed(row['ci_low'])}, {_signed(row['ci_high'])}]"
    evidence = (f"Wilcoxon p = {row['p']:.2g}, Holm {row['p_holm']:.2g}; {row['n_conditions']} conditions × "
                f"{row['n_seeds']} seed{'s' if row['n_seeds'] != 1 else ''}")
    if row["verdict"] == "no difference":
        return (f"{arm} shows no significant difference in {what} against `{row['reference']}`: {size} "
                f"({evidence}).")
    verb = "improves" if row["verdict"] == "better" else "worsens"
    return f"{arm} {verb} {what} by {size} against `{row['reference']}` ({evidence})."
