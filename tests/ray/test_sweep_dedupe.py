"""A sweep runs trials with one identity once (one Tune trial, one run dir) and reports them under every name."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
#: Two backbone sets, the full model and the FM-off row (which ignores the backbone), one baseline, one seed:
#: 6 names, 4 runs (small/none and wide/none are one run, so are the two baseline_mean trials).
TWO_BACKBONES = """name: dedupe-ci
base: smoke.yaml
seeds: [1]
baselines: false
max_concurrent_trials: 2
backbones:
  small: {backbone.hidden_size: 16, backbone.heads: 2}
  wide: {backbone.hidden_size: 32, backbone.heads: 4}
arms:
  fm: {}
  none: {backbone.name: learned, adapter.enabled: false, adapter.attention_mask: none, loss.name: gears}
  baseline_mean: {model.name: baseline_mean}
"""
SHARED = ("none", "baseline_mean")


def _sweep(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", "sweep", *args, "optim.epochs=1",
                          "optim.max_steps_per_epoch=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def _rows(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "results.csv").open() as fh:
        return {r["trial"]: r for r in csv.DictReader(fh)}


def test_a_shared_trial_runs_once_and_is_reported_under_each_name(tmp_path: Path, cache_dir: Path) -> None:
    ablation, out = tmp_path / "dedupe.yaml", tmp_path / "sweep"
    ablation.write_text(TWO_BACKBONES)
    _sweep(str(ablation), "--out", str(out))
    plan = json.loads((out / "plan.json").read_text())
    assert [t["key"] for t in plan["trials"]] == ["small/fm/seed1", "small/none/seed1", "small/baseline_mean/seed1",
                                                  "wide/fm/seed1"]
    ran = sorted(str(p.parent.relative_to(out / "runs")) for p in (out / "runs").rglob("provenance.json"))
    assert ran == ["small/baseline_mean/seed1", "small/fm/seed1", "small/none/seed1", "wide/fm/seed1"]
    assert len(list((out / "ray" / "grid").glob("*/params.json"))) == 4  # one Tune trial per run
    for key in ("small/fm/seed1", "wide/fm/seed1"):  # the driver built both tables before any trial: opened only
        cache = json.loads((out / "runs" / key / "provenance.json").read_text())["embedding_cache"]
        assert (cache["used"], cache["hit"], cache["build_s"]) == (True, True, 0.0), key
    rows = _rows(out)
    assert sorted(rows) == sorted(f"{bb}/{arm}/seed1" for bb in ("small", "wide") for arm in ("fm", *SHARED))
    assert all(r["status"] == "ok" and r["attempts"] == "1" for r in rows.values())
    for arm in SHARED:
        small, wide = rows[f"small/{arm}/seed1"], rows[f"wide/{arm}/seed1"]
        assert wide["backbone"] == "wide"
        assert wide["run_dir"] == small["run_dir"]
        assert wide["test_mse_de"] == small["test_mse_de"]
        assert wide["config_hash"] == small["config_hash"]
    assert rows["wide/fm/seed1"]["config_hash"] != rows["small/fm/seed1"]["config_hash"]
    assert "6 trials: 6 ok" in (out / "report" / "report.html").read_text()  # every name in the report
    # a resumed sweep finds its finished runs (the same first-in-plan-order run per identity): nothing reruns
    metrics = {k: r["test_mse_de"] for k, r in rows.items()}
    _sweep(str(ablation), "--out", str(out), "--resume")
    again = _rows(out)
    assert {k: r["test_mse_de"] for k, r in again.items()} == metrics
    assert all(r["status"] == "ok" and r["attempts"] == "1" for r in again.values())
