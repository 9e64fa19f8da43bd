"""End-to-end single-process training (torch engine) on the simulated demo data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pertadapt.config import load_run_config
from pertadapt.train.run import run

REPO = Path(__file__).resolve().parents[2]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *overrides])


@pytest.fixture(scope="module")
def smoke_run(demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("smoke")
    return run_dir, run(_cfg(demo_h5ad), run_dir)


def test_run_dir_describes_itself(smoke_run: tuple[Path, dict], demo_h5ad: Path) -> None:
    run_dir, metrics = smoke_run
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "final_metrics.json", "test_predictions.h5ad"):
        assert (run_dir / name).is_file(), name
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert len(prov["git_sha"]) == 40
    assert len(prov["data_sha256"]) == 64
    assert len(prov["gene_order_sha256"]) == 64
    assert prov["world_size"] == 1
    assert set(prov["split"]["test"]).isdisjoint(prov["split"]["train"])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(demo_h5ad)
    assert np.isfinite(metrics["test_mse_de"])
    assert 0.0 < metrics["test_truth_mse_de"] < 1.0  # simulated data: scored against the noise-free truth
    assert metrics == pytest.approx(json.loads((run_dir / "final_metrics.json").read_text()))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.5)  # StepLR gamma 0.5 per epoch


def test_a_run_records_the_cpu_seconds_of_its_processes(smoke_run: tuple[Path, dict], demo_h5ad: Path,
                                                        tmp_path: Path) -> None:
    """``cost.json``: the process CPU time of the run (> 0, at most its wall seconds × processes, single-threaded
    here), for a model and for a baseline's fit and evaluation; it becomes the trial's CPU-seconds."""
    from pertadapt.report.results import device_seconds
    from pertadapt.rundir import RunDir

    cost = RunDir(smoke_run[0]).cost()
    assert cost["processes"] == 1
    assert 0.0 < cost["cpu_s"] <= cost["wall_s"] * cost["processes"] + 0.5
    assert device_seconds(wall_s=cost["wall_s"], gpus=0.0, cpu_s=cost["cpu_s"]) == (cost["cpu_s"], "cpu")
    start = time.perf_counter()
    run(_cfg(demo_h5ad, "model.name=baseline_mean"), tmp_path / "base")
    wall = time.perf_counter() - start
    base = RunDir(tmp_path / "base").cost()
    assert base["processes"] == 1
    assert 0.0 < base["cpu_s"] <= wall + 0.5
    assert base["wall_s"] <= wall


def test_same_seed_same_metrics(smoke_run: tuple[Path, dict], demo_h5ad: Path, tmp_path: Path) -> None:
    _, first = smoke_run
    again = run(_cfg(demo_h5ad), tmp_path / "again")
    assert again == pytest.approx(first, rel=1e-6, abs=1e-9)
    other = run(_cfg(demo_h5ad, "seed=7"), tmp_path / "other")
    assert other["test_mse_de"] != pytest.approx(first["test_mse_de"], rel=1e-6)


def test_best_checkpoint_reloads_and_reproduces_test_predictions(smoke_run: tuple[Path, dict], demo_h5ad: Path,
                                                                 assert_checkpoint_reproduces) -> None:
    run_dir, _ = smoke_run
    assert_checkpoint_reproduces(_cfg(demo_h5ad), run_dir)


def test_resume_continues_from_last_checkpoint(demo_h5ad: Path, tmp_path: Path) -> None:
    one = run(_cfg(demo_h5ad, "optim.epochs=1"), tmp_path / "r")
    assert one["best_epoch"] == 0
    resumed = run(_cfg(demo_h5ad, "optim.epochs=2"), tmp_path / "r", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    attempts = json.loads((tmp_path / "r" / "attempts.json").read_text())
    assert [(a["attempt"], a["resumed_from_epoch"]) for a in attempts] == [(1, None), (2, 1)]
    full = run(_cfg(demo_h5ad, "optim.epochs=2"), tmp_path / "full")
    assert resumed["test_mse_de"] == pytest.approx(full["test_mse_de"], rel=1e-5)
    assert rows[1]["train_loss"] == pytest.approx(json.loads(  # optimiser state and RNG restored: same epoch 1
        (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[1])["train_loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear"])
def test_baselines_run_as_models(name: str, demo_h5ad: Path, tmp_path: Path) -> None:
    m = run(_cfg(demo_h5ad, f"model.name={name}"), tmp_path / name)
    assert np.isfinite(m["test_mse_de"])
    assert (tmp_path / name / "test_predictions.h5ad").is_file()
    assert m["test_pairing_noise_mse_de"] > 0.0  # smoke.yaml: 20 controls per condition
    if name == "baseline_nochange":  # on the whole pool it predicts the control mean itself (on 20 controls, theirs)
        whole = run(_cfg(demo_h5ad, f"model.name={name}", "eval.val_controls=null", "eval.test_controls=null"),
                    tmp_path / "whole")
        assert whole["test_pearson_delta"] == pytest.approx(0.0)
        assert whole["test_pairing_noise_mse_de"] == 0.0


def test_the_linear_baselines_block_reaches_its_builder_in_a_run(demo_h5ad: Path, tmp_path: Path) -> None:
    """``model.k`` and ``model.ridge`` of a run's ``baseline_linear`` block change its predictions."""
    base = run(_cfg(demo_h5ad, "model.name=baseline_linear"), tmp_path / "base")
    for knob in ("model.k=2", "model.ridge=100.0"):
        other = run(_cfg(demo_h5ad, "model.name=baseline_linear", knob), tmp_path / knob)
        assert other["test_mse"] != base["test_mse"], knob


def test_go_options_change_the_structures_handed_to_the_model(demo_h5ad: Path) -> None:
    from pertadapt.train.setup import prepare_run_data

    base = prepare_run_data(_cfg(demo_h5ad))
    looser = prepare_run_data(_cfg(demo_h5ad, "go.mask_threshold=0.05"))
    assert len(looser.inputs.mask_indices) > len(base.inputs.mask_indices)
    rnd = prepare_run_data(_cfg(demo_h5ad, "adapter.attention_mask=random_degree_matched"))
    assert rnd.hashes["go_mask_sha256"] != base.hashes["go_mask_sha256"]
    assert abs(len(rnd.inputs.mask_indices) - len(base.inputs.mask_indices)) <= 0.05 * len(base.inputs.mask_indices)
    none = prepare_run_data(_cfg(demo_h5ad, "adapter.attention_mask=none"))
    assert none.inputs.mask_indptr is None
    sparser_graph = prepare_run_data(_cfg(demo_h5ad, "go.graph_top_k=2"))
    assert len(sparser_graph.inputs.graph_src) < len(base.inputs.graph_src)


def test_backed_data_trains_to_the_same_metrics(smoke_run: tuple[Path, dict], demo_h5ad: Path, tmp_path: Path) -> None:
    _, in_memory = smoke_run
    backed = run(_cfg(demo_h5ad, "data.backed=true"), tmp_path / "backed")
    assert backed["test_mse_de"] == pytest.approx(in_memory["test_mse_de"], rel=1e-6)


def test_select_mode_max_picks_the_epoch_with_the_highest_metric(demo_h5ad: Path, tmp_path: Path) -> None:
    m = run(_cfg(demo_h5ad, "optim.epochs=3", "eval.select_metric=val_pearson_delta", "eval.select_mode=max"),
            tmp_path / "max")
    rows = [json.loads(line) for line in (tmp_path / "max" / "metrics.jsonl").read_text().splitlines()]
    assert m["best_epoch"] == int(np.argmax([r["val_pearson_delta"] for r in rows]))
    again = run(_cfg(demo_h5ad, "optim.epochs=1"), tmp_path / "max")  # fresh run in the same dir
    assert len((tmp_path / "max" / "metrics.jsonl").read_text().splitlines()) == 1
    assert np.isfinite(again["test_mse_de"])


def test_fm_baseline_decoder_trains_and_writes_final_metrics(demo_h5ad: Path, tmp_path: Path,
                                                             assert_checkpoint_reproduces) -> None:
    """PA off (``off_mode: decoder``, the default): the GEARS decoder trains end to end on the demo preset."""
    cfg = _cfg(demo_h5ad, "adapter.enabled=false", "optim.epochs=1", "optim.max_steps_per_epoch=2")
    assert cfg.uses_fm_decoder
    m = run(cfg, tmp_path / "decoder")
    assert np.isfinite(m["test_mse_de"])
    assert m == pytest.approx(json.loads((tmp_path / "decoder" / "final_metrics.json").read_text()))
    rows = [json.loads(line) for line in (tmp_path / "decoder" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert np.isfinite(rows[0]["train_loss"])
    prov = json.loads((tmp_path / "decoder" / "provenance.json").read_text())
    assert len(prov["coexpress_sha256"]) == 64
    assert prov["go_mask_sha256"] == "none"  # no attention, no mask
    assert_checkpoint_reproduces(cfg, tmp_path / "decoder")


def test_coexpression_options_change_the_graph_handed_to_the_decoder(demo_h5ad: Path) -> None:
    from pertadapt.train.setup import prepare_run_data

    off = ["adapter.enabled=false"]
    base = prepare_run_data(_cfg(demo_h5ad, *off))
    n_genes = len(base.inputs.genes)
    # the simulator's control cells co-vary along its network (cell_noise_sd) and its shared programs
    # (program_sd): at |r| > 0.4 the self-loops survive and 69 pairs of the demo preset, both directions;
    # without the programs only 2 pairs do, both joined by a true edge
    src, dst = base.inputs.coexpress_src, base.inputs.coexpress_dst
    assert (src == dst).sum() == n_genes
    assert len(src) == n_genes + 138
    assert {(a, b) for a, b in zip(src, dst, strict=True)} == {(b, a) for a, b in zip(src, dst, strict=True)}
    loose = prepare_run_data(_cfg(demo_h5ad, *off, "model.coexpress_threshold=0.0"))
    assert len(loose.inputs.coexpress_src) == n_genes * 21  # top 20 + itself, every |r| > 0
    narrow = prepare_run_data(_cfg(demo_h5ad, *off, "model.coexpress_threshold=0.0", "model.coexpress_top_k=3"))
    assert len(narrow.inputs.coexpress_src) == n_genes * 4
    assert narrow.hashes["coexpress_sha256"] != loose.hashes["coexpress_sha256"]
    summed = prepare_run_data(_cfg(demo_h5ad, *off, "adapter.off_mode=sum"))
    assert summed.inputs.coexpress_src is None
    assert summed.hashes["coexpress_sha256"] == "none"
