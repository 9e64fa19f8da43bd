"""Results table → per-arm summaries (mean ± sd, 95% CI over seeds) and paired tests.

Pure pandas/scipy; consumed by the HTML report and the console table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["KEY_METRICS", "TRUTH_METRICS", "load_results", "paired_tests", "summarise"]

#: Metrics shown by default (lower is better for mse*, higher for pearson*).
KEY_METRICS = ("test_mse_de", "test_mse", "test_pearson_delta", "test_pearson_delta_de")
#: Distance to the simulator's noise-free truth (present for simulated data only).
TRUTH_METRICS = ("test_truth_mse_de", "test_truth_pearson_delta_de")
_PAIR_KEYS = ("dataset", "backbone_set", "seed")


def load_results(path: Path) -> pd.DataFrame:
    """Read ``results.csv`` (only rows with ``status == ok``)."""
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for col in ("dataset", "backbone_set"):
        if col in df:
            df[col] = df[col].fillna("")
    return df[df["status"] == "ok"].copy()


def summarise(df: pd.DataFrame, metrics: Sequence[str] = KEY_METRICS) -> pd.DataFrame:
    """One row per arm: ``n`` seeds and, per metric, mean, sd and the 95% t-interval half-width.

    ``ci95 = t_{0.975, n-1} · sd / √n`` (NaN for one seed).
    """
    rows = []
    for arm, g in df.groupby("arm", sort=False):
        row: dict[str, float | str | int] = {"arm": arm, "n": len(g)}
        for m in metrics:
            if m not in g:
                continue
            x = g[m].astype(float).to_numpy()
            sd = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
            half = float(stats.t.ppf(0.975, len(x) - 1) * sd / math.sqrt(len(x))) if len(x) > 1 else math.nan
            row.update({f"{m}_mean": float(np.mean(x)), f"{m}_sd": sd, f"{m}_ci95": half})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_tests(df: pd.DataFrame, reference: str, metric: str, others: Sequence[str] | None = None) -> pd.DataFrame:
    """Paired t-tests of each arm against ``reference`` on ``metric``, pairing trials by dataset, backbone and seed.

    Returns
    -------
    pandas.DataFrame
        ``arm``, ``n_pairs``, ``mean_diff`` (arm − reference), ``t``, ``p`` (two-sided; NaN with < 2 pairs
        or zero variance of the differences).
    """
    ref = df[df["arm"] == reference].set_index(list(_PAIR_KEYS))[metric]
    rows = []
    for arm in others if others is not None else [a for a in df["arm"].unique() if a != reference]:
        cur = df[df["arm"] == arm].set_index(list(_PAIR_KEYS))[metric]
        joined = pd.concat([cur.rename("a"), ref.rename("r")], axis=1, join="inner").astype(float)
        d = (joined["a"] - joined["r"]).to_numpy()
        t, p = (math.nan, math.nan)
        if len(d) > 1 and np.std(d) > 0:
            res = stats.ttest_rel(joined["a"], joined["r"])
            t, p = float(res.statistic), float(res.pvalue)
        rows.append({"arm": arm, "reference": reference, "metric": metric, "n_pairs": len(d),
                     "mean_diff": float(d.mean()) if len(d) else math.nan, "t": t, "p": p})
    return pd.DataFrame(rows)
