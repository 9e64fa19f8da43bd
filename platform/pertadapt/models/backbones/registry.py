"""Closed registry of backbones by name (the names of ``pertadapt.config.schema.BACKBONES``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pertadapt.models.backbones.aido_cell import build_aido_cell
from pertadapt.models.backbones.scfoundation import build_scfoundation
from pertadapt.models.backbones.tiny import build_learned, build_tiny

__all__ = ["BACKBONES", "build_backbone"]

#: name → builder taking ``(*, checkpoint, genes, hidden_size, layers, heads)`` (``aido_cell`` also
#: ``input_mode``) and returning a :class:`~pertadapt.models.backbones.base.Backbone` module.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "tiny": build_tiny,
    "learned": build_learned,
    "aido_cell": build_aido_cell,
    "scfoundation": build_scfoundation,
}


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build a backbone by registry name.

    Parameters
    ----------
    name
        A key of :data:`BACKBONES`.
    **kwargs
        The builder's keyword arguments (``checkpoint``, ``genes``, ``hidden_size``, ``layers``, ``heads``,
        and ``input_mode`` for ``aido_cell``).

    Raises
    ------
    ValueError
        For an unknown name, listing the valid ones.
    """
    try:
        builder = BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone.name: unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}") from None
    return builder(**kwargs)
