"""The backbone registry: the schema's closed name list, one callable per name, clear unknown-name errors."""

from __future__ import annotations

import pytest
import torch

from pertadapt.config.schema import BACKBONES as SCHEMA_BACKBONES
from pertadapt.models.backbones.aido_cell import AIDOCell
from pertadapt.models.backbones.base import Backbone
from pertadapt.models.backbones.registry import BACKBONES, build_backbone
from pertadapt.models.backbones.scfoundation import SCFoundation
from pertadapt.models.backbones.tiny import LearnedGeneEmbedding, TinyTransformer

GENES = tuple(f"G{i}" for i in range(12))
SIZES = {"hidden_size": 16, "layers": 2, "heads": 2}
CLASSES = {"tiny": TinyTransformer, "learned": LearnedGeneEmbedding, "aido_cell": AIDOCell,
           "scfoundation": SCFoundation}


def test_names_are_the_schema_names() -> None:
    assert set(BACKBONES) == set(SCHEMA_BACKBONES)
    assert set(CLASSES) == set(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_name_builds_its_backbone(name: str) -> None:
    torch.manual_seed(0)
    b = build_backbone(name, checkpoint=None, genes=GENES, **SIZES)
    assert type(b) is CLASSES[name]
    assert isinstance(b, Backbone)
    assert b.hidden_size == 16
    out = b.encode(torch.rand(3, len(GENES)), torch.full((3,), 500.0))
    assert out.shape == (3, len(GENES), 16)
    assert len(b.transformer_layers()) == {"tiny": 2, "learned": 0, "aido_cell": 2, "scfoundation": 3}[name]
    assert b.genes in (None, GENES)  # pretrained backbones take the data's order as their vocabulary


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'bert'; valid: aido_cell, learned, scfoundation, tiny"):
        build_backbone("bert", checkpoint=None, genes=GENES, **SIZES)


def test_tiny_takes_no_checkpoint_and_learned_ignores_one() -> None:
    with pytest.raises(ValueError, match="takes no checkpoint"):
        build_backbone("tiny", checkpoint="ckpt", genes=GENES, **SIZES)
    # the FM-off arm of an ablation shares a base config that may name a checkpoint
    assert isinstance(build_backbone("learned", checkpoint="ckpt", genes=GENES, **SIZES), LearnedGeneEmbedding)


def test_aido_cell_input_mode_is_passed_through() -> None:
    b = build_backbone("aido_cell", checkpoint=None, genes=GENES, input_mode="intended", **SIZES)
    assert b.input_mode == "intended"
