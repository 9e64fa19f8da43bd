"""``pertadapt bench sweep``: where a sweep's wall time goes, from its trials' timeline marks.

Per trial (see :mod:`pertadapt.train.timeline`): ``startup`` = trial start → model built (worker group,
data, GO inputs, model, engine, W&B run), ``training`` = → last epoch done, ``evaluation`` = → test metrics,
``teardown`` = → the trial function returned (run files, W&B finish, worker group shut down). The sweep's
``overhead_share`` counts every trial slot's second that is not training or evaluation:
``1 − Σ(training + evaluation) / (wall × concurrent slots)``, with ``wall`` from the sweep's start (data
ready, before Ray starts) to the last trial's end — so Ray start-up, gaps between trials and idle slots
are overhead too.

With ``--naive`` the same grid runs a second time on the naïve path (:data:`NAIVE_OVERRIDES`: the frozen FM
recomputed on every step, every score of the GO-masked attention computed), and :func:`compare_sweeps`
gives the ratios of the two runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pertadapt.config.errors import ConfigError
from pertadapt.report.results import HPO_RESULTS_FILE, RESULTS_FILE
from pertadapt.rundir import RunDir
from pertadapt.train.timeline import read_timeline

__all__ = ["NAIVE_OVERRIDES", "PHASE_SPANS", "compare_sweeps", "sweep_timings"]

#: Reported phase → (from mark, to mark).
PHASE_SPANS = {"startup": ("trial_start", "model_ready"), "training": ("model_ready", "train_end"),
               "evaluation": ("train_end", "eval_end"), "teardown": ("eval_end", "trial_end")}


#: What the naïve path of a trial does: no frozen-FM embedding cache, the chunked (dense per chunk) attention.
NAIVE_OVERRIDES = ("backbone.embedding_cache=off", "adapter.attention_impl=chunked")


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    rows = []
    for name in (RESULTS_FILE, HPO_RESULTS_FILE):
        path = sweep_dir / name
        if path.is_file():
            with path.open() as fh:
                rows += list(csv.DictReader(fh))
    if not rows:
        raise ConfigError(f"{sweep_dir}: no results.csv (is it a finished sweep directory?)")
    return rows


def sweep_timings(sweep_dir: Path) -> dict[str, Any]:
    """Per-trial phase seconds and the sweep's overhead share.

    Parameters
    ----------
    sweep_dir
        A finished sweep directory (``sweep.json``, ``plan.json``, ``results.csv``, run dirs with timelines).

    Raises
    ------
    ConfigError
        When ``sweep_dir`` holds no finished sweep, or no trial with a complete timeline.

    Returns
    -------
    dict
        ``trials`` (list of ``{trial, status, startup, training, evaluation, teardown, total}`` seconds),
        ``wall_s``, ``concurrency``, ``useful_s`` (Σ training + evaluation), ``overhead_share`` and
        ``trial_overhead_share`` (``1 − useful / Σ trial totals``: the share inside trials alone), and the
        mean of each phase over model and baseline trials.
    """
    if not (sweep_dir / "sweep.json").is_file():
        raise ConfigError(f"{sweep_dir}: holds no sweep (no sweep.json)")
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    plan = json.loads((sweep_dir / "plan.json").read_text())
    trials, incomplete, first, last = [], [], float("inf"), 0.0
    for row in _rows(sweep_dir):
        marks = read_timeline(RunDir(row["run_dir"]))
        if not {m for span in PHASE_SPANS.values() for m in span} <= set(marks):
            incomplete.append(row["trial"])  # failed, stopped early or pending: no complete timeline
            continue
        rec: dict[str, Any] = {"trial": row["trial"] + (f"/{row['sample']}" if row.get("sample") else ""),
                               "baseline": row["is_baseline"] == "True", "status": row["status"]}
        rec.update({phase: marks[b] - marks[a] for phase, (a, b) in PHASE_SPANS.items()})
        rec["total"] = marks["trial_end"] - marks["trial_start"]
        first, last = min(first, marks["trial_start"]), max(last, marks["trial_end"])
        trials.append(rec)
    if not trials:
        raise ConfigError(f"{sweep_dir}: no trial has a complete timeline (incomplete: {incomplete})")
    start = float(sweep.get("started_at", first))
    wall = last - start
    concurrency = int(plan["max_concurrent_trials"])
    useful = sum(t["training"] + t["evaluation"] for t in trials)
    out: dict[str, Any] = {
        "sweep": sweep["name"], "n_trials": len(trials), "incomplete_trials": incomplete, "wall_s": wall, "concurrency": concurrency,
        "useful_s": useful, "overhead_share": 1.0 - useful / (wall * concurrency),
        "trial_overhead_share": 1.0 - useful / sum(t["total"] for t in trials), "ray_start_s": first - start,
    }
    for kind, group in (("model", [t for t in trials if not t["baseline"]]),
                        ("baseline", [t for t in trials if t["baseline"]])):
        for phase in (*PHASE_SPANS, "total"):
            if group:
                out[f"{kind}_{phase}_mean_s"] = sum(t[phase] for t in group) / len(group)
    out["trials"] = trials
    return out


def compare_sweeps(fast: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the same grid run as configured (``fast``) and on the naïve path, from :func:`sweep_timings`.

    Parameters
    ----------
    fast, naive
        :func:`sweep_timings` of the two runs; they must hold the same trials.

    Raises
    ------
    ConfigError
        When the two runs did not complete the same trials.

    Returns
    -------
    dict
        ``speedup`` (naïve wall / wall), ``training_speedup`` (naïve Σ training + evaluation / this run's),
        ``model_training_speedup`` (the mean model trial's training phase), both walls, both overhead shares.
    """
    a, b = sorted(t["trial"] for t in fast["trials"]), sorted(t["trial"] for t in naive["trials"])
    if a != b:
        raise ConfigError(f"the two sweeps completed different trials: {sorted(set(a) ^ set(b))}")
    out = {"n_trials": len(a), "wall_s": fast["wall_s"], "naive_wall_s": naive["wall_s"],
           "speedup": naive["wall_s"] / fast["wall_s"], "useful_s": fast["useful_s"],
           "naive_useful_s": naive["useful_s"], "training_speedup": naive["useful_s"] / fast["useful_s"],
           "overhead_share": fast["overhead_share"], "naive_overhead_share": naive["overhead_share"]}
    if "model_training_mean_s" in fast:
        out["model_training_speedup"] = naive["model_training_mean_s"] / fast["model_training_mean_s"]
    return out
