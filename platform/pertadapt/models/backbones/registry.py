"""Registry of backbones by name: name → builder from the backbone's options (``config.components``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pertadapt.config.components import (
    BACKBONE_OPTIONS,
    BackboneOptions,
    CheckpointedBackbone,
    FoundationModelBackbone,
)
from pertadapt.config.errors import ConfigError
from pertadapt.models.backbones.aido_cell import aido_cell_from_options
from pertadapt.models.backbones.layers import set_activation_checkpointing
from pertadapt.models.backbones.scfoundation import scfoundation_from_options
from pertadapt.models.backbones.tiny import learned_from_options, tiny_from_options

__all__ = ["BACKBONES", "build_backbone"]

#: name → builder ``(options, *, genes, width) -> Backbone``: ``options`` is the backbone's block (the
#: dataclass registered under the same name in ``config.components.BACKBONE_OPTIONS``), ``genes`` the
#: data's gene order (``None``: a checkpoint's own vocabulary, or the bundled one for a random init) and
#: ``width`` the model's token width (the width of ``learned``).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "tiny": tiny_from_options,
    "learned": learned_from_options,
    "aido_cell": aido_cell_from_options,
    "scfoundation": scfoundation_from_options,
}


def build_backbone(options: BackboneOptions, *, genes: Sequence[str] | None, width: int) -> nn.Module:
    """Build the backbone that ``options`` names.

    Parameters
    ----------
    options
        The backbone's block; ``options.name`` is a key of :data:`BACKBONES`.
    genes
        The data's gene order ``(N,)``, or ``None`` (see :data:`BACKBONES`).
    width
        The model's token width ``D`` (``model.hidden_size``).

    Raises
    ------
    ValueError
        For an unknown name, listing the valid ones.
    ConfigError
        For a ``backbone.pretrain`` not resolved to its checkpoint yet (its weights would be random).
    """
    try:
        builder = BACKBONES[options.name]
    except KeyError:
        raise ValueError(f"backbone.name: unknown backbone {options.name!r}; valid: "
                         f"{', '.join(sorted(BACKBONES))}") from None
    if not isinstance(options, BACKBONE_OPTIONS.options(options.name)):
        raise ValueError(f"backbone.name: {options.name!r} needs its own options, got {type(options).__name__}")
    if isinstance(options, CheckpointedBackbone) and options.pretrain is not None:
        raise ConfigError(f"backbone.pretrain: {options.pretrain!r} is not resolved to its checkpoint; `pertadapt "
                          "train` and `pertadapt sweep` resolve it before the backbone is built "
                          "(train.fm_weights.resolve_pretrain)")
    backbone = builder(options, genes=genes, width=width)
    if isinstance(options, FoundationModelBackbone):
        set_activation_checkpointing(backbone, options.activation_checkpointing)
    return backbone
