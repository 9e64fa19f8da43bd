"""Closed registry of backbones by name."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import nn

__all__ = ["BACKBONES", "build_backbone"]

#: name → ``"module:function"``; each builder takes ``(*, checkpoint, genes, hidden_size, layers, heads)``.
BACKBONES: dict[str, str] = {
    "tiny": "pertadapt.models.backbones.registry:_build_tiny",
    "learned": "pertadapt.models.backbones.registry:_build_learned",
    "aido_cell": "pertadapt.models.backbones.aido_cell:build_aido_cell",
    "scfoundation": "pertadapt.models.backbones.scfoundation:build_scfoundation",
}


def _build_tiny(*, checkpoint: str | None, genes: Sequence[str], hidden_size: int, layers: int,
                heads: int) -> nn.Module:
    from pertadapt.models.backbones.tiny import TinyTransformer

    if checkpoint is not None:
        raise ValueError("backbone.checkpoint: the 'tiny' backbone is random-init and takes no checkpoint")
    return TinyTransformer(len(genes), hidden_size, layers, heads)


def _build_learned(*, checkpoint: str | None, genes: Sequence[str], hidden_size: int, layers: int,
                   heads: int) -> nn.Module:
    from pertadapt.models.backbones.tiny import LearnedGeneEmbedding

    return LearnedGeneEmbedding(len(genes), hidden_size)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build a backbone by registry name; an unknown name lists the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    module, fn = BACKBONES[name].split(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)
