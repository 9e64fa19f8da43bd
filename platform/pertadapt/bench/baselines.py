"""``pertadapt bench baselines``: fit + predict time of the four baselines on synthetic condition means."""

from __future__ import annotations

import logging
import time

import numpy as np

from pertadapt.baselines.models import baseline_options, fit_baseline

__all__ = ["run_baseline_benchmark"]

log = logging.getLogger(__name__)


def _synthetic_means(n_genes: int, n_conditions: int, seed: int) -> tuple[list[str], dict[str, np.ndarray],
                                                                         np.ndarray]:
    """Gene names, ``n_conditions`` condition means (half singles, half doubles, plus ctrl), ctrl mean."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    ctrl = rng.gamma(2.0, 0.5, n_genes)
    n_single = max(2, n_conditions // 2)
    targets = [str(g) for g in rng.choice(genes, size=n_single, replace=False)]
    effect = {g: rng.normal(0.0, 0.2, n_genes) for g in targets}
    means = {f"{g}+ctrl": ctrl + effect[g] for g in targets}
    while len(means) < n_conditions:
        a, b = (str(x) for x in rng.choice(targets, size=2, replace=False))
        means[f"{a}+{b}"] = ctrl + effect[a] + effect[b] + rng.normal(0.0, 0.05, n_genes)
    means["ctrl"] = ctrl
    return genes, means, ctrl


def run_baseline_benchmark(n_genes: int = 2000, n_conditions: int = 250, *, seed: int = 0,
                           linear_k: int = 10, linear_ridge: float = 0.1) -> dict:
    """Fit every baseline on 75% of synthetic conditions and predict all of them, timing each.

    Parameters
    ----------
    n_genes
        Number of genes.
    n_conditions
        Number of perturbation conditions (half singles, the rest doubles of those genes).
    seed
        Seed of the synthetic means and of the 75/25 condition split.
    linear_k, linear_ridge
        K and λ of ``baseline_linear``.

    Returns
    -------
    dict
        ``{"n_genes", "n_conditions", "n_train", "baselines": {name: {"fit_s", "predict_s"}},
        "total_s"}`` with wall-clock seconds.
    """
    genes, means, ctrl = _synthetic_means(n_genes, n_conditions, seed)
    conds = sorted(c for c in means if c != "ctrl")
    rng = np.random.default_rng(seed + 1)
    train = set(rng.choice(conds, size=int(0.75 * len(conds)), replace=False).tolist()) | {"ctrl"}
    train_means = {c: means[c] for c in train}
    timings: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for options in baseline_options({"baseline_linear": {"k": linear_k, "ridge": linear_ridge}}):
        name = options.name
        t0 = time.perf_counter()
        model = fit_baseline(options, train_means, ctrl, gene_names=genes)
        t1 = time.perf_counter()
        model.predict(conds)
        t2 = time.perf_counter()
        timings[name] = {"fit_s": t1 - t0, "predict_s": t2 - t1}
        log.info("%s: fit %.3f s, predict %.3f s", name, t1 - t0, t2 - t1)
    return {"n_genes": n_genes, "n_conditions": len(conds), "n_train": len(train) - 1,
            "baselines": timings, "total_s": time.perf_counter() - start}
