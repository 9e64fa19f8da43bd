"""The backbone registry: the schema's closed name list, one callable per name, clear unknown-name errors."""

from __future__ import annotations

import pytest
import torch

from pertadapt.config.components import BACKBONE_OPTIONS, LearnedBackbone, TinyBackbone
from pertadapt.config.schema import BACKBONES as SCHEMA_BACKBONES
from pertadapt.models.backbones.aido_cell import AIDOCell
from pertadapt.models.backbones.base import Backbone
from pertadapt.models.backbones.registry import BACKBONES, build_backbone
from pertadapt.models.backbones.scfoundation import SCFoundation
from pertadapt.models.backbones.tiny import LearnedGeneEmbedding, TinyTransformer

GENES = tuple(f"G{i}" for i in range(12))
SIZES = {"hidden_size": 16, "layers": 2, "heads": 2}


def _options(name: str, **kw: object):
    """The backbone's options at test sizes (``learned`` has none: its width is the model's)."""
    cls = BACKBONE_OPTIONS.options(name)
    if cls is LearnedBackbone:
        return cls()
    return cls(**SIZES, **({"random_init": True} if "random_init" in BACKBONE_OPTIONS.keys(name) else {}), **kw)
CLASSES = {"tiny": TinyTransformer, "learned": LearnedGeneEmbedding, "aido_cell": AIDOCell,
           "scfoundation": SCFoundation}


def test_names_are_the_schema_names() -> None:
    assert set(BACKBONES) == set(SCHEMA_BACKBONES)
    assert set(CLASSES) == set(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_name_builds_its_backbone(name: str) -> None:
    torch.manual_seed(0)
    b = build_backbone(_options(name), genes=GENES, width=16)
    assert type(b) is CLASSES[name]
    assert isinstance(b, Backbone)
    assert b.hidden_size == 16
    out = b.encode(torch.rand(3, len(GENES)), torch.full((3,), 500.0))
    assert out.shape == (3, len(GENES), 16)
    assert len(b.transformer_layers()) == {"tiny": 2, "learned": 0, "aido_cell": 2, "scfoundation": 3}[name]
    assert b.genes in (None, GENES)  # pretrained backbones take the data's order as their vocabulary


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'bert'; valid: aido_cell, learned, scfoundation, tiny"):
        build_backbone(TinyBackbone(name="bert"), genes=GENES, width=16)


def test_tiny_checkpoint_is_an_option_and_learned_has_no_options() -> None:
    from pertadapt.config import ConfigError, load_run_config

    # tiny takes a checkpoint written by `pertadapt pretrain` (tests/unit/test_pretrain.py loads one)
    assert load_run_config(None, ["backbone.checkpoint=ckpt"]).backbone.checkpoint == "ckpt"
    assert not load_run_config(None, ["backbone.checkpoint=ckpt"]).backbone.weights_are_random
    assert load_run_config(None, []).backbone.weights_are_random
    with pytest.raises(ConfigError, match=r"backbone\.checkpoint: not an option of backbone 'learned'"):
        load_run_config(None, ["backbone.name=learned", "backbone.checkpoint=ckpt"])
    # the FM-off arm of an ablation switches the block: the base's checkpoint is not carried over
    cfg = load_run_config(None, ["backbone.name=aido_cell", "backbone.checkpoint=ckpt", "backbone.name=learned"])
    assert cfg.backbone == LearnedBackbone()
    assert isinstance(build_backbone(cfg.backbone, genes=GENES, width=16), LearnedGeneEmbedding)


def test_aido_cell_input_mode_is_passed_through() -> None:
    b = build_backbone(_options("aido_cell", input_mode="intended"), genes=GENES, width=16)
    assert b.input_mode == "intended"
