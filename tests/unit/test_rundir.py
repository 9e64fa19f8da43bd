"""The typed contracts between modules: the run directory, the trial spec, the results row."""

from __future__ import annotations

from pathlib import Path

import pytest

from pertadapt.config import load_run_config
from pertadapt.data.io import DataError
from pertadapt.report.results import REQUIRED, ResultRow, check_columns, result_columns
from pertadapt.rundir import RunDir
from pertadapt.sweep.trial_spec import TUNED_KEY, TrialSpec, trial_of, tuned_of

REPO = Path(__file__).resolve().parents[2]


def test_a_run_dir_names_each_file_once_inside_it(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    files = [run.config_file, run.provenance_file, run.history_file, run.final_metrics_file, run.per_condition_file,
             run.predictions_file, run.attempts_file, run.nonfinite_file, run.timeline_file, run.checkpoints,
             run.ray_storage]
    assert len({f.name for f in files}) == len(files)
    assert all(f.parent == run.path for f in files)
    assert {run.last_checkpoint.parent, run.best_checkpoint.parent} == {run.checkpoints}
    assert not run.is_remote
    assert RunDir.at(run.location).path == run.path
    assert RunDir.at(run) is run


def test_run_files_round_trip_and_an_older_runs_files_do_not_count(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r").pull()
    assert run.final_metrics() is None
    assert run.history() == []
    assert run.attempts() is None
    run.write_config({"name": "x", "seed": 1})
    assert run.config() == {"name": "x", "seed": 1}
    run.write_final_metrics({"test_mse_de": 0.5, "best_epoch": 1})
    run.write_provenance({"config_hash": "abc"})
    assert run.finished_metrics("abc") == {"test_mse_de": 0.5, "best_epoch": 1}
    assert run.finished_metrics("other") is None  # left by a run of another config
    assert run.finished_metrics(None) is not None
    for epoch in range(3):
        run.append_history({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    run.keep_history(2)  # a resumed run redoes epoch 2
    assert [r["epoch"] for r in run.history()] == [0, 1]
    run.record_attempt(None)
    run.record_attempt(2)
    assert [(a["attempt"], a["resumed_from_epoch"]) for a in run.attempts()] == [(1, None), (2, 2)]
    run.record_nonfinite("training loss became nan", epoch=0, micro_step=3)
    with pytest.raises(FloatingPointError, match="training loss became nan .*not retried"):
        run.check_not_nonfinite()
    run.last_checkpoint.mkdir(parents=True)
    run.clear_retry_state()
    run.check_not_nonfinite()
    assert run.attempts() is None
    assert not run.checkpoints.exists()
    assert run.commit() == 0  # on a path every file is already in place
    assert not list(run.path.rglob("*.tmp"))


def test_a_uri_is_worked_on_in_a_node_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))
    run = RunDir.at("s3://bucket/sweep/runs/full/seed1")
    assert run.is_remote
    assert run.location == "s3://bucket/sweep/runs/full/seed1"
    assert run.path.is_relative_to(tmp_path / "cache" / "runs")
    assert RunDir.at(run.location).path == run.path  # every process of the run on this node: the same copy


def test_a_trial_spec_places_grid_trials_and_samples(tmp_path: Path) -> None:
    cfg = load_run_config(REPO / "configs" / "smoke.yaml")
    spec = TrialSpec(key="sim/full/seed1", config=cfg, run_dir=tmp_path / "runs" / "sim/full/seed1", home=None,
                     storage=str(tmp_path / "ray"), tags=("pa=on",), job_type="model")
    assert spec.name(None) == "sim-full-seed1"
    assert spec.name("ab12") == "sim-full-seed1-ab12"
    assert spec.run(None).path == spec.run_dir
    assert spec.run("ab12").path == spec.run_dir / "ab12"
    on_store = TrialSpec(**{**spec.__dict__, "home": "s3://b/runs/sim/full/seed1"})
    assert on_store.run("ab12").location == "s3://b/runs/sim/full/seed1/ab12"
    assert on_store.local_dir("ab12") == spec.run_dir / "ab12"  # the driver's copy (W&B runs, results)
    config = {"trial": spec, TUNED_KEY: {"optim.lr": 0.01}}
    assert trial_of(config) is spec
    assert tuned_of(config) == {"optim.lr": 0.01}
    assert tuned_of({"trial": spec}) == {}
    with pytest.raises(AttributeError):
        spec.key = "other"  # frozen


def test_results_rows_have_one_column_layout_and_older_tables_are_refused(tmp_path: Path) -> None:
    row = ResultRow(trial="full/seed1", dataset="", backbone="", arm="full", seed=1, stage="grid", status="ok",
                    attempts=1, error="", wall_s=2.0, best_epoch=1, config_hash="h", is_baseline=False,
                    backbone_weights="random", run_dir="/r", wandb_run="", config={"optim.lr": 0.1},
                    metrics={"test_mse_de": 0.5, "val_mse_de": 0.4}, params={"optim.lr": 0.1})
    cols = result_columns([row])
    assert cols[: len(REQUIRED) - 2] == list(REQUIRED[:-2])
    assert cols[-2:] == ["run_dir", "wandb_run"]
    assert cols[len(REQUIRED) - 2:-2] == ["cfg.optim.lr", "param.optim.lr", "test_mse_de", "val_mse_de"]
    assert set(row.record()) == set(cols)
    with pytest.raises(ValueError, match="status: 'done' is not one of ok, failed"):
        ResultRow(**{**row.__dict__, "status": "done"})
    check_columns(tmp_path / "results.csv", cols)
    with pytest.raises(DataError, match=r"results.csv: column\(s\) backbone, stage missing: .*older version"):
        check_columns(tmp_path / "results.csv", [c for c in cols if c not in ("backbone", "stage")])
