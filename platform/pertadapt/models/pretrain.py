"""Masked-expression pretraining: a backbone plus a small value head that predicts hidden genes' values.

The objective is a masked-value regression: a share of each cell's genes has its input value replaced by
the backbone's mask value (:data:`MASK_VALUES`), the backbone embeds the whole cell gene by gene, and the
head maps each gene's embedding to a predicted log1p-normalised value; the loss is the mean squared error
on the masked genes only (:func:`masked_mse`). This is the objective AIDO.Cell and scFoundation publish
(regression of masked expression values with an MSE loss). With the read-depth-aware objective the input
is a down-sampled copy of the cell and the batch carries its total (``MaskedCells.source_total``), which the
backbone reads as its source-depth token; the target stays the cell itself.
"""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.types import MaskedCells

__all__ = ["MASK_VALUES", "MaskedValueModel", "masked_mse"]

#: Backbone name → the input value that stands for a masked gene. ``tiny`` reads values through an MLP, so
#: ``-1`` (outside the range of log1p expression, which is >= 0) marks a masked gene unambiguously; AIDO.Cell
#: re-normalises its input by the cell's sum and scFoundation drops zero genes from its encoder, so for them a
#: masked gene reads as not expressed (``0``); their published mask-token rows are not used here.
MASK_VALUES: dict[str, float] = {"tiny": -1.0, "aido_cell": 0.0, "scfoundation": 0.0}


class MaskedValueModel(nn.Module):
    """Backbone + value head: ``(B, N)`` masked cells → ``(B, N)`` predicted values of every gene.

    Parameters
    ----------
    backbone
        An FM implementing the backbone protocol (``encode(x, total) -> (B, N, d)``, ``hidden_size``).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        d = int(backbone.hidden_size)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))

    def predict(self, x: torch.Tensor, total_count: torch.Tensor,
                source_total: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` masked log1p values + ``(B,)`` totals → ``(B, N)`` predicted log1p values.

        ``source_total`` (``(B,)``, the input cells' own totals when they were down-sampled) is passed to the
        backbone only when given, so a backbone with a single depth input is called as before.
        """
        if source_total is None:
            return self.head(self.backbone.encode(x, total_count)).squeeze(-1)
        return self.head(self.backbone.encode(x, total_count, source_total)).squeeze(-1)

    def forward(self, batch: MaskedCells) -> torch.Tensor:
        """``(B, N)`` predictions for a :class:`~pertadapt.types.MaskedCells` batch (the engine's forward)."""
        return self.predict(batch.x, batch.total_count, batch.source_total)


def masked_mse(pred: torch.Tensor, batch: MaskedCells) -> torch.Tensor:
    """Mean squared error of ``pred`` ``(B, N)`` against ``batch.target`` over the masked genes only (a scalar)."""
    mask = batch.mask.to(pred.dtype)
    return ((pred - batch.target.to(pred.dtype)) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)
