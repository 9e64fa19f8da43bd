"""``backbone.pretrain`` as a config key: exclusive with ``checkpoint``/``random_init``, found like ``base:``,
checked against the pretrain config's FM, never pretrained by a dry run; the FM weights label of a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.pretrain import load_pretrain_config
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.sweep.command import SweepRequest, run_sweep_from_files
from pertadapt.train.fm_weights import backbone_weights, check_pretrain

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
PRETRAIN_DEMO = str((REPO / "configs" / "pretrain_demo.yaml").resolve())


@pytest.mark.parametrize(("overrides", "needle"), [
    (["backbone.pretrain=pretrain_demo.yaml", "backbone.checkpoint=/x"],
     r"backbone\.pretrain: .*but backbone\.checkpoint is set too .*choose one"),
    (["backbone.name=aido_cell", "backbone.pretrain=pretrain_demo.yaml", "backbone.random_init=true"],
     r"backbone\.random_init: true, but backbone\.pretrain is set; choose one"),
    (["backbone.checkpoint_sha256=abc"], r"backbone\.checkpoint_sha256: set without backbone\.checkpoint"),
    (["backbone.pretrain=no_such.yaml"], r"key 'backbone\.pretrain': no_such\.yaml: file not found"),
    (["backbone.name=learned", "backbone.pretrain=pretrain_demo.yaml"],
     r"backbone\.pretrain: not an option of backbone 'learned'"),
])
def test_bad_pretrain_settings_are_config_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_run_config(SMOKE, overrides)


def test_a_named_fm_may_take_its_weights_from_pretrain() -> None:
    cfg = load_run_config(SMOKE, ["backbone.name=aido_cell", "backbone.pretrain=pretrain_demo.yaml"])
    assert cfg.backbone.fm_weights == "pretrained"
    assert cfg.backbone.with_random_weights().random_init
    assert cfg.backbone.with_random_weights().fm_weights == "random"


def test_pretrain_paths_are_found_like_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a file: relative to that file, then among the shipped configs; on the command line: the working
    directory first; stored absolute."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(f"base: {REPO / 'configs' / 'pretrain_demo.yaml'}\nsteps: 5\n")
    run = tmp_path / "sub" / "run.yaml"
    run.write_text(f"base: {SMOKE}\nbackbone: {{pretrain: mine.yaml}}\n")
    assert load_run_config(run).backbone.pretrain == str((tmp_path / "sub" / "mine.yaml").resolve())
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(f"base: {SMOKE}\nbackbone: {{pretrain: pretrain_demo.yaml}}\n")
    assert load_run_config(shipped).backbone.pretrain == PRETRAIN_DEMO
    monkeypatch.chdir(tmp_path)
    assert load_run_config(SMOKE, ["backbone.pretrain=sub/mine.yaml"]).backbone.pretrain == str(
        (tmp_path / "sub" / "mine.yaml").resolve())


def test_fm_weights_label_of_each_backbone() -> None:
    labels = {name: load_run_config(SMOKE, o).backbone.fm_weights for name, o in {
        "learned": ["backbone.name=learned"], "tiny": [], "random_init": ["backbone.name=aido_cell",
                                                                          "backbone.random_init=true"],
        "pretrain": ["backbone.pretrain=pretrain_demo.yaml"], "checkpoint": ["backbone.checkpoint=/x"]}.items()}
    assert labels == {"learned": "none", "tiny": "random", "random_init": "random", "pretrain": "pretrained",
                      "checkpoint": "pretrained"}
    assert backbone_weights(load_run_config(SMOKE, ["model.name=baseline_mean"])) == {
        "fm": "none", "summary": "none (baseline)"}
    assert backbone_weights(load_run_config(SMOKE, ["backbone.name=learned"])) == {
        "fm": "none", "summary": "none (FM off)"}
    assert backbone_weights(load_run_config(SMOKE)) == {"fm": "random", "summary": "random tiny (random init)"}


def test_an_unresolved_pretrain_is_never_built_as_random_weights() -> None:
    cfg = load_run_config(SMOKE, ["backbone.pretrain=pretrain_demo.yaml"])
    with pytest.raises(ConfigError, match=r"backbone\.pretrain: .* is not resolved to its checkpoint"):
        build_backbone(cfg.backbone, genes=[f"G{i}" for i in range(8)], width=8)
    with pytest.raises(ConfigError, match=r"backbone\.pretrain: .* is not resolved"):
        backbone_weights(cfg)


def test_a_pretrain_config_of_another_fm_is_refused(tmp_path: Path) -> None:
    check_pretrain(load_run_config(REPO / "configs" / "demo.yaml", ["backbone.pretrain=pretrain_demo.yaml"]))
    cfg = load_run_config(REPO / "configs" / "demo.yaml", ["backbone.pretrain=pretrain_demo.yaml",
                                                           "backbone.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"pretrains another FM than this run's backbone block declares "
                                          r"\(hidden_size: 32 there, 64 here\)"):
        check_pretrain(cfg)
    with pytest.raises(ConfigError, match=r"backbone\.pretrain: pretraining starts from random weights"):
        load_pretrain_config("pretrain_demo.yaml", ["backbone.pretrain=pretrain_demo.yaml"])


def test_the_demo_dry_run_plans_the_fm_levels_without_pretraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERTADAPT_CACHE", str(cache))
    run_sweep_from_files(SweepRequest(REPO / "ablations" / "demo.yaml", out=tmp_path / "plan", dry_run=True))
    assert f"FM weights: 12 trial(s) load the FM of {PRETRAIN_DEMO} pretrained on" in " ".join(
        capsys.readouterr().out.split())
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    fm = {t["arm"]: t["levels"].get("fm") for t in plan["trials"]}
    assert set(fm.values()) == {"pretrained", "random", "off", None}  # None: the baselines
    assert fm["fm=random+pa+am+ladapt"] == "random"
    assert {t["levels"]["fm"] for t in plan["trials"] if t["varying"].get("backbone.pretrain") == PRETRAIN_DEMO} == {
        "pretrained"}
    assert len(plan["trials"]) == 24
    assert not (cache / "pretrained").exists()  # a dry run plans the declared sizes, it pretrains nothing
    bad = tmp_path / "bad.yaml"  # an arm whose FM is wider than the one its pretrain config pretrains
    bad.write_text(f"name: bad\nbase: {REPO / 'configs' / 'demo.yaml'}\nbaselines: false\narms:\n"
                   "  wide: {backbone.pretrain: pretrain_demo.yaml, backbone.hidden_size: 64}\n")
    with pytest.raises(ConfigError, match=r"hidden_size: 32 there, 64 here"):
        run_sweep_from_files(SweepRequest(bad, out=tmp_path / "bad", dry_run=True))
    assert not (tmp_path / "bad").exists()
