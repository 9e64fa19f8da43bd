"""One metric path: a run's final test metrics are what `pertadapt eval` computes on its saved predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["pertadapt", "baseline_linear"])
def test_final_metrics_equal_pertadapt_eval_on_the_predictions(tmp_path: Path, demo_h5ad: Path, model: str) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pertadapt.cli"]
    subprocess.run([*cmd, "train", "configs/smoke.yaml", f"data.path={demo_h5ad}", f"model.name={model}",
                    "optim.epochs=1", "--out", str(run_dir)], cwd=REPO, check=True, capture_output=True, timeout=900)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    prov = json.loads((run_dir / "provenance.json").read_text())
    split = tmp_path / "split.json"
    split.write_text(json.dumps(prov["split"]))
    subprocess.run([*cmd, "eval", "--pred", str(run_dir / "test_predictions.h5ad"), "--data", str(demo_h5ad),
                    "--split", str(split), "--out", str(tmp_path / "m.json")], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    doc = json.loads((tmp_path / "m.json").read_text())
    expected = {f"test_{k}": v for k, v in doc["overall"].items()}
    for group, values in doc["subgroups"].items():
        expected.update({f"test_{group}_{k}": v for k, v in values.items()})
    # test_pairing_noise_mse_de describes the evaluation controls (20 of the pool per condition), not the predictions
    assert final["test_pairing_noise_mse_de"] > 0.0
    got = {k: v for k, v in final.items()
           if k.startswith("test_") and not k.startswith(("test_truth_", "test_pairing_noise_"))}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # and the per-condition file averages back to the subgroup metrics
    import pandas as pd

    per = pd.read_csv(run_dir / "per_condition.csv")
    for group, values in doc["subgroups"].items():
        rows = per[per["subgroup"] == group]
        assert rows["mse_de"].mean() == pytest.approx(values["mse_de"], rel=1e-9)
