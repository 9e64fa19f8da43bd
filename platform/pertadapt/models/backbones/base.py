"""The backbone contract: a foundation model that embeds a control cell gene by gene."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Backbone"]


@runtime_checkable
class Backbone(Protocol):
    """What PertAdapt needs from a foundation model (an ``nn.Module``).

    Attributes
    ----------
    genes
        The model's gene vocabulary in input order, or ``None`` when the backbone accepts any
        gene order (``tiny``, ``learned``); data must be aligned to it before training.
    hidden_size
        Width ``d`` of the per-gene embeddings returned by :meth:`encode`.
    """

    genes: tuple[str, ...] | None
    hidden_size: int

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        """Embed control cells.

        Parameters
        ----------
        x_ctrl
            ``(batch, n_genes)`` log1p-normalised expression of the paired control cells.
        total_count
            ``(batch,)`` raw UMI totals of those cells.

        Returns
        -------
        torch.Tensor
            ``(batch, n_genes, hidden_size)`` per-gene token embeddings (depth tokens dropped).
        """
        ...

    def transformer_layers(self) -> list[torch.nn.Module]:
        """The backbone's transformer blocks in order (used by the ``last_k`` fine-tune mode)."""
        ...
