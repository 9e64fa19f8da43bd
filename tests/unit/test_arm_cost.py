"""The measured cost of each trial (``device_s``) and each arm (the report's "Cost per arm" table)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from fixtures.synthetic_sweep import write_synthetic_sweep
from pertadapt.config.load import config_hash
from pertadapt.files import atomic_write_json, atomic_write_text
from pertadapt.report.console import print_summary
from pertadapt.report.html import write_sweep_report
from pertadapt.report.results import RESULTS_FILE, ResultRow, device_seconds, result_columns
from pertadapt.rundir import RunDir
from pertadapt.sweep.ablation import load_ablation
from pertadapt.sweep.results import TrialOutcome, collect_results

REPO = Path(__file__).resolve().parents[2]


def test_device_seconds_are_gpu_seconds_with_gpus_else_the_measured_cpu_seconds() -> None:
    assert device_seconds(wall_s=10.0, gpus=4.0, cpu_s=3.0) == (40.0, "gpu")
    assert device_seconds(wall_s=10.0, gpus=0.0, cpu_s=3.0) == (3.0, "cpu")
    assert device_seconds(wall_s=None, gpus=2.0, cpu_s=None) == (None, "")
    assert device_seconds(wall_s=10.0, gpus=0.0, cpu_s=None) == (None, "")


def test_a_result_row_refuses_an_unknown_device_kind() -> None:
    with pytest.raises(ValueError, match="device_kind: 'tpu' is not one of gpu, cpu"):
        _row("a/seed1", "a", 1, wall_s=1.0, device_s=1.0, device_kind="tpu")


def test_the_sweep_records_gpu_seconds_of_gpu_trials_and_cpu_seconds_of_baselines(tmp_path: Path) -> None:
    path = tmp_path / "abl.yaml"
    path.write_text(f"name: c\nbase: {REPO / 'configs' / 'demo.yaml'}\nseeds: [1]\nbaselines: true\n"
                    "resources: {workers: 2, gpus_per_worker: 2}\narms:\n  full: {}\n")
    abl = load_ablation(path)
    sweep = tmp_path / "sweep"
    hashes = {t.key: config_hash(t.run_config("/data/sim.h5ad")) for t in abl.trials}
    outcomes = []
    for t in abl.trials:
        rd = RunDir(sweep / "runs" / t.key)
        rd.write_provenance({"config_hash": hashes[t.key]})
        rd.write_final_metrics({"best_epoch": 1, "test_mse_de": 0.5})
        rd.write_cost(cpu_s=7.5, processes=1, wall_s=9.0)
        outcomes.append(TrialOutcome(t.key, "grid", "ok", None, 10.0))
    with collect_results(abl, sweep, outcomes, hashes).open() as fh:
        rows = {r["arm"]: r for r in csv.DictReader(fh)}
    assert (float(rows["full"]["device_s"]), rows["full"]["device_kind"]) == (40.0, "gpu")  # 10 s × 2 × 2 GPUs
    for arm in ("baseline_mean", "baseline_linear"):
        assert (float(rows[arm]["device_s"]), rows[arm]["device_kind"]) == (7.5, "cpu")  # cost.json's cpu_s


def _row(trial: str, arm: str, seed: int, *, wall_s: float | None, device_s: float | None, device_kind: str,
         status: str = "ok", is_baseline: bool = False) -> ResultRow:
    return ResultRow(trial=trial, dataset="", backbone="", arm=arm, seed=seed, stage="grid", status=status,
                     attempts=1, error="" if status == "ok" else "boom", wall_s=wall_s, device_s=device_s,
                     device_kind=device_kind, best_epoch=1, config_hash="h", is_baseline=is_baseline,
                     backbone_weights="", run_dir="", wandb_run="",
                     metrics={"test_mse_de": 0.5 + seed / 10} if status == "ok" else {})


def _hand_built(root: Path, *, plan: bool) -> Path:
    rows = [_row("full/seed1", "full", 1, wall_s=100.0, device_s=400.0, device_kind="gpu"),
            _row("full/seed2", "full", 2, wall_s=200.0, device_s=800.0, device_kind="gpu"),
            _row("worse/seed1", "worse", 1, wall_s=50.0, device_s=200.0, device_kind="gpu", status="failed"),
            _row("worse/seed2", "worse", 2, wall_s=None, device_s=None, device_kind="", status="pending"),
            _row("baseline_mean/seed1", "baseline_mean", 1, wall_s=10.0, device_s=8.0, device_kind="cpu",
                 is_baseline=True),
            _row("baseline_mean/seed2", "baseline_mean", 2, wall_s=20.0, device_s=15.0, device_kind="cpu",
                 is_baseline=True)]
    root.mkdir(parents=True)
    atomic_write_text(root / RESULTS_FILE, pd.DataFrame([r.record() for r in rows], columns=result_columns(rows))
                      .to_csv(index=False))
    atomic_write_json(root / "sweep.json", {"name": "cost", "reference_arm": "full"})
    if plan:  # full/seed2 shares full/seed1's run: an alias gets the run's planned cost
        atomic_write_json(root / "plan.json", {"trials": [
            {"key": "full/seed1", "cost": {"gpu_hours": 0.05}, "aliases": [{"key": "full/seed2"}]},
            {"key": "worse/seed1", "cost": {"gpu_hours": 0.02}},
            {"key": "baseline_mean/seed1", "cost": {"gpu_hours": 0.0}}]})
    return root


def test_the_cost_table_sums_a_hand_built_results_csv(tmp_path: Path) -> None:
    paths = write_sweep_report(_hand_built(tmp_path / "s", plan=True), metrics=["mse_de"])
    s = pd.read_csv(paths.summary_csv).set_index("arm")
    full, worse, base = s.loc["full"], s.loc["worse"], s.loc["baseline_mean"]
    assert (full["n_ran"], full["wall_s_mean"], full["wall_s_total"], full["gpu_s_total"]) == (2, 150.0, 300.0, 1200.0)
    assert math.isnan(full["cpu_s_total"])
    assert full["plan_gpu_h_per_trial"] == pytest.approx(0.05)
    assert full["gpu_h_per_trial"] == pytest.approx(600.0 / 3600)
    # a failed trial's time counts; a pending one never ran
    assert (worse["n_trials"], worse["n_ran"], worse["wall_s_total"], worse["gpu_s_total"]) == (2, 1, 50.0, 200.0)
    assert (base["cpu_s_total"], base["wall_s_total"]) == (23.0, 30.0)
    assert math.isnan(base["gpu_s_total"])
    assert math.isnan(base["gpu_h_per_trial"])
    md = paths.markdown.read_text()
    assert "## Cost per arm" in md
    assert "| full | 2/2 | 150.0 | 300.0 | 1,200.0 GPU-s | 0.05 | 0.167 |" in md
    assert "| baseline_mean | 2/2 | 15 | 30 | 23 CPU-s | 0 | — |" in md
    html = paths.html.read_text()
    assert 'id="cost-per-arm"' in html
    assert "<th>planned GPU-h/trial</th>" in html
    assert "1,200.0 GPU-s" in html
    console = Console(record=True, width=200)
    print_summary(paths.report, console)
    text = console.export_text()
    assert "cost per arm" in text
    assert "1,200.0 GPU-s" in text
    assert "23 CPU-s" in text


def test_without_a_plan_the_cost_table_has_no_planned_column(tmp_path: Path) -> None:
    paths = write_sweep_report(_hand_built(tmp_path / "s", plan=False), metrics=["mse_de"])
    assert paths.report.cost_table[0] == ("arm", "trials", "wall s (mean)", "wall s (total)", "device-s (total)")
    assert "planned GPU-h" not in paths.markdown.read_text()
    assert pd.read_csv(paths.summary_csv)["plan_gpu_h_per_trial"].isna().all()


def test_a_plan_that_is_not_json_is_a_data_error(tmp_path: Path) -> None:
    from pertadapt.data.io import DataError

    root = _hand_built(tmp_path / "s", plan=False)
    (root / "plan.json").write_text("{")
    with pytest.raises(DataError, match=r"plan\.json: not valid JSON"):
        write_sweep_report(root, metrics=["mse_de"])
    assert not (root / "report").exists()


def test_the_synthetic_sweep_carries_its_cost(tmp_path: Path) -> None:
    root = write_synthetic_sweep(tmp_path / "syn", arms={"full": 0.0, "worse": 0.1}, seeds=(1, 2, 3),
                                 n_conditions=8, failed={"sim/worse/seed2": "boom"})
    s = pd.read_csv(write_sweep_report(root).summary_csv).set_index("arm")
    assert (s.loc["full", "cpu_s_total"], s.loc["full", "wall_s_total"]) == (1.5, 3.0)
    assert (s.loc["worse", "cpu_s_total"], s.loc["worse", "wall_s_total"]) == (1.0, 3.0)  # the failed one: no CPU-s
