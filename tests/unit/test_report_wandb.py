"""W&B side of the report, offline: tables and figures on the summary run, the Report spec without network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.synthetic_sweep import write_synthetic_sweep
from pertadapt.report.html import write_sweep_report
from pertadapt.report.wandb import (
    build_wandb_report_spec,
    log_report_to_wandb,
    report_spec_from_json,
    report_spec_to_json,
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory):
    root = write_synthetic_sweep(tmp_path_factory.mktemp("w") / "abl", arms={"full": 0.0, "no_fm": 0.2},
                                 seeds=(1, 2), n_conditions=8)
    return write_sweep_report(root)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials and an unroutable server: any W&B network call fails instead of passing silently."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", "/nonexistent-wandb-config")


def test_summary_run_logs_tables_and_figures_offline(paths, no_network) -> None:
    run = log_report_to_wandb(paths, project="p")
    offline = sorted((paths.directory / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert run.group == "abl/summary"
    assert run.name == "abl-report"
    media = {p.relative_to(offline[0] / "files" / "media").as_posix().rsplit("_", 2)[0]
             for p in (offline[0] / "files" / "media").rglob("*") if p.is_file()}
    assert media == {"table/report/summary", "table/report/paired_tests", "images/report/forest_sim",
                     "images/report/subgroups_sim", "images/report/learning_curves_sim"}
    table = json.loads(next((offline[0] / "files" / "media" / "table" / "report").glob("paired*.json")).read_text())
    assert len(table["data"]) == len(paths.report.tests)
    assert "p_holm" in table["columns"]


def test_disabled_mode_logs_nothing(paths, tmp_path: Path) -> None:
    assert log_report_to_wandb(paths, mode="disabled") is None


def test_report_spec_is_built_offline_and_rebuilds_identically(paths, no_network) -> None:
    spec = build_wandb_report_spec(paths, project="proj", entity="")
    assert spec == paths.directory / "wandb_report.json"
    doc = json.loads(spec.read_text())
    assert (doc["__type__"], doc["project"], doc["entity"]) == ("Report", "proj", "")
    headings = [b["text"] for b in doc["blocks"] if b["__type__"] == "H2"]
    assert headings == ["Which components matter? The ablation table",
                        "How large are the differences to full? Forest plot",
                        "Did every arm train? Learning curves"]
    text = json.dumps(doc, ensure_ascii=False)
    assert paths.report.sentences[0] in text
    assert "report/forest_sim" in text
    assert "val_mse_de" in text
    assert "abl/no_fm" in text
    assert "abl/summary" in text
    report = report_spec_from_json(doc, entity="me")
    assert report.entity == "me"
    assert all(rs.entity == "me" for b in report.blocks
                                         for rs in getattr(b, "runsets", []))
    assert report_spec_to_json(report_spec_from_json(doc)) == doc


def test_report_spec_project_and_entity_default_from_environment(paths, no_network,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_ENTITY", "envent")
    doc = json.loads(build_wandb_report_spec(paths).read_text())
    assert (doc["project"], doc["entity"]) == ("envproj", "envent")
