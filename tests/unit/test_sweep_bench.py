"""Phase marks in a run's timeline and the sweep overhead computed from them (`pertadapt bench sweep`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pertadapt.config.errors import ConfigError
from pertadapt.sweep.bench import sweep_timings
from pertadapt.train.timeline import TIMELINE_FILE, mark, read_timeline


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
    assert not (tmp_path / TIMELINE_FILE).exists()
    with pytest.raises(ConfigError, match="holds no sweep"):
        sweep_timings(tmp_path)
