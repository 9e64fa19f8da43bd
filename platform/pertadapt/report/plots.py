"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Every function takes tidy tables for one (dataset, backbone) and draws arms in display order with one
colour per arm (baselines in greys), so the same arm has the same colour in every figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from pertadapt.report.tables import lower_is_better, metric_column

__all__ = ["arm_colours", "de_changes_plot", "forest_plot", "learning_curves_plot", "subgroup_bars_plot",
           "truth_vs_observed_plot"]

_VERDICT_COLOURS = {"better": "#1a9850", "worse": "#d73027", "no difference": "#555555", "not tested": "#bbbbbb"}
_DPI = 100
#: Most panels per row of the forest plot.
_FOREST_COLUMNS = 3


def _arms_with_data(summary: pd.DataFrame, arms: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The summary indexed by arm, and the arms (in display order) that have at least one ok trial."""
    by = summary.set_index("arm")
    return by, [a for a in arms if a in by.index and by.loc[a, "n"] > 0]


def arm_colours(arms: Sequence[str], baselines: set[str]) -> dict[str, str]:
    """Arm → colour: tab10 for model arms in order, greys for baselines."""
    model = [a for a in arms if a not in baselines]
    greys = plt.get_cmap("Greys")(np.linspace(0.35, 0.75, max(len(arms) - len(model), 1)))
    out = {a: matplotlib.colors.to_hex(plt.get_cmap("tab10")(i % 10)) for i, a in enumerate(model)}
    out.update({a: matplotlib.colors.to_hex(greys[i]) for i, a in enumerate(a for a in arms if a in baselines)})
    return out


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def forest_plot(tests: pd.DataFrame, metrics: Sequence[str], title: str) -> bytes:
    """Each arm's mean difference to the reference with its bootstrap 95% CI, one panel per metric.

    Parameters
    ----------
    tests
        ``paired_tests`` rows of one (dataset, backbone).
    metrics
        Metrics (panels), in order.
    title
        Figure title.
    """
    metrics = [m for m in metrics if (tests["metric"] == m).any()]
    arms = list(dict.fromkeys(tests["arm"]))
    nrows = -(-len(metrics) // _FOREST_COLUMNS)
    ncols = -(-len(metrics) // nrows)  # balanced rows: 4 panels as 2 × 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.2, nrows * (0.4 * len(arms) + 1.5)),
                             sharey=True, squeeze=False, layout="constrained")
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        t = tests[tests["metric"] == metric].set_index("arm").reindex(arms)
        y = np.arange(len(arms))
        for yi, (_, r) in zip(y, t.iterrows(), strict=True):
            if not np.isfinite(r["mean_diff"]):
                continue
            err = [[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]]
            ax.errorbar(r["mean_diff"], yi, xerr=err, fmt="o", capsize=3, color=_VERDICT_COLOURS[r["verdict"]])
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)", fontsize=9)
        ax.set_xlabel(f"arm − {t['reference'].dropna().iloc[0]}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_yticks(np.arange(len(arms)), arms)
    axes[0, 0].invert_yaxis()  # shared y: the first arm on top
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def subgroup_bars_plot(summary: pd.DataFrame, trials: pd.DataFrame, metrics: Sequence[str],
                       scopes: Sequence[str], arms: Sequence[str], colours: Mapping[str, str], title: str) -> bytes:
    """Grouped bars per scope (overall and subgroups): bar = mean over ok seeds, dots = the seeds.

    Parameters
    ----------
    summary
        ``summarise`` rows of one (dataset, backbone).
    trials
        Its ok trials (for the per-seed dots).
    metrics, scopes
        Panels (one per metric) and bar groups.
    arms, colours
        Display order and colours.
    title
        Figure title.
    """
    by, arms = _arms_with_data(summary, arms)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 1.1 * len(scopes) * max(len(arms), 1) / 3),
                                                       2.6 * len(metrics)), squeeze=False, layout="constrained")
    width = 0.8 / max(len(arms), 1)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        present = [s for s in scopes if f"{metric_column(metric, s)}_mean" in by]
        for j, arm in enumerate(arms):
            xs = np.arange(len(present)) + (j - (len(arms) - 1) / 2) * width
            means = [by.loc[arm, f"{metric_column(metric, s)}_mean"] for s in present]
            ax.bar(xs, means, width=width, color=colours[arm], label=arm)
            for x, s in zip(xs, present, strict=True):
                col = metric_column(metric, s)
                vals = pd.to_numeric(trials.loc[trials["arm"] == arm, col], errors="coerce").dropna()
                ax.scatter(np.full(len(vals), x), vals, color="black", s=6, zorder=3)
        ax.set_xticks(np.arange(len(present)), present, fontsize=8)
        ax.set_xlim(-0.5, len(present) - 0.5)
        ax.set_ylabel(metric, fontsize=8)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", fontsize=7,
               ncol=min(len(arms), 6))
    axes[0, 0].set_title(title, fontsize=10)
    return _png(fig)


def learning_curves_plot(histories: Mapping[str, Sequence[pd.DataFrame]], val_metric: str,
                         colours: Mapping[str, str], title: str) -> bytes:
    """Train loss and ``val_metric`` per epoch: thin lines per seed, thick line the mean over seeds.

    Parameters
    ----------
    histories
        Arm → one epoch-history table per seed (columns ``epoch``, ``train_loss``, ``val_...``).
    val_metric
        Validation column, e.g. ``val_mse_de``.
    colours
        Arm colours.
    title
        Figure title.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, col in zip(axes, ("train_loss", val_metric), strict=True):
        for arm, runs in histories.items():
            runs = [h for h in runs if col in h]
            for h in runs:
                ax.plot(h["epoch"], h[col], color=colours[arm], lw=0.6, alpha=0.4)
            if runs:
                mean = pd.concat([h.set_index("epoch")[col] for h in runs], axis=1).mean(axis=1)
                ax.plot(mean.index, mean.to_numpy(), color=colours[arm], lw=2, label=arm)
        ax.set_xlabel("epoch")
        ax.set_ylabel(col)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def de_changes_plot(observed: Mapping[str, tuple[Sequence[str], np.ndarray]],
                    predicted: Mapping[str, Mapping[str, np.ndarray]], colours: Mapping[str, str],
                    title: str) -> bytes:
    """Predicted vs observed change from control on each perturbation's top DE genes.

    Parameters
    ----------
    observed
        Condition → (``(n_de,)`` gene names, ``(n_de,)`` observed mean − control mean).
    predicted
        Arm → condition → ``(n_de,)`` predicted mean − control mean on the same genes.
    colours
        Arm colours.
    title
        Figure title.
    """
    conds = list(observed)
    ncols = 2 if len(conds) > 1 else 1
    nrows = (len(conds) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.0 * nrows), squeeze=False)
    for ax, cond in zip(axes.flat, conds, strict=False):
        genes, obs = observed[cond]
        x = np.arange(len(genes))
        ax.bar(x, obs, color="#dddddd", edgecolor="#999999", label="observed")
        for arm, by_cond in predicted.items():
            if cond in by_cond:
                ax.scatter(x, by_cond[cond], color=colours[arm], s=14, label=arm, zorder=3)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(x, genes, rotation=90, fontsize=6)
        ax.set_title(cond, fontsize=9)
        ax.set_ylabel("Δ vs control", fontsize=8)
    for ax in list(axes.flat)[len(conds):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def truth_vs_observed_plot(summary: pd.DataFrame, pairs: Sequence[tuple[str, str]], arms: Sequence[str],
                           colours: Mapping[str, str], title: str) -> bytes:
    """Simulated data: each arm's error against observed means next to its error against the noise-free truth.

    Parameters
    ----------
    summary
        ``summarise`` rows of one (dataset, backbone).
    pairs
        ``(observed column, truth column)`` of ``results.csv``, e.g. ``("test_mse_de", "test_truth_mse_de")``.
    arms, colours
        Display order and colours.
    title
        Figure title.
    """
    by, arms = _arms_with_data(summary, arms)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.4), squeeze=False)
    x = np.arange(len(arms))
    for ax, (obs, truth) in zip(axes[0], pairs, strict=True):
        ax.bar(x - 0.2, by.loc[arms, f"{obs}_mean"], width=0.4, color=[colours[a] for a in arms], label="vs observed")
        ax.bar(x + 0.2, by.loc[arms, f"{truth}_mean"], width=0.4, color=[colours[a] for a in arms], hatch="//",
               edgecolor="white", label="vs truth")
        ax.set_xticks(x, arms, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(obs.removeprefix("test_"), fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
