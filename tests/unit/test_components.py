"""Components own their options: per-component validation, name switches, old keys, optimisers, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pertadapt.config import ConfigError, config_hash, config_to_dict, load_run_config
from pertadapt.config.components import (
    BACKBONE_OPTIONS,
    LOSS_OPTIONS,
    MODEL_OPTIONS,
    GearsLoss,
    LearnedBackbone,
    LinearBaseline,
)
from pertadapt.config.load import merge_dotted
from pertadapt.config.schema import OPTIMIZERS as SCHEMA_OPTIMIZERS
from pertadapt.config.schema import SCHEDULES as SCHEMA_SCHEDULES
from pertadapt.config.schema import OptimConfig
from pertadapt.models.backbones import BACKBONES
from pertadapt.models.losses import LOSSES
from pertadapt.sweep.ablation import load_ablation
from pertadapt.sweep.search_space import load_search_space
from pertadapt.train.engine import OPTIMIZERS
from pertadapt.train.schedule import SCHEDULES, LRSchedule

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper.yaml"


@pytest.mark.parametrize(("options", "builders"), [(LOSS_OPTIONS, LOSSES), (BACKBONE_OPTIONS, BACKBONES)],
                         ids=["losses", "backbones"])
def test_every_component_has_a_builder(options, builders) -> None:
    assert set(options.names()) == set(builders)


def test_optimiser_and_schedule_names_equal_their_registries() -> None:
    assert set(SCHEMA_OPTIMIZERS) == set(OPTIMIZERS)
    assert set(SCHEMA_SCHEDULES) == set(SCHEDULES)


def test_each_block_takes_its_components_options() -> None:
    cfg = load_run_config(PAPER, ["loss.name=gears", "loss.gamma=3", "loss.direction_lambda=0.5",
                                  "model.name=baseline_linear", "model.k=4", "model.ridge=0.5"])
    assert cfg.loss == GearsLoss(scale=5.0, gamma=3.0, direction_lambda=0.5)  # paper.yaml's loss.scale carries over
    assert cfg.model == LinearBaseline(k=4, ridge=0.5)
    doc = config_to_dict(cfg)
    assert doc["loss"] == {"name": "gears", "scale": 5.0, "gamma": 3.0, "direction_lambda": 0.5}
    assert doc["model"] == {"name": "baseline_linear", "gene_space": "measured", "k": 4, "ridge": 0.5}
    assert set(config_to_dict(load_run_config(PAPER, ["backbone.name=learned"]))["backbone"]) == {"name"}


@pytest.mark.parametrize(("overrides", "needle"), [
    (["loss.gears_gamma=3"], r"loss\.gears_gamma: this key was renamed: use loss\.gamma .*loss\.name=gears"),
    (["loss.gears_direction_lambda=1"], r"loss\.gears_direction_lambda: .*use loss\.direction_lambda"),
    (["model.linear_k=3"], r"model\.linear_k: this key was renamed: use model\.k .*model\.name=baseline_linear"),
    (["model.name=baseline_linear", "model.linear_ridge=1"], r"model\.linear_ridge: .*use model\.ridge"),
    (["backbone.name=learned", "backbone.lora_rank=4"],
     r"backbone\.lora_rank: not an option of backbone 'learned' \(valid keys: name\); it is an option of tiny"),
    (["backbone.name=learned", "backbone.hidden_size=32"],
     r"backbone\.hidden_size: not an option .*; for backbone 'learned' this is set by model\.hidden_size"),
    (["loss.name=mse", "loss.variant=code"], r"loss\.variant: not an option of loss 'mse' \(valid keys: name, scale\)"),
    (["backbone.input_mode=intended"], r"backbone\.input_mode: not an option of backbone 'tiny'.*aido_cell"),
    (["loss.name=huber"], r"loss\.name: unknown loss 'huber'; valid: adaptive, gears, mse"),
    (["model.name=gpt"], r"model\.name: unknown model 'gpt'; valid: baseline_additive, .*pertadapt"),
    (["loss.name=gears", "loss.gamma=many"], r"key 'loss\.gamma': Value 'many'"),
])
def test_keys_a_component_does_not_have_are_errors_naming_the_valid_ones(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_run_config(PAPER, overrides)


def test_old_keys_in_a_file_name_the_new_ones(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text("base: paper.yaml\nloss: {name: gears, gears_gamma: 1.0}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml.*loss\.gears_gamma: this key was renamed: use loss\.gamma"):
        load_run_config(tmp_path / "old.yaml")


def test_switching_name_starts_the_block_from_the_new_components_defaults(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("base: paper.yaml\nloss: {name: gears, gamma: 3.0}\n")
    assert load_run_config(tmp_path / "g.yaml").loss == GearsLoss(scale=5.0, gamma=3.0)
    back = load_run_config(tmp_path / "g.yaml", ["loss.name=adaptive"])  # gamma is dropped, not an error
    assert config_to_dict(back)["loss"] == {"name": "adaptive", "scale": 5.0, "variant": "code"}
    # the same name again keeps the block
    assert load_run_config(tmp_path / "g.yaml", ["loss.name=gears"]).loss.gamma == 3.0
    # an arm (one layer) that switches and sets an option of the new component
    cfg = load_run_config(PAPER, extra={"loss": {"name": "gears", "gamma": 1.5}})
    assert cfg.loss == GearsLoss(scale=5.0, gamma=1.5)
    # in one layer, a key of the old component is an error naming the new one's keys
    with pytest.raises(ConfigError, match=r"loss\.variant: not an option of loss 'gears' \(valid keys: name, scale, "
                                          r"gamma, direction_lambda\)"):
        load_run_config(PAPER, extra={"loss": {"name": "gears", "variant": "code"}})


def test_learned_arm_accepts_a_base_whose_backbone_knobs_it_does_not_use(tmp_path: Path) -> None:
    """(e) A 20-head backbone block does not fit a 64-wide tiny FM, but the learned arm never uses it."""
    (tmp_path / "b.yaml").write_text("base: paper.yaml\nbackbone: {name: tiny, hidden_size: 64, heads: 20}\n")
    with pytest.raises(ConfigError, match=r"backbone\.heads: expected a positive divisor of backbone\.hidden_size"):
        load_run_config(tmp_path / "b.yaml")
    (tmp_path / "abl.yaml").write_text(
        "name: x\nbase: b.yaml\nseeds: [1]\nbaselines: false\n"
        "arms:\n  gears: {backbone.name: learned, adapter.enabled: false, adapter.attention_mask: none, "
        "loss.name: gears}\n")
    trial, = load_ablation(tmp_path / "abl.yaml").trials
    assert trial.config.backbone == LearnedBackbone()


def test_an_unused_components_knobs_do_not_change_the_hash() -> None:
    a = load_run_config(PAPER, ["backbone.heads=2", "backbone.name=learned"])
    b = load_run_config(PAPER, ["backbone.heads=8", "backbone.name=learned"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_run_config(PAPER))


def test_merge_dotted_drops_the_earlier_sets_keys_of_a_switched_component() -> None:
    sets = ({"backbone.name": "aido_cell", "backbone.random_init": True, "loss.scale": 2.0},
            {"backbone.name": "learned", "loss.name": "gears"}, {"loss.gamma": 1.0})
    assert merge_dotted(*sets) == {"backbone.name": "learned", "loss.name": "gears", "loss.scale": 2.0,
                                   "loss.gamma": 1.0}
    assert merge_dotted({"backbone.heads": 2, "backbone.name": "tiny"}) == {"backbone.heads": 2,
                                                                            "backbone.name": "tiny"}


def test_registering_needs_a_subclass_with_its_name_and_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        LOSS_OPTIONS.register(type("Other", (GearsLoss,), {"__annotations__": {}}))
    with pytest.raises(ValueError, match="is not a ModelOptions dataclass"):
        MODEL_OPTIONS.register(GearsLoss)


def test_search_space_ships_optimiser_and_schedule_choices() -> None:
    space = load_search_space(REPO / "search_spaces" / "demo.yaml")
    dims = {d.key: d for d in space.dims}
    assert set(dims["optim.name"].values) <= set(OPTIMIZERS)
    assert set(dims["optim.schedule"].values) <= set(SCHEDULES)


def test_search_space_may_sample_a_components_option(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("metric: val_mse_de\nmode: min\nnum_samples: 1\nparams:\n"
                                     "  loss.gamma: {type: uniform, low: 0.5, high: 3.0}\n")
    assert [d.key for d in load_search_space(tmp_path / "s.yaml").dims] == ["loss.gamma"]
    (tmp_path / "bad.yaml").write_text("metric: val_mse_de\nmode: min\nnum_samples: 1\nparams:\n"
                                       "  loss.gamma: {type: uniform, low: -1.0, high: 3.0}\n")
    with pytest.raises(ConfigError, match=r"params\.loss\.gamma: value -1\.0 is not valid: .*loss\.gamma: expected a "
                                          r"non-negative float"):
        load_search_space(tmp_path / "bad.yaml")


def _step(name: str, weight_decay: float, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(torch.ones(3))
    opt = OPTIMIZERS[name]([p], OptimConfig(name=name, lr=0.1, weight_decay=weight_decay, **kw))
    for _ in range(2):
        p.grad = torch.tensor([1.0, -2.0, 0.5])
        opt.step()
    return p.detach()


def test_adamw_decays_the_weights_where_adam_adds_to_the_gradient() -> None:
    torch.testing.assert_close(_step("adam", 0.0), _step("adamw", 0.0))
    assert not torch.allclose(_step("adam", 0.5), _step("adamw", 0.5))
    # AdamW: θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε); with a constant gradient the Adam part is lr·sign(g) per step
    expected = torch.ones(3)
    for _ in range(2):
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 1.0])
    torch.testing.assert_close(_step("adamw", 0.5), expected, rtol=1e-5, atol=1e-6)


def test_sgd_steps_along_the_gradient_with_momentum() -> None:
    g = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(_step("sgd", 0.0), torch.ones(3) - 2 * 0.1 * g)
    torch.testing.assert_close(_step("sgd", 0.0, momentum=0.9), torch.ones(3) - 0.1 * g - 0.1 * 1.9 * g)
    with pytest.raises(ConfigError, match=r"optim\.momentum: only the sgd optimiser"):
        load_run_config(None, ["optim.momentum=0.9"])


def test_schedules_give_the_rates_they_claim() -> None:
    o = OptimConfig(lr=0.1, epochs=4, step_gamma=0.5)
    step = LRSchedule(o, steps_per_epoch=3)
    assert [step.lr(e, s) for e in range(4) for s in (0, 2)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    const = LRSchedule(OptimConfig(lr=0.1, epochs=4, schedule="constant"), 3)
    assert {const.lr(e, s) for e in range(4) for s in range(3)} == {0.1}
    cos = LRSchedule(OptimConfig(lr=0.1, epochs=4, schedule="cosine"), 3)
    assert [cos.lr(e, s) for e in range(4) for s in range(3)] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * t / 12)) for t in range(12)])


def test_warmup_ramps_linearly_then_hands_over_to_the_schedule() -> None:
    w = LRSchedule(OptimConfig(lr=0.1, epochs=3, schedule="constant", warmup_steps=4), 3)
    assert [w.lr(e, s) for e in range(3) for s in range(3)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    by_epoch = LRSchedule(OptimConfig(lr=0.1, epochs=3, warmup_epochs=1), 3)
    assert [by_epoch.lr(0, s) for s in range(3)] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert by_epoch.lr(1, 0) == pytest.approx(0.05)  # then StepLR: lr × 0.5 ** epoch
    cos = LRSchedule(OptimConfig(lr=0.1, epochs=3, schedule="cosine", warmup_steps=3), 3)
    assert [cos.lr(1, s) for s in range(3)] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * t / 6)) for t in range(3)])
    with pytest.raises(ConfigError, match="optim.warmup_epochs / optim.warmup_steps: give one"):
        load_run_config(None, ["optim.warmup_epochs=1", "optim.warmup_steps=2"])
