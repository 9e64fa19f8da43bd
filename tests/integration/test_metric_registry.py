"""A metric added through the registry alone: computed by evaluation, selected on, reported with its direction."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config import metrics as registry
from pertadapt.report.html import write_sweep_report
from pertadapt.report.results import ResultRow
from pertadapt.rundir import RunDir
from pertadapt.train.run import run

REPO = Path(__file__).resolve().parents[2]

TOY_MODULE = '''
import numpy as np

from pertadapt.config.metrics import MetricSpec, register_metric


def max_abs_error(pred, truth, ctrl, de):
    """Largest absolute error of the predicted mean over all genes."""
    return float(np.max(np.abs(pred - truth)))


register_metric(MetricSpec("toy_max_abs_error", "lower", "Max |error|", "custom", compute=max_abs_error))
'''


@pytest.fixture
def toy_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Register ``toy_max_abs_error`` by importing a module written to a temporary folder (undone afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = tmp_path / "toy_metric_module.py"
    path.write_text(TOY_MODULE)
    spec = importlib.util.spec_from_file_location("toy_metric_module", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_metric_module", module)
    spec.loader.exec_module(module)
    return "toy_max_abs_error"


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", "optim.epochs=2",
                                                            "optim.max_steps_per_epoch=2", *overrides])


def test_an_unknown_metric_is_refused_listing_the_known_ones(demo_h5ad: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.select_metric: expected .* one of mse_de, mse, .*'val_toy_max_abs_err"):
        _cfg(demo_h5ad, "eval.select_metric=val_toy_max_abs_error")
    with pytest.raises(ConfigError, match=r"unknown metric 'toy_max_abs_error'; known: mse_de, mse, pearson_delta"):
        registry.metric_spec("toy_max_abs_error")


def test_select_mode_defaults_from_the_metrics_direction(demo_h5ad: Path) -> None:
    assert _cfg(demo_h5ad).eval.select_mode == "min"  # val_mse_de: an error
    assert _cfg(demo_h5ad, "eval.select_metric=val_pearson_delta").eval.select_mode == "max"
    assert _cfg(demo_h5ad, "eval.select_metric=val_combo_seen0_truth_mse").eval.select_mode == "min"
    explicit = _cfg(demo_h5ad, "eval.select_metric=val_pearson_delta", "eval.select_mode=min")
    assert explicit.eval.select_mode == "min"  # an explicit mode is kept


def test_a_search_space_mode_defaults_from_the_metrics_direction(tmp_path: Path) -> None:
    from pertadapt.sweep.search_space import load_search_space

    space = tmp_path / "space.yaml"
    for metric, extra, mode in (("val_pearson_delta", "", "max"), ("val_mse_de", "", "min"),
                                ("val_pearson_delta", "mode: min\n", "min")):
        space.write_text(f"metric: {metric}\n{extra}params:\n  optim.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}\n")
        assert load_search_space(space).mode == mode


def test_a_toy_metric_is_computed_selected_on_and_reported_with_its_direction(
        toy_metric: str, demo_h5ad: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    rows, values = [], {}
    for arm, seed in (("full", 1), ("other", 7)):
        cfg = _cfg(demo_h5ad, f"eval.select_metric=val_{toy_metric}", f"seed={seed}")
        assert cfg.eval.select_mode == "min"  # from the registered direction
        rd = RunDir(sweep / "runs" / arm / "seed1")
        final = run(cfg, rd.path)
        # evaluation computed it on every split and subgroup, and per test condition
        assert final == json.loads(rd.final_metrics_file.read_text())
        assert {f"val_{toy_metric}", f"test_{toy_metric}", f"test_unseen_single_{toy_metric}"} <= set(final)
        assert np.isfinite(final[f"test_{toy_metric}"])
        per = pd.read_csv(rd.per_condition_file)
        assert final[f"test_{toy_metric}"] == pytest.approx(per[toy_metric].mean(), rel=1e-9)
        history = rd.history()
        assert final["best_epoch"] == int(np.argmin([r[f"val_{toy_metric}"] for r in history]))
        metrics = {k: v for k, v in final.items() if k != "best_epoch"}
        values[arm] = final[f"test_{toy_metric}"]
        rows.append(ResultRow(trial=f"{arm}/seed1", dataset="", backbone="", arm=arm, seed=1, stage="grid",
                              status="ok", attempts=1, error="", wall_s=1.0, best_epoch=final["best_epoch"],
                              config_hash="", is_baseline=False, backbone_weights="", run_dir=str(rd.path),
                              wandb_run="", metrics=metrics))
    assert values["full"] != values["other"]
    pd.DataFrame([r.record() for r in rows]).to_csv(sweep / "results.csv", index=False)
    paths = write_sweep_report(sweep, metrics=[toy_metric], reference="full")
    report = paths.report
    assert f"{toy_metric} (Max |error|, lower is better)" in paths.markdown.read_text()
    table = next(t for t in report.tables if t.scope == "overall")
    assert table.columns == (toy_metric,)
    best = [arm for arm, _, _, bold in table.rows if bold[0]]
    assert best == [min(values, key=values.get)]  # lower is better: the smaller value is the column's best
    verdict = report.tests.set_index("arm").loc["other", "verdict"]
    diff = report.tests.set_index("arm").loc["other", "mean_diff"]
    assert verdict == "no difference" or (verdict == "better") == (diff < 0)
