"""Phase marks in a run's timeline and the sweep overhead computed from them (`pertadapt bench sweep`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pertadapt.bench.sweep import NAIVE_OVERRIDES, compare_sweeps, sweep_timings
from pertadapt.config.errors import ConfigError
from pertadapt.rundir import RunDir
from pertadapt.train.timeline import mark, read_timeline


def _write_trial(run_dir: Path, t0: float, spans: tuple[float, float, float, float]) -> None:
    startup, training, evaluation, teardown = spans
    t = t0
    for phase, dt in (("trial_start", 0.0), ("worker_start", startup / 2), ("data_ready", startup / 4),
                      ("model_ready", startup / 4), ("train_end", training), ("eval_end", evaluation),
                      ("run_end", teardown / 2), ("trial_end", teardown / 2)):
        t += dt
        mark(run_dir, phase, at=t)


def _sweep(tmp_path: Path, trials: dict[str, tuple[float, tuple[float, float, float, float]]], *,
           started_at: float, concurrency: int) -> Path:
    rows = []
    for key, (t0, spans) in trials.items():
        run_dir = tmp_path / "runs" / key
        _write_trial(run_dir, t0, spans)
        rows.append({"trial": key, "status": "ok", "is_baseline": str(key.startswith("baseline")),
                     "run_dir": str(run_dir)})
    with (tmp_path / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "started_at": started_at}))
    (tmp_path / "plan.json").write_text(json.dumps({"max_concurrent_trials": concurrency, "trials": []}))
    return tmp_path


def test_overhead_share_counts_startup_gaps_and_idle_slots(tmp_path: Path) -> None:
    # two trials one after the other on 1 slot; the sweep started 10 s before the first trial
    sweep = _sweep(tmp_path, {"full/seed1": (110.0, (20.0, 8.0, 2.0, 5.0)),
                              "full/seed2": (145.0, (10.0, 6.0, 4.0, 5.0))}, started_at=100.0, concurrency=1)
    out = sweep_timings(sweep)
    first = out["trials"][0]
    assert (first["startup"], first["training"], first["evaluation"], first["teardown"]) == pytest.approx(
        (20.0, 8.0, 2.0, 5.0))
    assert out["wall_s"] == pytest.approx(70.0)  # 100 → 170
    assert out["useful_s"] == pytest.approx(20.0)
    assert out["overhead_share"] == pytest.approx(1 - 20 / 70)
    assert out["trial_overhead_share"] == pytest.approx(1 - 20 / 60)
    assert out["ray_start_s"] == pytest.approx(10.0)
    assert out["model_startup_mean_s"] == pytest.approx(15.0)
    # the same trials on 2 slots over the same wall time: the idle slot is overhead too
    (tmp_path / "plan.json").write_text(json.dumps({"max_concurrent_trials": 2, "trials": []}))
    assert sweep_timings(sweep)["overhead_share"] == pytest.approx(1 - 20 / 140)


def test_a_retried_trial_counts_its_last_attempt_and_unfinished_trials_are_listed(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, {"full/seed1": (0.0, (1.0, 1.0, 1.0, 1.0)),
                              "full/seed2": (0.0, (1.0, 1.0, 1.0, 1.0))}, started_at=0.0, concurrency=1)
    _write_trial(tmp_path / "runs" / "full/seed1", 10.0, (3.0, 4.0, 5.0, 6.0))  # second attempt
    mark(tmp_path / "runs" / "full/seed2", "trial_start", at=20.0)  # restarted, never finished
    assert read_timeline(tmp_path / "runs" / "full/seed1")["trial_start"] == 10.0
    out = sweep_timings(sweep)
    assert [t["trial"] for t in out["trials"]] == ["full/seed1"]
    assert out["trials"][0]["training"] == pytest.approx(4.0)
    assert out["incomplete_trials"] == ["full/seed2"]


def test_bad_marks_and_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown phase 'lunch'"):
        mark(tmp_path, "lunch")
    assert not RunDir(tmp_path).timeline_file.exists()
    with pytest.raises(ConfigError, match="holds no sweep"):
        sweep_timings(tmp_path)


def test_naive_comparison_gives_the_ratios_of_two_runs_of_the_same_grid(tmp_path: Path) -> None:
    fast = _sweep(tmp_path / "fast", {"full/seed1": (10.0, (5.0, 10.0, 2.0, 1.0)),
                                      "baseline_mean/seed1": (28.0, (1.0, 1.0, 1.0, 1.0))}, started_at=0.0,
                  concurrency=1)
    slow = _sweep(tmp_path / "slow", {"full/seed1": (10.0, (5.0, 40.0, 8.0, 1.0)),
                                      "baseline_mean/seed1": (64.0, (1.0, 1.0, 1.0, 1.0))}, started_at=0.0,
                  concurrency=1)
    out = compare_sweeps(sweep_timings(fast), sweep_timings(slow))
    assert (out["wall_s"], out["naive_wall_s"]) == pytest.approx((32.0, 68.0))
    assert out["speedup"] == pytest.approx(68.0 / 32.0)
    assert out["training_speedup"] == pytest.approx((48.0 + 2.0) / (12.0 + 2.0))
    assert out["model_training_speedup"] == pytest.approx(4.0)
    # the CLI reads both finished sweeps and writes the ratios with both timings
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", "bench", "sweep", "--from", str(fast), "--naive-from",
                          str(slow), "--json", str(tmp_path / "cmp.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["speedup"] == pytest.approx(68.0 / 32.0)
    assert written["naive"]["n_trials"] == written["sweep"]["n_trials"] == 2
    # runs of different grids are not compared
    other = _sweep(tmp_path / "other", {"full/seed2": (0.0, (1.0, 1.0, 1.0, 1.0))}, started_at=0.0, concurrency=1)
    with pytest.raises(ConfigError, match="different trials"):
        compare_sweeps(sweep_timings(fast), sweep_timings(other))
    alone = subprocess.run([sys.executable, "-m", "pertadapt.cli", "bench", "sweep", "--naive-from", str(slow)],
                           capture_output=True, text=True)
    assert alone.returncode == 2
    assert "--naive-from" in alone.stderr


def test_the_naive_path_overrides_are_valid_run_config_keys() -> None:
    from pertadapt.config import load_run_config

    cfg = load_run_config(None, list(NAIVE_OVERRIDES))
    assert cfg.backbone.embedding_cache == "off"
    assert cfg.adapter.attention_impl == "chunked"
