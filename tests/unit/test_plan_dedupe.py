"""Plans without duplicates: a trial's identity (config hash) leaves out labels and unused sections; trials with
one identity run once, are planned once (with aliases) and are reported under every name."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from pertadapt.config import ConfigError, config_hash, load_run_config
from pertadapt.rundir import RunDir
from pertadapt.sweep.ablation import Ablation, load_ablation, run_of, shared_runs
from pertadapt.sweep.command import plan_paths
from pertadapt.sweep.plan import build_plan, diff_plans, plan_names
from pertadapt.sweep.results import TrialOutcome, collect_results

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
#: Two backbone sets and the FM on/off factor: the FM-off row and the baselines do not use the backbone.
TWO_BACKBONES = """\
name: dd
base: smoke.yaml
seeds: [1, 2]
baselines: true
backbones:
  small: {backbone.name: tiny, backbone.hidden_size: 16, backbone.heads: 2}
  wide: {backbone.name: tiny, backbone.hidden_size: 32, backbone.heads: 4}
factors:
  fm: {on: {}, off: {backbone.name: learned}}
"""
SHARED_ARMS = ("none", "baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear")


def _ablation(tmp_path: Path, body: str = TWO_BACKBONES, **kw: Any) -> Ablation:
    path = tmp_path / "abl.yaml"
    path.write_text(body)
    return load_ablation(path, **kw)


def _plan(abl: Ablation) -> dict[str, Any]:
    return build_plan(abl, None, {t.key: "/data/sim.h5ad" for t in abl.trials}, 2)


@pytest.mark.parametrize(("overrides", "same"), [
    (["name=other"], True),
    (["logging.group=g2", "logging.wandb=offline"], True),
    (["optim.lr=0.5"], False),
    (["backbone.hidden_size=64", "backbone.heads=4"], False),
    (["data.n_de=7"], False),
])
def test_a_networks_hash_leaves_out_its_labels_only(overrides: list[str], same: bool) -> None:
    assert (config_hash(load_run_config(SMOKE, overrides)) == config_hash(load_run_config(SMOKE))) is same


@pytest.mark.parametrize(("overrides", "same"), [
    (["backbone.name=aido_cell", "backbone.random_init=true"], True),
    (["optim.lr=0.5", "loss.name=gears", "adapter.enabled=false", "engine.cpus_per_worker=3"], True),
    (["model.k=3"], False),  # the baseline's own option
    (["data.n_de=7"], False),
    (["seed=2"], False),
])
def test_a_baselines_hash_leaves_out_the_sections_it_does_not_use(overrides: list[str], same: bool) -> None:
    base = ["model.name=baseline_linear"]
    a, b = load_run_config(SMOKE, [*base, *overrides]), load_run_config(SMOKE, base)
    assert a.unused_sections == ("backbone", "adapter", "loss", "optim", "engine")
    assert (config_hash(a) == config_hash(b)) is same


def test_shared_runs_are_the_first_of_each_identity_in_plan_order() -> None:
    ids = [("a", "h1"), ("b", "h2"), ("c", "h1"), ("d", "h3"), ("e", "h2"), ("f", "h1")]
    assert shared_runs(ids) == {"a": ["a", "c", "f"], "b": ["b", "e"], "d": ["d"]}
    assert shared_runs(ids) == shared_runs(list(ids))  # deterministic: a resumed sweep finds the same runs
    assert run_of(ids) == {"a": "a", "b": "b", "c": "a", "d": "d", "e": "b", "f": "a"}


def test_the_plan_runs_each_identity_once_and_lists_every_name(tmp_path: Path) -> None:
    abl = _ablation(tmp_path)
    assert len(abl.trials) == 2 * 6 * 2  # backbones × (fm, none, 4 baselines) × seeds
    plan = _plan(abl)
    hashes = [t["config_hash"] for t in plan["trials"]]
    assert len(hashes) == len(set(hashes)) == 2 * 2 + 5 * 2  # fm per backbone and seed; the others per seed
    for t in plan["trials"]:
        if t["arm"] in SHARED_ARMS:
            assert t["backbone"] == "small"
            assert [(a["key"], a["arm"], a["backbone"], a["seed"]) for a in t["aliases"]] == [
                (f"wide/{t['arm']}/seed{t['seed']}", t["arm"], "wide", t["seed"])]
        else:
            assert t["aliases"] == []
    names = plan_names(plan)
    assert list(names) == [t.key for t in abl.trials]  # every name, in plan order
    assert names["wide/none/seed2"]["run"] == "small/none/seed2"
    assert names["wide/baseline_mean/seed1"]["varying"]["backbone.name"] == "tiny"  # its own config values
    assert set(plan_paths(plan)) == {t.key for t in abl.trials}
    assert diff_plans(plan, json.loads(json.dumps(plan))) == []


def test_a_trial_that_stops_sharing_its_run_is_a_different_plan(tmp_path: Path) -> None:
    old = _plan(_ablation(tmp_path))
    new = _plan(_ablation(tmp_path, extra_overrides={"backbones.wide.model.hidden_size": 16}))
    diff = diff_plans(old, new)
    assert "trial wide/none/seed1: config changed (model.hidden_size: 32 → 16)" in diff
    assert not any("baseline" in line for line in diff)  # a baseline uses no network width


def test_an_unused_backbones_heads_are_not_checked_against_its_width(tmp_path: Path) -> None:
    """A 20-head FM fits a 640-wide one; the FM-off rows and gears ignore both and are shared across backbones."""
    abl = load_ablation(REPO / "ablations" / "paper_table.yaml", extra_overrides={
        "backbones.aido_cell.backbone.hidden_size": 640, "backbones.aido_cell.backbone.heads": 20})
    by_key = {t.key: t for t in abl.trials}
    for arm in ("none", "gears"):
        a, b = (by_key[f"norman/{bb}/{arm}/seed1"].config for bb in ("aido_cell", "scfoundation"))
        assert config_hash(a) == config_hash(b)
    assert by_key["norman/aido_cell/fm/seed1"].config.backbone.heads == 20
    with pytest.raises(ConfigError, match=r"arm 'fm' \(dataset 'norman', backbone 'aido_cell'.*backbone\.heads"):
        load_ablation(REPO / "ablations" / "paper_table.yaml", extra_overrides={
            "backbones.aido_cell.backbone.hidden_size": 640, "backbones.aido_cell.backbone.heads": 7})


def test_results_have_a_row_per_name_from_the_shared_run(tmp_path: Path) -> None:
    abl = _ablation(tmp_path)
    sweep = tmp_path / "sweep"
    hashes = {t.key: config_hash(t.run_config("/data/sim.h5ad")) for t in abl.trials}
    runs = shared_runs((t.key, hashes[t.key]) for t in abl.trials)
    outcomes = []
    for i, run in enumerate(runs):
        rd = RunDir(sweep / "runs" / run)
        rd.write_provenance({"config_hash": hashes[run]})
        rd.write_final_metrics({"best_epoch": 1, "test_mse_de": float(i)})
        outcomes.append(TrialOutcome(run, "grid", "ok", None, 1.0))
    with (collect_results(abl, sweep, outcomes, hashes)).open() as fh:
        rows = {r["trial"]: r for r in csv.DictReader(fh)}
    assert list(rows) == [t.key for t in abl.trials]
    assert all(r["status"] == "ok" for r in rows.values())
    for arm in SHARED_ARMS:
        small, wide = rows[f"small/{arm}/seed1"], rows[f"wide/{arm}/seed1"]
        assert (wide["arm"], wide["backbone"]) == (arm, "wide")
        assert wide["run_dir"] == small["run_dir"] == str(sweep / "runs" / f"small/{arm}/seed1")
        assert wide["test_mse_de"] == small["test_mse_de"]
    assert rows["wide/fm/seed1"]["run_dir"].endswith("runs/wide/fm/seed1")
    assert rows["wide/fm/seed1"]["test_mse_de"] != rows["small/fm/seed1"]["test_mse_de"]
