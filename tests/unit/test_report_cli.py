"""``pertadapt report SWEEP_DIR`` (the command module, on its own typer app)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from fixtures.synthetic_sweep import write_synthetic_sweep
from pertadapt.cli import report as report_cli
from pertadapt.config import ConfigError
from pertadapt.data.io import DataError


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer(pretty_exceptions_enable=False)
    report_cli.register(a)

    @a.callback()
    def _root() -> None:  # a group, so that the command is invoked by name as in `pertadapt report`
        """Test root."""

    return a


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_sweep(tmp_path_factory.mktemp("c") / "abl", arms={"full": 0.0, "no_fm": 0.2, "x": None},
                                 seeds=(1, 2), n_conditions=8, reference="x")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


def test_report_command_writes_report_prints_table_and_spec(app: typer.Typer, sweep: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(sweep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    d = sweep / "report"
    assert (d / "report.html").is_file()
    assert (d / "report.md").is_file()
    assert (d / "wandb_report.json").is_file()
    assert "reference: x" in res.output
    assert "no_fm" in res.output
    assert set(pd.read_csv(d / "paired_tests.csv")["reference"]) == {"x"}


def test_report_command_options(app: typer.Typer, sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(out), "--metric", "pearson_delta",
                                   "--metric", "test_mse_de", "--reference", "full", "--wandb-project", "pp",
                                   "--wandb-entity", "ee"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    tests = pd.read_csv(out / "paired_tests.csv")
    assert tests["metric"].tolist()[:2] == ["pearson_delta", "mse_de"]
    assert set(tests["reference"]) == {"full"}
    spec = json.loads((out / "wandb_report.json").read_text())
    assert (spec["project"], spec["entity"]) == ("pp", "ee")
    assert (out / "report.html").is_file()


def test_publish_tries_to_create_the_report_online(app: typer.Typer, sweep: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))  # no stored login either
    args = ["report", str(sweep), "--out", str(tmp_path / "p"), "--wandb-entity", "ee"]
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    with pytest.raises(ValueError, match=r"W&B Report not published .*the spec stays in .*wandb_report\.json"):
        CliRunner().invoke(app, [*args, "--publish"], catch_exceptions=False)


def test_report_command_errors_name_the_file_or_option(app: typer.Typer, sweep: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"results\.csv: not found"):  # exit 1 through pertadapt.cli.main.main
        CliRunner().invoke(app, ["report", str(tmp_path)], catch_exceptions=False)
    with pytest.raises(ConfigError, match="--metric 'msee'"):  # exit 2 through pertadapt.cli.main.main
        CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "o"), "--metric", "msee"],
                           catch_exceptions=False)
    assert not (tmp_path / "o").exists()


def test_report_on_a_running_sweep_reads_without_the_lock_and_says_so(app: typer.Typer, sweep: Path,
                                                                     tmp_path: Path, caplog) -> None:
    from pertadapt.sweep.lock import SweepLock

    lock = SweepLock(sweep).acquire()  # a sweep runs there (resumed: its earlier results.csv is there)
    try:
        with caplog.at_level("WARNING"):
            res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "r")],
                                     catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert "the sweep is still running (host" in caplog.text
        fresh = tmp_path / "fresh"
        second = SweepLock(fresh).acquire()  # a first run: no results.csv yet
        try:
            with pytest.raises(ConfigError, match=r"the sweep is still running \(host .*PID \d+.*results\.csv is "
                                                  r"written when it ends"):
                CliRunner().invoke(app, ["report", str(fresh)], catch_exceptions=False)
        finally:
            second.release()
    finally:
        lock.release()
    res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "r2")], catch_exceptions=False)
    assert res.exit_code == 0
