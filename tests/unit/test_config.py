"""Typed config: every shipped YAML/JSON loads; bad configs fail with the key path and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.sweep.ablation import load_ablation
from pertadapt.sweep.search_space import load_search_space

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_run_config_loads(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.optim.epochs >= 1


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_ablation_builds_all_trials(path: Path) -> None:
    abl = load_ablation(path)
    assert len(abl.trials) == len(abl.arms) * len(abl.seeds)
    assert {t.arm for t in abl.trials} >= {"baseline_nochange", "baseline_mean", "baseline_additive",
                                           "baseline_linear"}


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_search_space_loads(path: Path) -> None:
    assert load_search_space(path).dims


@pytest.mark.parametrize("path", sorted((REPO / "cluster").rglob("*.json")), ids=lambda p: p.name)
def test_every_json_under_cluster_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted((REPO / "cluster" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_json_builds(path: Path) -> None:
    from pertadapt.train.engine import deepspeed_config

    json.loads(path.read_text())
    cfg = load_run_config(REPO / "configs" / "demo.yaml", [f"engine.deepspeed_config={path}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.optim.micro_batch_size
    assert ds["train_batch_size"] == ds["gradient_accumulation_steps"] * 2 * cfg.optim.micro_batch_size


def test_base_inheritance_and_overrides() -> None:
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", ["optim.lr=0.5", "adapter.attention_mask=none"])
    assert cfg.name == "smoke"  # own value
    assert cfg.model.hidden_size == 32  # from demo.yaml
    assert cfg.optim.weight_decay == 5e-4  # from paper.yaml
    assert cfg.optim.lr == 0.5
    assert cfg.adapter.attention_mask == "none"


@pytest.mark.parametrize(("override", "needle"), [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=abc", "optim.lr"),
    ("adapter.attention_mask=diagonal", "adapter.attention_mask"),
    ("loss.name=huber", "loss.name"),
    ("backbone.name=gpt", "backbone.name"),
    ("engine.workers=0", "engine.workers"),
    ("eval.select_metric=mse_de", "eval.select_metric"),
    ("eval.select_mode=best", "eval.select_mode"),
])
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_run_config(REPO / "configs" / "smoke.yaml", [override])


def test_bad_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: smoke.yaml\noptim:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.epochz"):
        load_run_config(bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pertadapt.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "configs/smoke.yaml", "optim.lrr=1"], "optim.lrr"),
    (["train", "configs/smoke.yaml", "optim.epochs=many"], "optim.epochs"),
    (["train", "configs/smoke.yaml", "adapter.attention_mask=foo"], "adapter.attention_mask"),
    (["train", "configs/missing.yaml"], "missing.yaml"),
    (["train", "configs/smoke.yaml", "data.path=/nonexistent/x.h5ad"], "data.path"),
])
def test_cli_bad_config_exits_2_before_starting(args: list[str], needle: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _cli(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr + res.stdout
    assert not out.exists()


def test_cli_bad_ablation_exits_2(tmp_path: Path) -> None:
    abl = tmp_path / "abl.yaml"
    abl.write_text("name: x\nbase: smoke.yaml\narms:\n  full: {}\n  typo: {adapter.enable: false}\n")
    res = _cli("sweep", str(abl), "--out", str(tmp_path / "sweep"))
    assert res.returncode == 2
    assert "typo" in res.stderr
    assert "adapter.enable" in res.stderr
    assert not (tmp_path / "sweep").exists()


def test_every_command_has_help() -> None:
    for cmd in ("train", "sweep", "report", "demo", "simulate", "eval", "baselines", "cluster", "bench", "data", "go", "embed"):
        res = _cli(cmd, "--help")
        assert res.returncode == 0, (cmd, res.stderr)
        assert "Usage" in res.stdout


def test_deepspeed_norm_clipping_is_off() -> None:
    """DeepSpeed's default global-norm clipping would silently change the paper's update rule."""
    from pertadapt.train.engine import deepspeed_config

    ds = deepspeed_config(load_run_config(REPO / "configs" / "demo.yaml"), world_size=2)
    assert ds["gradient_clipping"] == 0.0


def test_cli_unreadable_data_file_exits_1_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "not_h5ad.h5ad"
    bad.write_text("hello")
    res = _cli("train", "configs/smoke.yaml", f"data.path={bad}", "--out", str(tmp_path / "run"))
    assert res.returncode == 1
    assert "not_h5ad.h5ad" in res.stderr
    assert "Traceback" not in res.stderr
