"""Sweeps through Ray Tune: the demo ablation grid end to end, W&B read-back, Optuna persistence."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from pertadapt.report.wandb import find_offline_runs, read_offline_run

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
FAST = ["optim.epochs=1", "optim.max_steps_per_epoch=2"]


def _pertadapt(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("demo_sweep")
    _pertadapt("sweep", "ablations/demo.yaml", *FAST, "--out", str(out))
    return out


def _rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_demo_grid_results(demo_sweep: Path) -> None:
    rows = _rows(demo_sweep)
    assert all(r["status"] == "ok" for r in rows)
    arms = {r["arm"] for r in rows}
    assert {"full", "no_fm", "no_pa", "no_am", "no_ladapt"} <= arms
    assert {"baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear"} <= arms
    for arm in arms:
        assert sorted(int(r["seed"]) for r in rows if r["arm"] == arm) == [1, 2]
    for r in rows:
        for key in ("test_mse_de", "test_mse", "test_pearson_delta", "val_mse_de"):
            assert math.isfinite(float(r[key])), (r["trial"], key)
    # the varying config values are columns
    assert {"cfg.backbone.name", "cfg.adapter.enabled", "cfg.adapter.attention_mask", "cfg.loss.name",
            "cfg.model.name"} <= set(rows[0])
    assert (demo_sweep / "report.html").read_text().count("<table") >= 2


def test_every_trial_has_one_finished_wandb_run_matching_the_csv(demo_sweep: Path) -> None:
    rows = _rows(demo_sweep)
    runs = find_offline_runs(demo_sweep / "runs")
    assert len(runs) == len(rows) >= 10
    for r in rows:
        info = read_offline_run(Path(r["wandb_run"]))
        assert info["state"] == "finished"
        for key in ("test_mse_de", "test_pearson_delta", "val_mse_de"):
            assert info["summary"][key] == pytest.approx(float(r[key]), rel=1e-6), (r["trial"], key)


def test_training_trials_ran_on_two_deepspeed_workers(demo_sweep: Path) -> None:
    import json

    for r in _rows(demo_sweep):
        prov = json.loads((Path(r["run_dir"]) / "provenance.json").read_text())
        assert prov["world_size"] == (1 if r["arm"].startswith("baseline_") else 2)


def test_report_command_rewrites_the_report(demo_sweep: Path) -> None:
    (demo_sweep / "report.html").unlink()
    _pertadapt("report", str(demo_sweep), "--reference", "full")
    assert "Paired t-tests against full" in (demo_sweep / "report.html").read_text()


@pytest.mark.usefixtures("no_leftover_ray")
def test_optuna_search_persists_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    abl = tmp_path / "hpo.yaml"
    abl.write_text("name: hpo\nbase: smoke.yaml\nseeds: [1]\nbaselines: false\nmax_concurrent_trials: 1\n"
                   "arms:\n  full: {}\n")
    out = tmp_path / "sweep"
    for expected in (2, 4):
        _pertadapt("sweep", str(abl), "optim.epochs=1", "--search-space", "search_spaces/demo.yaml", "--out",
                   str(out), "--no-report")
        storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna' / 'studies.db'}")
        study = optuna.load_study(study_name="hpo-full", storage=storage)
        assert len(study.trials) == expected
        assert all(t.value is not None and math.isfinite(t.value) for t in study.trials)
    rows = _rows(out)
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    # the final run uses the best parameters of this invocation's samples
    best = min(study.trials[2:], key=lambda t: t.value)
    final_cfg = yaml.safe_load((Path(rows[0]["run_dir"]) / "config.yaml").read_text())
    assert final_cfg["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
