"""Components and optimiser options in real (tiny, torch-engine) training runs."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.components import LOSS_OPTIONS
from pertadapt.models.losses import LOSSES
from pertadapt.train.run import run

REPO = Path(__file__).resolve().parents[2]

TOY_LOSS = '''
from dataclasses import dataclass

from pertadapt.config.components import LossOptions
from pertadapt.models.losses import register_loss
from pertadapt.types import LossOutput


@dataclass(frozen=True)
class ToyAbsLoss(LossOptions):
    name: str = "toy_abs"
    power: float = 1.0


def build(options, inputs):
    def loss(pred, batch):
        value = (pred - batch.y).abs().pow(options.power).mean()
        return LossOutput(value, {"loss_toy": value.detach()}, {"power": options.power})
    return loss


register_loss(ToyAbsLoss, build)
'''


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def toy_loss_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loss defined in a temporary module that registers itself (no file of the package edited)."""
    (tmp_path / "toy_loss_plugin.py").write_text(TOY_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_loss_plugin")
    yield "toy_abs"
    LOSSES.pop("toy_abs")
    LOSS_OPTIONS._options.pop("toy_abs")  # leave the shared registries as the other tests expect them


def test_a_loss_added_through_the_registry_alone_trains(toy_loss_module: str, demo_h5ad: Path,
                                                        tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad, f"loss.name={toy_loss_module}", "loss.power=1.5", "optim.epochs=1")
    assert (cfg.loss.name, cfg.loss.power, cfg.loss.scale) == ("toy_abs", 1.5, 5.0)
    metrics = run(cfg, tmp_path / "toy")
    row, = _rows(tmp_path / "toy")
    assert row["loss_weight_power"] == 1.5
    assert row["train_loss"] == pytest.approx(row["train_loss_toy"])
    assert math.isfinite(metrics["test_mse_de"])
    with pytest.raises(ConfigError, match=r"loss\.gamma: not an option of loss 'toy_abs' \(valid keys: name, scale, "
                                        r"power\)"):
        _cfg(demo_h5ad, "loss.name=toy_abs", "loss.gamma=2")


def test_adamw_with_a_cosine_schedule_logs_its_learning_rates(demo_h5ad: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad, "optim.name=adamw", "optim.schedule=cosine", "optim.epochs=3")
    run(cfg, tmp_path / "cos")
    steps = cfg.optim.max_steps_per_epoch  # 3 optimiser steps per epoch, 9 in all
    lrs = [r["lr"] for r in _rows(tmp_path / "cos")]
    assert lrs == pytest.approx([cfg.optim.lr * 0.5 * (1 + math.cos(math.pi * e * steps / (3 * steps)))
                                 for e in range(3)])
    assert lrs[0] > lrs[1] > lrs[2] > 0


@pytest.fixture(scope="module")
def reference(demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two epochs of the smoke config: Adam, StepLR (the defaults)."""
    run_dir = tmp_path_factory.mktemp("adam_step")
    run(_cfg(demo_h5ad), run_dir)
    return _rows(run_dir)


@pytest.mark.parametrize(("overrides", "same_first_epoch"), [
    (["optim.schedule=constant"], True),  # the first epoch runs at lr either way, the second at lr, not lr/2
    (["optim.warmup_steps=2"], False),
    (["optim.name=adamw"], False),
    (["optim.name=sgd", "optim.momentum=0.9"], False),
], ids=["constant", "warmup", "adamw", "sgd"])
def test_each_optimiser_option_changes_training(overrides: list[str], same_first_epoch: bool, reference: list[dict],
                                                demo_h5ad: Path, tmp_path: Path) -> None:
    run(_cfg(demo_h5ad, *overrides), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert (rows[0]["train_loss"] == reference[0]["train_loss"]) is same_first_epoch
    assert rows[1]["train_loss"] != reference[1]["train_loss"]
    if overrides == ["optim.schedule=constant"]:
        assert [r["lr"] for r in rows] == [r["lr"] for r in reference][:1] * 2
    if overrides == ["optim.warmup_steps=2"]:
        assert rows[0]["lr"] == pytest.approx(reference[0]["lr"] / 2)
