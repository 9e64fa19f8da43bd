"""The FM question as an ablation factor: ``backbone.pretrain`` resolved once per sweep, ``fm: random`` vs
``fm: pretrained`` differing only in weights, and the FM weights named in provenance, results.csv and the report.

Pretraining here is the demo's pretrain config cut to 3 steps, into a cache of this module's own (so the test
counts a real first pretraining); the data is the session's demo file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.load import config_hash, config_to_dict
from pertadapt.models.build import build_model
from pertadapt.report.console import print_summary
from pertadapt.report.html import write_sweep_report
from pertadapt.rundir import RunDir
from pertadapt.sweep.command import SweepRequest, _prepare, _resolve_pretrains
from pertadapt.sweep.results import TrialOutcome, collect_results, flatten
from pertadapt.train.fm_weights import backbone_weights, checkpoint_sha256
from pertadapt.train.run import seed_everything
from pertadapt.train.setup import prepare_run_data
from pertadapt.train.worker import launch

REPO = Path(__file__).resolve().parents[2]

ABLATION = """name: fmw
base: {base}
seeds: [1, 2]
reference_arm: fm=pretrained
baselines: true
factors:
  fm: {{pretrained: {{backbone.pretrain: pt.yaml}}, random: {{}}, off: {{backbone.name: learned}}}}
"""


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def pretrain_cache(tmp_path_factory: pytest.TempPathFactory, demo_h5ad: Path) -> Iterator[Path]:
    """This module's cache (pretrained checkpoints, GO masks): set while its tests run."""
    d = tmp_path_factory.mktemp("fm_cache")
    before = os.environ["PERTADAPT_CACHE"]
    os.environ["PERTADAPT_CACHE"] = str(d)
    yield d
    os.environ["PERTADAPT_CACHE"] = before


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, demo_h5ad: Path, pretrain_cache: Path):
    """The driver's resolution of a 3-arm FM ablation (2 seeds, baselines) and the pretraining log lines."""
    d = tmp_path_factory.mktemp("fm_abl")
    (d / "pt.yaml").write_text(f"base: {REPO / 'configs' / 'pretrain_demo.yaml'}\nsteps: 3\ncheckpoint_every: 3\n")
    (d / "abl.yaml").write_text(ABLATION.format(base=REPO / "configs" / "smoke.yaml"))
    prepared = _prepare(SweepRequest(d / "abl.yaml", (f"data.path={demo_h5ad}",), out=d / "out"))
    messages, logger = _Messages(), logging.getLogger("pertadapt")
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        resolved = _resolve_pretrains(prepared)
        again = _resolve_pretrains(prepared)  # a resumed sweep's driver: the cache answers
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return prepared, resolved, again, messages.lines


def _by_arm(ablation, seed: int = 1) -> dict:
    return {t.arm: t for t in ablation.trials if t.seed == seed}


def test_the_sweep_driver_pretrains_once_for_every_trial(sweep, pretrain_cache: Path) -> None:
    prepared, resolved, again, lines = sweep
    assert sum(line.startswith("pretraining the tiny FM") for line in lines) == 1  # 2 trials, one pretraining
    assert sum(line.startswith("reusing the pretrained tiny checkpoint") for line in lines) == 1  # the resume
    # the driver's progress: one (pretrain config, data file) to resolve, in the first and the resumed driver
    assert [line.split(":")[0] for line in lines if line.startswith("pretraining 1 of ")] == ["pretraining 1 of 1"] * 2
    (entry,) = [p for p in (pretrain_cache / "pretrained").iterdir() if p.is_dir()]
    pretrained = [t for t in resolved.trials if t.levels.get("fm") == "pretrained"]
    assert len(pretrained) == 2
    assert {t.config.backbone.checkpoint for t in pretrained} == {str(entry)}
    assert {t.config.backbone.checkpoint_sha256 for t in pretrained} == {checkpoint_sha256(entry)}
    assert all(t.config.backbone.pretrain is None for t in pretrained)
    # every other trial is as planned; a resumed driver resolves to the same configs (same identities)
    before = {t.key: t.config for t in prepared.ablation.trials}
    assert all(t.config == before[t.key] for t in resolved.trials if t.levels.get("fm") != "pretrained")
    assert [config_hash(t.config) for t in again.trials] == [config_hash(t.config) for t in resolved.trials]


def test_random_and_pretrained_fm_differ_only_in_weights(sweep) -> None:
    arms = _by_arm(sweep[1])
    pre, rnd = arms["fm=pretrained"].config, arms["fm=random"].config
    fp, fr = flatten(config_to_dict(pre)), flatten(config_to_dict(rnd))
    assert {k for k in fp.keys() | fr.keys() if fp.get(k) != fr.get(k)} == {
        "name", "logging.group", "backbone.checkpoint", "backbone.checkpoint_sha256"}
    assert (pre.backbone.fm_weights, rnd.backbone.fm_weights) == ("pretrained", "random")
    rd = prepare_run_data(pre)
    models = {}
    for cfg in (pre, rnd):
        seed_everything(cfg.seed)
        models[cfg.backbone.fm_weights] = build_model(cfg, rd.inputs).state_dict()
    a, b = models["pretrained"], models["random"]
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    backbone = [k for k in a if k.startswith("backbone.")]
    assert backbone
    assert all(not torch.equal(a[k], b[k]) for k in backbone if a[k].numel() > 1 and a[k].std() > 0)
    assert any(not torch.equal(a[k], b[k]) for k in backbone)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in backbone)  # the rest: same seed, same init


def test_the_config_hash_follows_the_checkpoint_weights(sweep, tmp_path: Path) -> None:
    cfg = _by_arm(sweep[1])["fm=pretrained"].config
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in Path(cfg.backbone.checkpoint).iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    first = dataclasses.replace(cfg, backbone=cfg.backbone.with_checkpoint(str(copy), checkpoint_sha256(copy)))
    state = load_file(copy / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, copy / "model.safetensors")
    changed = dataclasses.replace(cfg, backbone=cfg.backbone.with_checkpoint(str(copy), checkpoint_sha256(copy)))
    assert config_hash(changed) != config_hash(first)
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint_sha256: the weights in .* changed since"):
        backbone_weights(first)  # the config resolved before the change refuses the new weights


def test_results_csv_and_the_report_name_every_arms_fm_weights(sweep, tmp_path: Path) -> None:
    resolved = sweep[1]
    out = tmp_path / "sweep"
    hashes = {t.key: config_hash(t.config) for t in resolved.trials}
    for i, t in enumerate(resolved.trials):
        run = RunDir(out / "runs" / t.key)
        run.write_provenance({"config_hash": hashes[t.key], "backbone_weights": backbone_weights(t.config)})
        run.write_final_metrics({"best_epoch": 0, "test_mse_de": 0.1 + 0.01 * i})
        run.write_per_condition(f"condition,subgroup,mse_de\nA+ctrl,unseen_single,{0.1 + 0.01 * i}\n"
                                f"B+ctrl,unseen_single,{0.2 + 0.01 * i}\n")
    (out / "sweep.json").write_text(json.dumps({"name": "fmw", "reference_arm": resolved.reference_arm}))
    collect_results(resolved, out, [TrialOutcome(t.key, "grid", "ok", None, 1.0) for t in resolved.trials], hashes)
    rows = list(csv.DictReader((out / "results.csv").open()))
    by_arm = {r["arm"]: r for r in rows if r["seed"] == "1"}
    assert {a: r["fm_weights"] for a, r in by_arm.items()} == {
        "fm=pretrained": "pretrained", "fm=random": "random", "none": "none", "baseline_nochange": "none",
        "baseline_mean": "none", "baseline_additive": "none", "baseline_linear": "none"}
    assert by_arm["fm=pretrained"]["backbone_weights"].startswith(
        "tiny (hidden 32, layers 1, heads 2) pretrained on 360 control cells of data sha256 ")
    assert "3 steps; weights sha256 " in by_arm["fm=pretrained"]["backbone_weights"]
    assert by_arm["fm=random"]["backbone_weights"] == "random tiny (random init)"
    assert by_arm["none"]["backbone_weights"] == "none (FM off)"
    paths = write_sweep_report(out, metrics=["mse_de"])
    html, md = paths.html.read_text(), paths.markdown.read_text()
    for text in (html, md):
        for label in ("fm=pretrained [pretrained FM]", "fm=random [random FM]", "none [no FM]"):
            assert label in text
        assert "baseline_mean [" not in text  # a baseline has no FM to name
        assert "FM weights" in text
        assert "pretrained on 360 control cells" in text
    assert 'id="fm-weights"' in html
    assert "| fm=random | random | random tiny (random init) |" in md
    assert "| none | none | none (FM off) |" in md
    summary = paths.summary_csv.read_text()
    assert "fm_weights" in summary  # the summary table is also logged to W&B (report/summary)
    assert "backbone_weights" in summary
    from rich.console import Console

    console = Console(record=True, width=200)
    print_summary(paths.report, console)
    assert "fm=random [random FM]" in console.export_text()


def test_train_resolves_pretrain_and_records_the_model_card(sweep, demo_h5ad: Path, tmp_path: Path) -> None:
    pt = sweep[0].ablation.path.parent / "pt.yaml"
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", f"backbone.pretrain={pt}",
                                                            "optim.epochs=1", "optim.max_steps_per_epoch=2"])
    launch(cfg, tmp_path / "run")
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    weights = prov["backbone_weights"]
    resolved = _by_arm(sweep[1])["fm=pretrained"].config.backbone
    assert weights["fm"] == "pretrained"
    assert weights["checkpoint"] == resolved.checkpoint  # the cached pretraining, not a second one
    assert weights["sha256"] == resolved.checkpoint_sha256
    card = weights["card"]
    assert (card["steps"], card["cells"], card["n_train_cells"], card["n_genes"]) == (3, "control", 360, 240)
    assert card["backbone"]["name"] == "tiny"
    assert set(card["scores"]) >= {"heldout_masked_mse", "mean_predictor_mse"}
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["backbone"]["checkpoint"] == resolved.checkpoint
    assert written["backbone"]["pretrain"] is None


def test_on_an_object_store_trials_load_the_pretrained_checkpoint_the_driver_uploaded(
        sweep, demo_h5ad: Path, tmp_path: Path, s3_store: str, pretrain_cache: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from pertadapt import remote

    prepared, resolved = sweep[0], sweep[1]
    local = _by_arm(resolved)["fm=pretrained"].config.backbone
    store = remote.join(s3_store, f"fmw-{os.getpid()}")
    on_store = _prepare(SweepRequest(prepared.ablation.path, (f"data.path={demo_h5ad}",), out=tmp_path / "out",
                                     storage=store))
    caplog.set_level(logging.INFO, logger="pertadapt")
    staged = _resolve_pretrains(on_store)
    uri = remote.join(store, "cache", "checkpoints", local.checkpoint_sha256)
    assert remote.list_files(uri) == sorted(p.name for p in Path(local.checkpoint).iterdir() if p.is_file())
    assert sum(r.getMessage().startswith("pretraining the tiny FM") for r in caplog.records) == 0  # cached
    before = {t.key: t.config for t in resolved.trials}
    for t in staged.trials:
        if t.levels.get("fm") == "pretrained":  # the store's copy, same digest
            assert (t.config.backbone.checkpoint, t.config.backbone.checkpoint_sha256) == (uri,
                                                                                          local.checkpoint_sha256)
        else:
            assert t.config == before[t.key]
        assert config_hash(t.config) == config_hash(before[t.key])  # where the weights live is no part of a trial
    # a trial loads it through its node's copy (fetched once, checked against the digest) and records both
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [
        f"data.path={demo_h5ad}", f"backbone.checkpoint={uri}", f"backbone.checkpoint_sha256={local.checkpoint_sha256}",
        "optim.epochs=1", "optim.max_steps_per_epoch=2"])
    launch(cfg, tmp_path / "run")
    weights = json.loads((tmp_path / "run" / "provenance.json").read_text())["backbone_weights"]
    assert (weights["fm"], weights["checkpoint"], weights["sha256"]) == ("pretrained", uri, local.checkpoint_sha256)
    assert weights["local_copy"] == str(pretrain_cache / "remote" / "checkpoints" / local.checkpoint_sha256)
    assert weights["card"]["steps"] == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["backbone"]["checkpoint"] == uri
