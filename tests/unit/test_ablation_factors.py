"""Factorial ablation grids (``factors:``, ``exclude:``, ``rows:``) and the paper's cumulative table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.components import LearnedBackbone, PretrainedBackbone
from pertadapt.config.load import config_to_dict, dotted_to_nested
from pertadapt.sweep.ablation import Ablation, arm_name, load_ablation
from pertadapt.sweep.plan import plan_names
from pertadapt.sweep.results import flatten

REPO = Path(__file__).resolve().parents[2]

TOGGLES = """\
factors:
  fm: {on: {}, off: {backbone.name: learned}}
  pa: {on: {}, off: {adapter.enabled: false}}
  am: {on: {}, off: {adapter.attention_mask: none}}
"""
#: The rows of the PertAdapt paper's 'Ablation study' table: arm → FM, PA, AM, L_adapt checkmarks.
PAPER_ROWS = {"none": (0, 0, 0, 0), "fm": (1, 0, 0, 0), "fm+pa": (1, 1, 0, 0), "fm+pa+am": (1, 1, 1, 0),
              "fm+ladapt": (1, 0, 0, 1), "fm+pa+am+ladapt": (1, 1, 1, 1)}
#: The config key each paper toggle flips (PA off: adapter.enabled; AM off: the mask).
TOGGLE_KEY = {"fm": "backbone.name", "pa": "adapter.enabled", "am": "adapter.attention_mask", "ladapt": "loss.name"}


def _load(tmp_path: Path, body: str, **kw: Any) -> Ablation:
    path = tmp_path / "abl.yaml"
    path.write_text("name: x\nbase: smoke.yaml\nbaselines: false\n" + body)
    return load_ablation(path, **kw)


def _first_seed(abl: Ablation, **coords: str) -> dict[str, Any]:
    """arm → the trial of the first seed (at the given dataset/backbone)."""
    return {t.arm: t for t in abl.trials if t.seed == abl.seeds[0]
            and all(getattr(t, k) == v for k, v in coords.items())}


def _diff(a: Any, b: Any) -> set[str]:
    """Flattened config keys whose values differ (the trial's own name and W&B group left out); two different
    components of a section (``backbone.name``) differ in that name only, not in each of their own options."""
    fa, fb = flatten(config_to_dict(a.config)), flatten(config_to_dict(b.config))
    keys = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} - {"name", "logging.group"}
    switched = {k.partition(".")[0] for k in keys if k.endswith(".name") and k.count(".") == 1}
    return {k for k in keys if k.partition(".")[0] not in switched or k.endswith(".name")}


def test_arm_name_rule() -> None:
    assert arm_name({"fm": "on", "pa": "on", "am": "off", "ladapt": "on"}) == "fm+pa+ladapt"
    assert arm_name({"fm": "off", "pa": "off"}) == "none"
    assert arm_name({"fm": "on", "mask": "random", "ladapt": "off"}) == "fm+mask=random"
    assert arm_name({"heads": "4"}) == "heads=4"


def test_product_minus_exclude_in_order_with_levels_and_overrides(tmp_path: Path) -> None:
    abl = _load(tmp_path, TOGGLES + "exclude:\n  - {pa: off, am: on}\n")
    assert abl.arms == ("fm+pa+am", "fm+pa", "fm", "pa+am", "pa", "none")
    assert abl.reference_arm == "fm+pa+am"
    assert abl.factors == {"fm": ("on", "off"), "pa": ("on", "off"), "am": ("on", "off")}
    by_arm = _first_seed(abl)
    assert by_arm["pa+am"].levels == {"fm": "off", "pa": "on", "am": "on"}
    cfg = by_arm["pa"].config
    assert (cfg.backbone.name, cfg.adapter.enabled, cfg.adapter.attention_mask) == ("learned", True, "none")
    cfg = by_arm["fm+pa+am"].config
    assert (cfg.backbone.name, cfg.adapter.enabled, cfg.adapter.attention_mask) == ("tiny", True, "go")
    assert by_arm["none"].overrides["adapter.enabled"] is False


def test_levels_other_than_on_off_are_named_factor_equals_level(tmp_path: Path) -> None:
    abl = _load(tmp_path, "factors:\n  fm: {on: {}, off: {backbone.name: learned}}\n"
                          "  mask: {go: {}, random: {adapter.attention_mask: random_degree_matched}}\n"
                          "  heads: {2: {adapter.heads: 2}, 4: {adapter.heads: 4}}\n"
                          "exclude:\n  - {heads: 4}\n")
    assert abl.arms == ("fm+mask=go+heads=2", "fm+mask=random+heads=2", "mask=go+heads=2", "mask=random+heads=2")
    cfg = _first_seed(abl)["mask=random+heads=2"].config
    assert (cfg.backbone.name, cfg.adapter.attention_mask, cfg.adapter.heads) == ("learned",
                                                                                  "random_degree_matched", 2)


def test_rows_select_exactly_those_arms_in_order_next_to_named_arms(tmp_path: Path) -> None:
    abl = _load(tmp_path, TOGGLES + "rows:\n  - {fm: off, pa: off, am: off}\n  - {fm: on, pa: on, am: 'off'}\n"
                          "arms:\n  pa_plain: {adapter.attention_mask: none}\nreference_arm: pa_plain\n"
                          "seeds: [3, 4]\n")
    assert abl.arms == ("none", "fm+pa", "pa_plain")
    assert [t.key for t in abl.trials] == ["none/seed3", "none/seed4", "fm+pa/seed3", "fm+pa/seed4",
                                           "pa_plain/seed3", "pa_plain/seed4"]
    assert [t.config.seed for t in abl.trials] == [3, 4, 3, 4, 3, 4]
    assert [t.config.name for t in abl.trials[:2]] == ["none-seed3", "none-seed4"]
    assert _first_seed(abl)["pa_plain"].levels == {}
    # a named arm is the same config as the factorial row it spells out
    assert _diff(_first_seed(abl)["fm+pa"], _first_seed(abl)["pa_plain"]) == set()


def test_every_seed_config_equals_a_full_parse(tmp_path: Path) -> None:
    abl = _load(tmp_path, TOGGLES + "exclude:\n  - {pa: off}\n  - {am: off}\nseeds: [1, 7]\n")
    assert len(abl.trials) == 4
    for t in abl.trials:
        assert t.config == load_run_config("smoke.yaml", extra=dotted_to_nested(t.overrides))


@pytest.mark.parametrize(("body", "needle"), [
    (TOGGLES + "exclude:\n  - {pe: off}\n", r"exclude\[0\]\.pe: unknown factor; factors: fm, pa, am"),
    (TOGGLES + "exclude:\n  - {pa: maybe}\n", r"exclude\[0\]\.pa: unknown level 'maybe'; levels of pa: on, off"),
    (TOGGLES + "rows:\n  - {fm: on, pa: on, am: on, xx: on}\n", r"rows\[0\]\.xx: unknown factor"),
    (TOGGLES + "rows:\n  - {fm: on, pa: half, am: on}\n", r"rows\[0\]\.pa: unknown level 'half'"),
    (TOGGLES + "rows:\n  - {fm: on, pa: on}\n", r"rows\[0\]: a row gives a level for every factor; missing: am"),
    (TOGGLES + "rows:\n  - {fm: on, pa: on, am: on}\n  - {am: on, pa: on, fm: on}\n",
     r"rows\[1\]: the same row as rows\[0\]"),
    (TOGGLES + "rows: []\n", "rows: expected a non-empty list"),
    (TOGGLES + "rows:\n  - {fm: on, pa: on, am: on}\nexclude:\n  - {fm: on}\n", "rows / exclude: .*use one"),
    ("factors:\n  fm: {}\n", r"factors\.fm: expected a non-empty mapping of level → overrides"),
    ("factors:\n  fm: {on: {}, off: {backbone.name: learned}}\nexclude:\n  - {fm: on}\n  - {fm: off}\n",
     "exclude: drops every one of the 2 rows of factors:; no arm is left"),
    ("factors:\n  fm+pa: {on: {}}\n", r"'fm\+pa' is not a valid factor or level name"),
    ("factors:\n  fm: {random=1: {}}\n", "'random=1' is not a valid factor or level name"),
    ("factors:\n  fm: {on: learned}\n", r"factors\.fm\.on: expected a mapping of dotted config keys"),
    ("exclude:\n  - {fm: on}\narms: {a: {}}\n", "exclude / rows: select rows of factors:"),
    ("seeds: [1]\n", "arms / factors: expected a non-empty mapping"),
    ("factors:\n  pa: {on: {}, off: {adapter.enabled: false}}\n  lite: {on: {adapter.enabled: true}, off: {}}\n",
     r"factors\.pa\.off and factors\.lite\.on set adapter\.enabled to False and True in arm 'lite'"),
    (TOGGLES + "arms:\n  fm+pa: {}\n", r"arms\.fm\+pa: the name of an arm of factors: too \(the row "
                                       r"\{fm: on, pa: on, am: off\}\)"),
    ("factors:\n  fm: {on: {}, off: {backbone.nam: learned}}\n", r"arm 'none' .*backbone\.nam"),
])
def test_bad_factorial_input_names_the_file_key(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"abl\.yaml.*{needle}"):
        _load(tmp_path, body)


def test_adapter_off_mode_is_a_checked_choice() -> None:
    assert load_run_config("smoke.yaml").adapter.off_mode == "decoder"
    assert load_run_config("smoke.yaml", ["adapter.off_mode=sum"]).adapter.off_mode == "sum"
    with pytest.raises(ConfigError, match="adapter.off_mode: 'gears' is not one of decoder, sum"):
        load_run_config("smoke.yaml", ["adapter.off_mode=gears"])


SETS = TOGGLES + """\
datasets: {a: {}, b: {data.n_de: 10}}
backbones: {small: {}, wide: {backbone.hidden_size: 64}}
"""


def test_command_line_overrides_can_address_one_dataset_or_backbone_set(tmp_path: Path) -> None:
    data = tmp_path / "b.h5ad"
    base = load_run_config("smoke.yaml")
    abl = _load(tmp_path, SETS + "rows:\n  - {fm: on, pa: on, am: on}\n  - {fm: off, pa: on, am: on}\n",
                extra_overrides={"datasets.b.data.path": str(data), "backbones.wide.backbone.layers": 3,
                                 "backbones.wide.backbone.name": "tiny", "optim.lr": 0.5})
    for t in abl.trials:
        assert t.config.optim.lr == 0.5
        assert t.config.data.path == (str(data) if t.dataset == "b" else None)
        assert t.config.data.n_de == (10 if t.dataset == "b" else base.data.n_de)
        if t.config.backbone.is_foundation_model:
            assert t.config.backbone.layers == (3 if t.backbone == "wide" else base.backbone.layers)
    # the set's override sits below the arm's: the FM-off arm keeps its learned backbone (which has no sizes)
    fm_off = _first_seed(abl, dataset="a", backbone="wide")["pa+am"].config.backbone
    assert fm_off == LearnedBackbone()


def test_a_command_line_knob_of_the_network_reaches_the_model_arms_and_skips_the_baselines(tmp_path: Path) -> None:
    path = tmp_path / "abl.yaml"
    path.write_text("name: x\nbase: smoke.yaml\nbaselines: true\n" + TOGGLES + "rows:\n  - {fm: on, pa: on, am: on}\n")
    abl = load_ablation(path, extra_overrides={"model.head_init": "zero", "model.hidden_size": 16, "optim.lr": 0.5})
    models = [t for t in abl.trials if not t.is_baseline]
    baselines = [t for t in abl.trials if t.is_baseline]
    assert models
    assert len(baselines) == 4 * len(models)
    assert all(t.config.model.head_init == "zero" and t.config.model.hidden_size == 16 for t in models)
    assert all(t.config.optim.lr == 0.5 for t in abl.trials)  # not a model knob: every trial takes it
    assert all(not hasattr(t.config.model, "head_init") for t in baselines)
    with pytest.raises(ConfigError, match="model.head_iinit"):  # a typo is still refused (by the model arms)
        load_ablation(path, extra_overrides={"model.head_iinit": "zero"})


@pytest.mark.parametrize(("key", "needle"), [
    ("backbones.huge.backbone.layers", r"<name> one of the file's backbones \(small, wide\)"),
    ("datasets.a", r"datasets\.<name>\.<config key>=value"),
])
def test_an_override_for_an_unknown_set_lists_the_sets(tmp_path: Path, key: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"abl\.yaml: override '{key}': .*{needle}"):
        _load(tmp_path, SETS, extra_overrides={key: 3})
    with pytest.raises(ConfigError, match=r"none: the file has no datasets:"):
        _load(tmp_path, TOGGLES, extra_overrides={"datasets.a.data.n_de": 3})


#: The demo's arms: the paper's rows with the pretrained FM, the random-FM control row, the quality row.
DEMO_ARMS = ("none", "fm=pretrained", "fm=pretrained+pa", "fm=pretrained+pa+am", "fm=pretrained+ladapt",
             "fm=pretrained+pa+am+ladapt", "fm=random+pa+am+ladapt", "fm=pretrained+pa+am+ladapt=mse+quality")
DEMO_FULL = "fm=pretrained+pa+am+ladapt"


def test_demo_grid_is_the_paper_rows_with_the_full_model_as_reference() -> None:
    abl = load_ablation(REPO / "ablations" / "demo.yaml")
    assert abl.arms == (*DEMO_ARMS, "baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear")
    assert abl.reference_arm == DEMO_FULL
    assert abl.seeds == (1, 2)
    assert len(abl.trials) == 24
    by_arm = _first_seed(abl)
    assert by_arm["fm=pretrained"].config.loss.name == "gears"  # L_adapt off = the GEARS loss (the reference's)
    pretrain = str((REPO / "configs" / "pretrain_demo.yaml").resolve())  # found relative to the ablation file
    assert by_arm[DEMO_FULL].config == load_run_config("demo.yaml", [f"name={DEMO_FULL}-seed1",
                                                                     f"logging.group=demo/{DEMO_FULL}",
                                                                     f"backbone.pretrain={pretrain}"])
    # the paper's six rows keep their FM, PA, AM, L_adapt levels, the FM rows pretrained
    for arm, marks in PAPER_ROWS.items():
        levels = by_arm[DEMO_ARMS[list(PAPER_ROWS).index(arm)]].levels
        assert [levels[f] != "off" for f in ("fm", "pa", "am", "ladapt")] == [bool(m) for m in marks]
        assert levels["fm"] in ("pretrained", "off")
        assert levels["quality"] == "off"
    assert {t.config.backbone.fm_weights for t in abl.trials if not t.is_baseline} == {"none", "random", "pretrained"}


def test_the_demo_quality_arm_changes_the_three_settings_it_claims() -> None:
    """The control arm is the full model with model.head_init=zero, adapter.inject=perturbed, loss.name=mse."""
    by_arm = _first_seed(load_ablation(REPO / "ablations" / "demo.yaml"))
    full, quality = by_arm[DEMO_FULL], by_arm["fm=pretrained+pa+am+ladapt=mse+quality"]
    assert _diff(quality, full) == {"model.head_init", "adapter.inject", "loss.name"}
    assert (quality.config.model.head_init, quality.config.adapter.inject, quality.config.loss.name) == (
        "zero", "perturbed", "mse")
    assert (full.config.model.head_init, full.config.adapter.inject, full.config.loss.name) == (
        "xavier", "all", "adaptive")
    assert quality.levels == {"fm": "pretrained", "pa": "on", "am": "on", "ladapt": "mse", "quality": "on"}


def test_toggles_name_what_sets_an_arm_apart_from_the_reference_arm(tmp_path: Path) -> None:
    """The W&B tags of a trial: factor levels for factorial arms, differing overrides otherwise."""
    abl = load_ablation(REPO / "ablations" / "demo.yaml")
    by_arm = _first_seed(abl)
    assert abl.toggles(by_arm[DEMO_FULL]) == []
    assert abl.toggles(by_arm["fm=pretrained+pa"]) == ["am=off", "ladapt=off"]
    assert abl.toggles(by_arm["none"]) == ["fm=off", "pa=off", "am=off", "ladapt=off"]
    assert abl.toggles(by_arm["fm=random+pa+am+ladapt"]) == ["fm=random"]
    assert abl.toggles(by_arm["baseline_mean"]) == ["model.name=baseline_mean"]
    named = tmp_path / "named.yaml"
    named.write_text(f"name: n\nbase: {REPO / 'configs' / 'demo.yaml'}\nseeds: [3]\nbaselines: false\n"
                     "arms:\n  full: {}\n  pa_sum: {adapter.enabled: false, adapter.off_mode: sum}\n")
    abl = load_ablation(named)
    assert abl.toggles(_first_seed(abl)["pa_sum"]) == ["adapter.enabled=False", "adapter.off_mode=sum"]


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("paper") / "plan"
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "pertadapt.cli", "sweep",
                          "ablations/paper_table.yaml", "--out", str(out), "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]
    return json.loads((out / "plan.json").read_text()), res


def test_paper_table_dry_run_lists_the_six_rows_per_backbone_and_dataset(paper_plan) -> None:
    plan, res = paper_plan
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m == "ray" or m.startswith("ray.")}  # a dry run never even imports Ray
    assert "260 trials" in res.stdout
    assert plan["reference_arm"] == "fm+pa+am+ladapt"
    assert plan["factors"] == {f: ["on", "off"] for f in ("fm", "pa", "am", "ladapt")}
    trials = list(plan_names(plan).values())  # every name: a shared run's aliases too
    assert {(t["dataset"], t["backbone"]) for t in trials} == {(d, b) for d in ("norman", "rpe1")
                                                               for b in ("aido_cell", "scfoundation")}
    for ds, preset in (("norman", "norman_like"), ("rpe1", "replogle_like")):
        for bb in ("aido_cell", "scfoundation"):
            cell = [t for t in trials if t["dataset"] == ds and t["backbone"] == bb]
            arms = list(dict.fromkeys(t["arm"] for t in cell))
            assert arms == [*PAPER_ROWS, "am_random", "pa_sum", "gears", "baseline_nochange", "baseline_mean",
                            "baseline_additive", "baseline_linear"]
            for t in cell:
                assert t["varying"]["data.simulate_preset"] == preset
                assert f"/{preset}_seed0_" in t["data_path"]
                if t["arm"] in PAPER_ROWS:
                    assert t["levels"] == dict(zip(TOGGLE_KEY, ("on" if c else "off" for c in PAPER_ROWS[t["arm"]]),
                                                   strict=True))
                    fm, pa, am, ladapt = PAPER_ROWS[t["arm"]]
                    v = t["varying"]
                    assert v["backbone.name"] == (bb if fm else "learned")
                    assert v["adapter.enabled"] is bool(pa)
                    assert v["adapter.attention_mask"] == ("go" if am else "none")
                    assert v["loss.name"] == ("adaptive" if ladapt else "gears")
                else:
                    assert t["levels"] == {}
            assert sorted({t["seed"] for t in cell}) == [1, 2, 3, 4, 5]
            assert len(cell) == 13 * 5


def test_paper_table_dry_run_plans_each_backbone_independent_trial_once(paper_plan) -> None:
    plan, res = paper_plan
    assert "260 trials in 200 runs" in res.stdout
    runs = plan["trials"]
    assert len({t["config_hash"] for t in runs}) == len(runs) == 200  # no two plan entries with one config hash
    independent = {"none", "gears", "baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear"}
    for ds in ("norman", "rpe1"):
        for seed in (1, 2, 3, 4, 5):
            cell = [t for t in runs if t["dataset"] == ds and t["seed"] == seed]
            for arm in {t["arm"] for t in cell}:
                mine = [t for t in cell if t["arm"] == arm]
                if arm in independent:  # once per dataset and seed, reported under the other backbone too
                    assert [(t["backbone"], [a["key"] for a in t["aliases"]]) for t in mine] == [
                        ("aido_cell", [f"{ds}/scfoundation/{arm}/seed{seed}"])]
                else:
                    assert sorted(t["backbone"] for t in mine) == ["aido_cell", "scfoundation"]
                    assert all(t["aliases"] == [] for t in mine)
    # the model trials ask for one GPU each (resources:), the baselines for none; planned on a CPU-only machine
    assert {(t["is_baseline"], t["workers"], t["gpus_per_worker"]) for t in runs} == {(False, 1, 1.0), (True, 1, 0.0)}


#: The README's overrides for one dataset and one backbone (paths need not exist to build the configs).
REAL = {"datasets.norman.data.path": "/data/norman.h5ad", "backbones.aido_cell.backbone.checkpoint": "/ckpt/aido",
        "backbones.aido_cell.backbone.random_init": False}


@pytest.fixture(scope="module")
def paper_table() -> Ablation:
    return load_ablation(REPO / "ablations" / "paper_table.yaml", extra_overrides=REAL)


def test_paper_rows_differ_exactly_in_the_papers_checkmarks(paper_table: Ablation) -> None:
    for ds in ("norman", "rpe1"):
        for bb in ("aido_cell", "scfoundation"):
            rows = _first_seed(paper_table, dataset=ds, backbone=bb)
            assert rows["none"].config.backbone.name == "learned"
            assert not rows["none"].config.backbone.weights_are_random
            for a in PAPER_ROWS:
                for b in PAPER_ROWS:
                    flipped = [f for f, x, y in zip(TOGGLE_KEY, PAPER_ROWS[a], PAPER_ROWS[b], strict=True) if x != y]
                    if len(flipped) == 1:
                        assert _diff(rows[a], rows[b]) == {TOGGLE_KEY[flipped[0]]}, (ds, bb, a, b)
            full = rows["fm+pa+am+ladapt"]
            assert _diff(rows["am_random"], full) == {"adapter.attention_mask"}
            assert rows["am_random"].config.adapter.attention_mask == "random_degree_matched"
            assert _diff(rows["pa_sum"], full) == {"adapter.enabled", "adapter.off_mode"}
            assert rows["pa_sum"].config.adapter.off_mode == "sum"
            # GEARS: the 'none' row (learned embedding, PA off, GEARS loss) at GEARS's sizes and learning rate
            assert _diff(rows["gears"], rows["none"]) == {"model.hidden_size", "model.head_hidden", "optim.lr"}
            g = rows["gears"].config
            assert (g.model.hidden_size, g.model.head_hidden, g.backbone, g.optim.lr) == (64, 128, LearnedBackbone(),
                                                                                          1e-3)


def test_paper_table_takes_real_data_and_checkpoints_per_dataset_and_backbone(paper_table: Ablation) -> None:
    for t in paper_table.trials:
        cfg = t.config
        assert cfg.data.path == ("/data/norman.h5ad" if t.dataset == "norman" else None)
        if isinstance(cfg.backbone, PretrainedBackbone):  # the FM-off rows' learned backbone has no checkpoint
            assert cfg.backbone.checkpoint == ("/ckpt/aido" if t.backbone == "aido_cell" else None)
        if cfg.backbone.is_foundation_model and not cfg.is_baseline:
            # without a checkpoint the FM rows are random FMs (backbone.random_init: true in the file)
            assert cfg.backbone.weights_are_random is (t.backbone == "scfoundation")
