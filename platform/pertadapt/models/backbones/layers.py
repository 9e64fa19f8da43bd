"""Building blocks shared by the pretrained backbones (AIDO.Cell, scFoundation)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["N_DEPTH_TOKENS", "DepthTokenBackbone", "LayerStack", "SoftBinEmbedding", "SoftBinNames",
           "set_activation_checkpointing"]

#: Read-depth tokens both pretrained backbones append after the ``N`` gene values.
N_DEPTH_TOKENS = 2


class LayerStack(nn.Module):
    """A module that runs a backbone's transformer blocks in order, optionally with activation checkpointing.

    With :attr:`checkpointing` on and gradients enabled, each block keeps only its input for the backward
    pass and recomputes its inside then (``torch.utils.checkpoint``, non-reentrant): outputs and gradients
    are unchanged, the saved activations shrink to one ``(B, L, d)`` tensor per block, and training costs
    one more forward of every block.
    """

    #: Set by :func:`set_activation_checkpointing` (``backbone.activation_checkpointing``).
    checkpointing: bool = False

    def run_layers(self, layers: Iterable[nn.Module], h: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` through every block of ``layers`` (each called as ``block(h, *args)``)."""
        recompute = self.checkpointing and torch.is_grad_enabled()
        for layer in layers:
            h = checkpoint(layer, h, *args, use_reentrant=False) if recompute else layer(h, *args)
        return h


def set_activation_checkpointing(backbone: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every :class:`LayerStack` in ``backbone`` on or off."""
    for m in backbone.modules():
        if isinstance(m, LayerStack):
            m.checkpointing = enabled


class SoftBinNames(NamedTuple):
    """Attribute (state-dict) names of a :class:`SoftBinEmbedding`'s submodules in a published layout."""

    #: ``Linear(1 → bin_num)``.
    first: str
    #: Residual ``Linear(bin_num → bin_num)``.
    second: str
    #: ``Embedding(bin_num, dim)``: the bin table.
    table: str
    #: ``Embedding(1, dim)``: the masked-value row (layout only here).
    mask: str
    #: ``Embedding(1, dim)``: the padding row.
    pad: str


class SoftBinEmbedding(nn.Module):
    """Auto-discretisation of a scalar value into a softmax mixture of ``bin_num`` learned bins.

    ``h = LeakyReLU₀.₁(W₁ v)``, ``h ← α·h + W₂ h``, embedding ``= softmax(h) · table`` — the value
    embedding of both AIDO.Cell and scFoundation, which differ only in their parameter names.

    Parameters
    ----------
    bin_num
        Number of bins.
    dim
        Embedding width.
    alpha
        Weight ``α`` of the residual.
    names
        Submodule names, so that ``state_dict()`` matches the published checkpoint.
    """

    def __init__(self, bin_num: int, dim: int, alpha: float, names: SoftBinNames) -> None:
        super().__init__()
        self.bin_alpha = alpha
        self.names = names
        for name, module in zip(names, (nn.Linear(1, bin_num), nn.Linear(bin_num, bin_num),
                                        nn.Embedding(bin_num, dim), nn.Embedding(1, dim), nn.Embedding(1, dim)),
                                strict=True):
            self.add_module(name, module)

    @property
    def pad_row(self) -> torch.Tensor:
        """``(dim,)`` embedding of a padding slot."""
        return self.get_submodule(self.names.pad).weight[0]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` values → ``(B, L, dim)`` token embeddings."""
        first, second, table = (self.get_submodule(n) for n in self.names[:3])
        h = F.leaky_relu(first(values[..., None]), 0.1)
        h = self.bin_alpha * h + second(h)
        return torch.softmax(h, dim=-1) @ table.weight


class DepthTokenBackbone(nn.Module, ABC):
    """A pretrained backbone whose sequence is the ``N`` gene values followed by two read-depth tokens.

    Subclasses define how a cell becomes that sequence (:meth:`model_input`) and how the sequence is
    encoded (:meth:`forward_tokens`); :meth:`encode` (the
    :class:`~pertadapt.models.backbones.base.Backbone` method) chains them and drops the depth tokens.
    """

    @abstractmethod
    def model_input(self, x_ctrl: torch.Tensor, total_count: torch.Tensor,
                    source_total: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` log1p expression, ``(B,)`` raw totals and optionally ``(B,)`` source totals (the input
        cells' own totals when they were down-sampled from ``total_count``) → the ``(B, N + 2)`` sequence."""

    @abstractmethod
    def forward_tokens(self, seq: torch.Tensor) -> torch.Tensor:
        """``(B, N + 2)`` sequence → ``(B, N + 2, hidden_size)`` output states (depth tokens included)."""

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor,
               source_total: torch.Tensor | None = None) -> torch.Tensor:
        """Embed control cells gene by gene.

        Parameters
        ----------
        x_ctrl
            ``(B, N)`` log1p-normalised expression in :attr:`genes` order.
        total_count
            ``(B,)`` raw UMI totals.
        source_total
            ``(B,)`` raw totals of the input cells when they were down-sampled from cells of ``total_count``
            (read-depth-aware pretraining); ``None``: the input is the cell itself.

        Returns
        -------
        torch.Tensor
            ``(B, N, hidden_size)`` output states with the two depth tokens dropped.
        """
        return self.forward_tokens(self.model_input(x_ctrl, total_count, source_total))[:, :-N_DEPTH_TOKENS]
