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


#: Pretrain configs (``pertadapt pretrain``) live beside the run configs, named ``pretrain*.yaml``.
PRETRAIN_CONFIGS = sorted((REPO / "configs").glob("pretrain*.yaml"))


@pytest.mark.parametrize("path", sorted(set((REPO / "configs").glob("*.yaml")) - set(PRETRAIN_CONFIGS)),
                         ids=lambda p: p.name)
def test_every_run_config_loads(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.optim.epochs >= 1


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_pretrain_config_loads(path: Path) -> None:
    from pertadapt.config.pretrain import load_pretrain_config

    assert load_pretrain_config(path).steps >= 1


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_every_ablation_builds_all_trials(path: Path) -> None:
    abl = load_ablation(path)
    cells = {(t.dataset, t.backbone) for t in abl.trials}
    assert len(abl.trials) == len(cells) * len(abl.arms) * len(abl.seeds)
    assert {t.arm for t in abl.trials} >= {"baseline_nochange", "baseline_mean", "baseline_additive",
                                           "baseline_linear"}


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_search_space_loads(path: Path) -> None:
    assert load_search_space(path).dims


@pytest.mark.parametrize("path", sorted((REPO / "platform" / "pertadapt" / "resources").rglob("*.json")),
                         ids=lambda p: p.name)
def test_every_shipped_json_parses(path: Path) -> None:
    """DeepSpeed JSONs, vendored KubeRay schemas, the GO table's SOURCE.json (cluster/ links to them)."""
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
    (["train", "configs/smoke.yaml", "optim.batch_size=10", "optim.micro_batch_size=4", "logging.wandb=offline"],
     "optim.batch_size"),
    (["train", "configs/demo.yaml", "engine.deepspeed_config=missing.json"], "engine.deepspeed_config"),
    (["train", "configs/smoke.yaml", "eval.batch_size=0"], "eval.batch_size"),
    (["sweep", "ablations/demo.yaml", "optim.batch_size=10", "optim.micro_batch_size=4"], "optim.batch_size"),
])
def test_cli_bad_config_exits_2_before_starting(args: list[str], needle: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = set(Path("/tmp").glob("ray/session_*"))
    res = _cli(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    assert not out.exists()  # nothing written: no run dir, no W&B run
    assert set(Path("/tmp").glob("ray/session_*")) == before  # no Ray started


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


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(("overrides", "needle"), [
    (["optim.batch_size=10", "optim.micro_batch_size=4"], "optim.batch_size: 10 cells per step"),
    (["engine.name=deepspeed", "engine.workers=2", "optim.batch_size=12", "optim.micro_batch_size=4"],
     r"micro_batch_size × engine.workers = 4 × 2 = 8"),
    (["engine.name=deepspeed", "engine.workers=2", "engine.deepspeed_config=nope.json"], "engine.deepspeed_config"),
    (["adapter.heads=3"], "adapter.heads: 3 does not divide"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["adapter.ffn_dim=-1"], "adapter.ffn_dim"),
    (["backbone.layers=0"], "backbone.layers"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.step_gamma=-1"], "optim.step_gamma"),
    (["optim.clip_value=-1"], "optim.clip_value"),
    (["optim.max_steps_per_epoch=0"], "optim.max_steps_per_epoch"),
    (["go.graph_threshold=1.5"], "go.graph_threshold"),
    (["eval.select_metric=val_nonsense"], "eval.select_metric"),
    (["model.name=baseline_linear", "model.k=0"], "model.k"),
    (["name=../escape"], "name"),
    (["engine.workers=2"], "engine.workers: the 'torch' engine runs one process"),
])
def test_cross_section_checks_fail_in_validation(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("×", "×")):
        load_run_config(REPO / "configs" / "smoke.yaml", overrides)


def test_baseline_configs_skip_model_only_checks() -> None:
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", ["model.name=baseline_mean", "optim.batch_size=10",
                                                             "optim.micro_batch_size=4"])
    assert cfg.is_baseline
    assert not cfg.uses_ray_train
    assert load_run_config(REPO / "configs" / "demo.yaml").uses_ray_train


@pytest.mark.parametrize(("content", "needle"), [
    ("", "the file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),
    ("optim:\n  lr: 0.1\noptim:\n  lr: 0.2\n", "duplicate key 'optim'"),
    ("base: [a.yaml, b.yaml]\n", "expected one file name"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_malformed_run_config_files(tmp_path: Path, content: str | bytes, needle: str) -> None:
    bad = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(ConfigError, match=rf"bad\.yaml.*{needle}"):
        load_run_config(bad)


def test_base_resolves_next_to_the_including_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "cwd").mkdir()
    _write(tmp_path / "a" / "parent.yaml", "base: smoke.yaml\noptim: {lr: 0.01}\n")
    _write(tmp_path / "a" / "child.yaml", "base: parent.yaml\n")
    _write(tmp_path / "cwd" / "parent.yaml", "base: smoke.yaml\noptim: {lr: 0.9}\n")
    for cwd in (tmp_path / "cwd", tmp_path):
        monkeypatch.chdir(cwd)
        assert load_run_config(tmp_path / "a" / "child.yaml").optim.lr == 0.01
    # a bare name nobody ships next to it comes from the shipped configs
    assert load_run_config("smoke.yaml").name == "smoke"


def _ablation(tmp_path: Path, body: str) -> Path:
    return _write(tmp_path / "abl.yaml", "name: x\nbase: smoke.yaml\n" + body)


@pytest.mark.parametrize(("body", "needle"), [
    ("arms:\n  full: {}\n  full: {loss.name: mse}\n", "duplicate key 'full'"),
    ("arms:\n", "arms"),
    ("seeds: [1, 1]\narms: {full: {}}\n", r"seeds: \[1\] listed more than once"),
    ("max_concurrent_trials: 0\narms: {full: {}}\n", "max_concurrent_trials"),
    ("arms:\n  ../../escape: {}\n", "not a valid name"),
    ("arms: {full: {}}\nbaselines: maybe\n", "baselines"),
    ("arms: {full: {}}\nsedes: [1]\n", "sedes"),
    ("arms: {full: {adapter.enabled: perhaps}}\n", "adapter.enabled"),
    ("arms: {full: {adapter.attention_mask: diagonal}}\n", "adapter.attention_mask"),
])
def test_malformed_ablations(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"abl\.yaml.*{needle}"):
        load_ablation(_ablation(tmp_path, body))


def test_ablation_base_relative_to_the_ablation(tmp_path: Path) -> None:
    _write(tmp_path / "mine.yaml", "base: smoke.yaml\noptim: {lr: 0.123}\n")
    abl = load_ablation(_write(tmp_path / "abl.yaml", "name: x\nbase: mine.yaml\nbaselines: false\narms: {a: {}}\n"))
    assert abl.trials[0].config.optim.lr == 0.123


@pytest.mark.parametrize(("body", "needle"), [
    ("params:\n  optim.micro_batch_size: {type: int, low: 2.5, high: 8}\n", "integer bounds"),
    ("metric: val_nonsense\nparams:\n  optim.lr: {type: uniform, low: 0.001, high: 0.1}\n", "metric"),
    ("scheduler: hyperband\nparams:\n  optim.lr: {type: uniform, low: 0.001, high: 0.1}\n", "scheduler"),
    ("params:\n  optim.lrr: {type: uniform, low: 0.001, high: 0.1}\n", "optim.lrr"),
    ("params:\n  optim.lr: {type: normal, low: 0.001, high: 0.1}\n", "type"),
    ("params:\n  optim.lr: {type: loguniform, low: 0, high: 0.1}\n", "loguniform needs low > 0"),
    ("params: {}\n", "params"),
    ("storage: postgres\nparams:\n  optim.lr: {type: uniform, low: 0.001, high: 0.1}\n",
     "storage: 'postgres' is not sqlite, journal or a database URL"),
])
def test_malformed_search_spaces(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"space\.yaml.*{needle}"):
        load_search_space(_write(tmp_path / "space.yaml", body))


def test_config_show_prints_the_resolved_config() -> None:
    res = _cli("config", "show", "configs/smoke.yaml", "optim.lr=0.5")
    assert res.returncode == 0, res.stderr
    import yaml

    doc = yaml.safe_load(res.stdout)
    assert doc["optim"]["lr"] == 0.5
    assert doc["model"]["hidden_size"] == 32
    assert doc["name"] == "smoke"


@pytest.mark.parametrize("name", ["aido_cell", "scfoundation"])
def test_a_named_fm_without_weights_is_refused_unless_random_init(name: str) -> None:
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint: the .* needs its pretrained weights"):
        load_run_config(REPO / "configs" / "smoke.yaml", [f"backbone.name={name}"])
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"backbone.name={name}", "backbone.random_init=true"])
    assert cfg.backbone.weights_are_random
    res = _cli("train", "configs/smoke.yaml", f"backbone.name={name}", "--out", "/nonexistent/never")
    assert res.returncode == 2
    assert "backbone.checkpoint" in res.stderr


def test_deepspeed_universal_checkpoint_loading_is_refused_at_config_time(tmp_path: Path) -> None:
    """DeepSpeed's universal-checkpoint loader unpickles: refused before anything runs, naming the key."""
    ds = _write(tmp_path / "ds.json", json.dumps({"zero_optimization": {"stage": 2},
                                                  "checkpoint": {"load_universal": True}}))
    with pytest.raises(ConfigError, match=r"ds\.json: checkpoint\.load_universal"):
        load_run_config(REPO / "configs" / "demo.yaml", [f"engine.deepspeed_config={ds}"])
