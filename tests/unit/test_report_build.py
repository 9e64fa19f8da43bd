"""The sweep report on disk: CSV layouts, failed and all-failed sweeps, options, figures, console table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from rich.console import Console
from scipy import stats

from fixtures.synthetic_sweep import synthetic_conditions, write_synthetic_sweep
from pertadapt.config import ConfigError
from pertadapt.config import metrics as metric_registry
from pertadapt.data.io import DataError
from pertadapt.data.summaries import write_predictions
from pertadapt.files import sha256_file
from pertadapt.report.bootstrap import hierarchical_bootstrap
from pertadapt.report.console import print_summary
from pertadapt.report.html import write_sweep_report
from pertadapt.report.results import REQUIRED, ResultRow
from pertadapt.report.tables import SUBGROUPS

ARMS = {"full": 0.0, "worse": 0.15, "same": None}
ERROR = "RuntimeError: CUDA out of memory (trial sim/worse/seed2)"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    root = write_synthetic_sweep(tmp_path_factory.mktemp("s") / "demo", arms=ARMS, seeds=(1, 2, 3), n_conditions=12,
                                 failed={"sim/worse/seed2": ERROR})
    return write_sweep_report(root)


def test_report_files_and_csv_layouts(written) -> None:
    d = written.directory
    assert d == written.report.sweep.root / "report"
    for name in ("report.html", "report.md", "summary.csv", "paired_tests.csv", "per_condition.csv",
                 "table_overall.csv", *(f"table_{s}.csv" for s in SUBGROUPS)):
        assert (d / name).is_file(), name
    tests = pd.read_csv(d / "paired_tests.csv")
    assert list(tests.columns[:5]) == ["dataset", "backbone", "arm", "reference", "metric"]
    assert {"n_pairs", "mean_diff", "ci_low", "ci_high", "statistic", "p", "p_holm", "verdict"} <= set(tests)
    # one row per (dataset, backbone, arm, metric): 3 arms besides full (worse, same, baseline_mean) × 4 metrics
    assert len(tests) == 3 * 4
    assert set(tests["reference"]) == {"full"}
    per = pd.read_csv(d / "per_condition.csv")
    assert list(per.columns) == ["dataset", "backbone", "arm", "seed", "condition", "subgroup", "metric", "value"]
    # 4 arms × 3 seeds − 1 failed trial = 11 ok trials, each 12 conditions × 4 metrics
    assert len(per) == 11 * 12 * 4
    one = per[(per["arm"] == "worse") & (per["seed"] == 1) & (per["metric"] == "mse_de")]
    run = pd.read_csv(written.report.sweep.root / "runs" / "sim" / "worse" / "seed1" / "per_condition.csv")
    np.testing.assert_allclose(one["value"].to_numpy(), run["mse_de"].to_numpy(), rtol=0, atol=0)
    assert sorted(p.name for p in written.figures) == ["forest_sim.png", "learning_curves_sim.png",
                                                      "subgroups_sim.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written.figures)


def test_failed_trial_is_listed_with_its_error_and_reduces_n(written) -> None:
    summary = pd.read_csv(written.summary_csv).set_index("arm")
    assert (summary.loc["worse", "n_trials"], summary.loc["worse", "n"], summary.loc["worse", "n_failed"]) == (3, 2, 1)
    assert summary.loc["full", "n"] == 3
    assert summary.loc["worse", "test_mse_de_n"] == 2
    results = pd.read_csv(written.report.sweep.root / "results.csv")
    ok = results[(results["arm"] == "worse") & (results["status"] == "ok")]
    assert summary.loc["worse", "test_mse_de_mean"] == pytest.approx(ok["test_mse_de"].mean(), rel=1e-12)
    overall = pd.read_csv(written.directory / "table_overall.csv").set_index("arm")
    assert overall.loc["worse", "mse_de"].endswith("n=2/3")
    assert overall.loc["full", "mse_de"].endswith("n=3/3")
    tests = pd.read_csv(written.paired_tests_csv)
    assert (tests.loc[tests["arm"] == "worse", "n_seeds"] == 2).all()
    html = written.html.read_text()
    md = written.markdown.read_text()
    for text in (html, md):
        assert ERROR in text
        assert "Failed, stopped or missing trials (1)" in text


def test_summary_intervals_are_the_hierarchical_bootstrap_of_per_condition_values(written) -> None:
    summary = written.report.summary.set_index("arm")
    per = written.report.sweep.per_condition
    for arm, scope, col in (("full", None, "test_mse_de"), ("worse", "combo_seen1", "test_combo_seen1_mse_de")):
        sel = per[(per["arm"] == arm) & (per["metric"] == "mse_de")]
        sel = sel[sel["subgroup"] == scope] if scope else sel
        expected = hierarchical_bootstrap([g.to_numpy() for _, g in sel.groupby("seed")["value"]])
        assert (summary.loc[arm, f"{col}_ci_low"], summary.loc[arm, f"{col}_ci_high"]) == expected
        assert summary.loc[arm, "ci_method"] == "bootstrap"
        assert expected[0] < summary.loc[arm, f"{col}_mean"] < expected[1]


def test_paper_layout_reference_first_baselines_last_best_bold(written) -> None:
    t = next(t for t in written.report.tables if t.scope == "overall")
    arms = [r[0] for r in t.rows]
    assert arms == ["full", "worse", "same", "baseline_mean"]
    assert [r[1] for r in t.rows] == [False, False, False, True]
    col = t.columns.index("mse_de")
    summary = written.report.summary.set_index("arm")
    best = summary["test_mse_de_mean"].idxmin()
    assert [r[0] for r in t.rows if r[3][col]] == sorted({best, *(["same", "full"] if best in ("same", "full")
                                                                  else [])}, key=arms.index)
    assert '<tr class="baseline">' in written.html.read_text()
    assert "| *baseline_mean* (baseline) |" in written.markdown.read_text()


def test_sentences_one_per_arm_in_markdown_and_html(written) -> None:
    s = written.report.sentences
    assert len(s) == 3
    assert s[0].startswith("`worse` worsens test mse_de on sim by +")
    assert "12 conditions × 2 seeds" in s[0]
    assert s[1].startswith("`same` shows no significant difference")
    md, html = written.markdown.read_text(), written.html.read_text()
    assert all(x in md for x in s)
    assert s[0].replace("`", "") in html


def test_every_trial_failed_still_gets_a_report(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    rows = [ResultRow(trial=trial, dataset="", backbone="", arm=arm, seed=1, stage="grid", status="failed",
                      attempts=1, error=error, wall_s=1.0, best_epoch=None, config_hash="", is_baseline=False,
                      backbone_weights="", run_dir="", wandb_run="")
            for trial, arm, error in (("a/seed1", "full", "ValueError: bad gene 'XYZ'"), ("b/seed1", "no_fm", ""))]
    pd.DataFrame([r.record() for r in rows]).to_csv(root / "results.csv", index=False)
    paths = write_sweep_report(root)
    html = paths.html.read_text()
    assert "Every one of the 2 trials failed" in html
    assert "ValueError: bad gene &#39;XYZ&#39;" in html
    assert "no final metrics (no error recorded)" in html
    assert "Every one of the 2 trials failed" in paths.markdown.read_text()
    assert pd.read_csv(paths.summary_csv)["n"].tolist() == [0, 0]
    console = Console(record=True, width=160)
    print_summary(paths.report, console)
    assert "failed b/seed1: no final metrics (no error recorded)" in console.export_text()
    assert paths.report.tests.empty
    assert not paths.figures


def test_header_only_results_csv_gets_a_report(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text(",".join(REQUIRED) + "\n")
    paths = write_sweep_report(tmp_path)
    assert "0 trials" in paths.html.read_text()
    console = Console(record=True, width=120)
    print_summary(paths.report, console)
    assert "reference: full" in console.export_text()


def test_not_a_sweep_dir_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"results\.csv: not found"):
        write_sweep_report(tmp_path)
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"results\.csv: column\(s\) trial, dataset, backbone, arm, seed, .* missing"):
        write_sweep_report(tmp_path)
    # a sweep written by an older version (no backbone, stage, ... columns) is refused, naming what is missing
    (tmp_path / "results.csv").write_text("trial,dataset,backbone_set,arm,seed,status,run_dir,wandb_run\n")
    with pytest.raises(DataError, match=r"column\(s\) backbone, stage, attempts, error, wall_s, device_s, device_kind, "
                                        r"best_epoch, config_hash, is_baseline, fm_weights, backbone_weights, gene_space missing: .*older "
                                        r"version"):
        write_sweep_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_reference_metric_and_out_options(written, tmp_path: Path) -> None:
    root = written.report.sweep.root
    other = write_sweep_report(root, out=tmp_path / "r", metrics=["test_pearson_delta"], reference="same")
    assert other.directory == tmp_path / "r"
    assert other.html.is_file()
    tests = pd.read_csv(other.paired_tests_csv)
    assert set(tests["metric"]) == {"pearson_delta"}
    assert set(tests["reference"]) == {"same"}
    assert set(tests["arm"]) == {"full", "worse", "baseline_mean"}
    assert other.report.tables[0].rows[0][0] == "same"
    assert other.report.tables[0].columns == ("pearson_delta",)
    assert "test pearson_delta" in other.report.sentences[0]
    with pytest.raises(ConfigError, match="--metric 'nope'"):
        write_sweep_report(root, out=tmp_path / "x", metrics=["nope"])
    with pytest.raises(ConfigError, match="reference arm 'fulll' is not in"):
        write_sweep_report(root, out=tmp_path / "x", reference="fulll")


def test_reference_defaults_to_sweep_json_then_full(tmp_path: Path) -> None:
    root = write_synthetic_sweep(tmp_path / "s", arms={"mine": 0.0, "other": 0.1}, seeds=(1,), n_conditions=4,
                                 reference="mine", baselines=())
    assert write_sweep_report(root).report.sweep.reference == "mine"
    (root / "sweep.json").unlink()
    with pytest.raises(ConfigError, match="reference arm 'full'"):
        write_sweep_report(root)


def test_moved_sweep_directory_reads_runs_from_its_new_place(written, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(written.report.sweep.root / "runs", moved / "runs")
    shutil.copy(written.report.sweep.root / "results.csv", moved / "results.csv")
    shutil.rmtree(written.report.sweep.root / "runs" / "sim" / "same")  # the recorded run_dir no longer exists
    try:
        paths = write_sweep_report(moved, reference="full")
        assert len(paths.report.sweep.per_condition) == len(written.report.sweep.per_condition)
    finally:
        shutil.copytree(moved / "runs" / "sim" / "same", written.report.sweep.root / "runs" / "sim" / "same")


def test_missing_per_condition_file_is_noted_not_averaged(tmp_path: Path) -> None:
    root = write_synthetic_sweep(tmp_path / "s", arms={"full": 0.0, "x": 0.1}, seeds=(1, 2), n_conditions=8,
                                 baselines=())
    (root / "runs" / "sim" / "x" / "seed2" / "per_condition.csv").unlink()
    paths = write_sweep_report(root)
    assert paths.report.tests["n_seeds"].tolist() == [1] * 4
    summary = paths.report.summary.set_index("arm")
    assert summary.loc["x", "ci_method"] == "t"
    assert summary.loc["full", "ci_method"] == "bootstrap"
    x = pd.read_csv(root / "results.csv").query("arm == 'x'")["test_mse_de"]
    lo, hi = stats.t.interval(0.95, 1, loc=x.mean(), scale=stats.sem(x))
    assert summary.loc["x", "test_mse_de_ci_low"] == pytest.approx(lo, rel=1e-12)
    assert summary.loc["x", "test_mse_de_ci_high"] == pytest.approx(hi, rel=1e-12)
    cells = {r[0]: r[2][0] for r in paths.report.tables[0].rows}
    assert "]†" in cells["x"]
    assert "†" not in cells["full"]
    assert any("sim/x/seed2" in n for n in paths.report.notes)
    assert "sim/x/seed2" in paths.html.read_text()


def _tiny_dataset(path: Path, conditions: list[str], n_genes: int = 30) -> dict[str, np.ndarray]:
    """A prepared-layout dataset: 3 cells per condition; returns the condition means."""
    rng = np.random.default_rng(0)
    genes = [f"gene{i}" for i in range(n_genes)]
    conds = ["ctrl", *conditions]
    means = {c: rng.uniform(0, 3, n_genes) for c in conds}
    x = np.vstack([means[c] + d for c in conds for d in (-0.1, 0.0, 0.1)])
    obs = pd.DataFrame({"condition": [c for c in conds for _ in range(3)]})
    obs["condition_name"] = "K562_" + obs["condition"]
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["rank_genes_groups_cov_all"] = {
        f"K562_{c}": np.array(genes)[np.argsort(-np.abs(means[c] - means["ctrl"]))] for c in conditions}
    adata.write_h5ad(path)
    return {c: np.asarray(x[3 * i: 3 * i + 3].mean(axis=0), dtype=np.float64) for i, c in enumerate(conds)}


def test_predicted_vs_observed_de_figure_reads_the_dataset_and_predictions(tmp_path: Path) -> None:
    conds = synthetic_conditions(6)
    data = tmp_path / "data.h5ad"
    means = _tiny_dataset(data, conds)
    root = write_synthetic_sweep(tmp_path / "s", arms={"full": 0.0, "x": 0.1}, seeds=(1,), n_conditions=6,
                                 baselines=(), data_path=data)
    genes = [f"gene{i}" for i in range(30)]
    for arm in ("full", "x"):
        write_predictions(root / "runs" / "sim" / arm / "seed1" / "test_predictions.h5ad", conds,
                          np.stack([means[c] for c in conds]), genes)
    paths = write_sweep_report(root)
    fig = next(f for f in paths.report.figures if f.name == "de_changes_sim.png")
    assert "top-20 DE genes of 4 test perturbations" in fig.caption
    assert fig.png[:4] == b"\x89PNG"
    assert (paths.directory / "de_changes_sim.png").is_file()
    ref_run = root / "runs" / "sim" / "full" / "seed1"
    (ref_run / "config.yaml").write_text("data: {path: /nonexistent.h5ad}\n")
    again = write_sweep_report(root)
    assert "de_changes_sim.png" not in [f.name for f in again.report.figures]
    assert any("no predicted-vs-observed DE figure" in n and "/nonexistent.h5ad" in n for n in again.report.notes)
    # provenance.json's data_path (simulated data: config.yaml has data.path null) wins, checked by SHA-256
    moved = shutil.copy(data, tmp_path / "moved.h5ad")
    (ref_run / "provenance.json").write_text(json.dumps({"data_path": str(moved), "data_sha256": sha256_file(data)}))
    assert "de_changes_sim.png" in [f.name for f in write_sweep_report(root).report.figures]
    with open(moved, "ab") as fh:
        fh.write(b"\0")
    changed = write_sweep_report(root)
    assert "de_changes_sim.png" not in [f.name for f in changed.report.figures]
    assert any("changed since the run" in n for n in changed.report.notes)


def test_truth_figure_only_on_simulated_results(written, tmp_path: Path) -> None:
    assert not any(f.name.startswith("truth_vs_observed") for f in written.report.figures)
    root = tmp_path / "sim"
    shutil.copytree(written.report.sweep.root, root, ignore=shutil.ignore_patterns("report"))
    results = pd.read_csv(root / "results.csv")
    results["test_truth_mse_de"] = results["test_mse_de"] * 0.5
    results["run_dir"] = ""
    results.to_csv(root / "results.csv", index=False)
    paths = write_sweep_report(root, reference="full")
    assert "truth_mse_de" in paths.report.metrics
    assert any(f.name == "truth_vs_observed_sim.png" for f in paths.report.figures)
    summary = pd.read_csv(paths.summary_csv).set_index("arm")
    assert summary.loc["full", "test_truth_mse_de_mean"] == pytest.approx(0.5 * summary.loc["full", "test_mse_de_mean"])


def test_console_summary_lists_arms_counts_verdicts_and_failures(written) -> None:
    console = Console(record=True, width=220)
    print_summary(written.report, console)
    text = console.export_text()
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 3}
    assert "reference" in lines["full"]
    assert "3/3" in lines["full"]
    assert "worse" in lines["worse"].split("│")[-2]
    assert "2/3" in lines["worse"]
    assert "no difference" in lines["same"]
    assert f"failed sim/worse/seed2: {ERROR}" in text


def test_per_condition_files_that_disagree_with_results_csv_are_noted(tmp_path: Path) -> None:
    root = write_synthetic_sweep(tmp_path / "s", arms={"full": 0.0, "x": 0.1}, seeds=(1, 2), n_conditions=8,
                                 baselines=())
    assert not any("disagrees" in n for n in write_sweep_report(root).report.notes)
    f = root / "runs" / "sim" / "x" / "seed2" / "per_condition.csv"
    per = pd.read_csv(f)
    per.loc[0, "mse_de"] += 1e-6  # row 0 is in combo_seen0: overall and that subgroup change
    per.to_csv(f, index=False)
    notes = [n for n in write_sweep_report(root).report.notes if "disagrees" in n]
    assert len(notes) == 1
    assert "2 value(s)" in notes[0]
    assert "sim/x/seed2 test_mse_de" in notes[0]
    assert "sim/x/seed2 test_combo_seen0_mse_de" in notes[0]


def test_metric_only_in_per_condition_files_is_tested_not_tabulated(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_synthetic_sweep(tmp_path / "s", arms={"full": 0.0, "x": 0.1}, seeds=(1, 2), n_conditions=8,
                                 baselines=())
    for f in (root / "runs").rglob("per_condition.csv"):
        per = pd.read_csv(f)
        per["extra_score"] = per["mse_de"] * 2
        per.to_csv(f, index=False)
    with pytest.raises(ConfigError, match=r"unknown metric 'extra_score'; known: mse_de, mse, "):
        write_sweep_report(root, metrics=["extra_score"])  # a direction is never guessed from a name
    monkeypatch.setattr(metric_registry, "_REGISTRY", dict(metric_registry._REGISTRY))  # undone after the test
    metric_registry.register_metric(metric_registry.MetricSpec("extra_score", "higher", "Extra", "custom"))
    paths = write_sweep_report(root, metrics=["extra_score"])
    assert paths.report.tests["verdict"].tolist() == ["better"]  # not an error name: higher is better
    assert not paths.report.tables
    assert any("no subgroup bars" in n for n in paths.report.notes)


def test_stopped_and_pending_trials_say_why_they_have_no_metrics(tmp_path: Path) -> None:
    rows = [ResultRow(trial=f"full/seed{seed}", dataset="", backbone="", arm="full", seed=seed, stage="grid",
                      status=status, attempts=1, error="", wall_s=1.0, best_epoch=None, config_hash="",
                      is_baseline=False, backbone_weights="", run_dir="", wandb_run="")
            for seed, status in ((1, "stopped_early"), (2, "pending"), (3, "failed"))]
    pd.DataFrame([r.record() for r in rows]).to_csv(tmp_path / "results.csv", index=False)
    errors = write_sweep_report(tmp_path).report.sweep.trials["error"].tolist()
    assert errors == ["stopped early by the scheduler (ASHA)", "not run (sweep interrupted?)",
                      "no final metrics (no error recorded)"]


def test_console_summary_shows_the_test_pairing_noise_next_to_the_metrics(tmp_path: Path) -> None:
    root = write_synthetic_sweep(tmp_path / "demo", arms={"full": 0.0, "worse": 0.15}, seeds=(1, 2), n_conditions=6)
    results = pd.read_csv(root / "results.csv")
    results["test_pairing_noise_mse_de"] = np.where(results["arm"] == "full", 0.0012, 0.0034)
    results.to_csv(root / "results.csv", index=False)
    console = Console(record=True, width=240)
    report = write_sweep_report(root).report
    print_summary(report, console)
    text = console.export_text()
    assert "pairing noise (mse_de)" in text
    assert any("pairing noise" in n and "full 0.0012" in n and "worse 0.0034" in n for n in report.notes)
    lines = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 3}
    assert "0.0012" in lines["full"]
    assert "0.0034" in lines["worse"]


def test_arm_descriptions_say_unset_and_leave_baselines_out() -> None:
    from pertadapt.report.document import _describe_arms

    trials = pd.DataFrame({"arm": ["pretrained", "random", "baseline_mean"], "is_baseline": [False, False, True],
                           "cfg.backbone.checkpoint": ["/ckpt", np.nan, np.nan], "cfg.optim.lr": [0.001, 0.001, np.nan]})
    # the random FM differs by the checkpoint it does not set; a baseline's unset model knobs are not listed
    assert _describe_arms(trials, "pretrained") == {"random": "backbone.checkpoint: unset"}
