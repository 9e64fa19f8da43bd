"""PertAdapt = backbone (frozen/fine-tuned FM or learned) + perturbation encoder + adapter + gene head."""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.backbones.cached import CachedEmbeddings
from pertadapt.models.head import GeneHead
from pertadapt.models.perturbation import PerturbationEncoder
from pertadapt.types import Batch

__all__ = ["PertAdaptModel"]


class PertAdaptModel(nn.Module):
    """The full network of method.md §1.1, composed from parts the builder made.

    Parameters
    ----------
    backbone
        Implements :class:`~pertadapt.models.backbones.base.Backbone`, or a :class:`CachedEmbeddings`
        lookup of a frozen backbone's embeddings (indexed by ``batch.ctrl_idx``).
    perturbation
        Perturbation encoder (GO-graph SGConv + MLP).
    adapter
        The PA, or ``None`` for the PA-off ablation (``H = E + p``).
    head
        Gene-wise output head.
    d
        Token width inside adapter and head; a trainable projection maps the backbone width to it.
    inject
        ``all``: add ``p`` to every gene token (paper); ``perturbed``: only to the perturbed genes' tokens.
    """

    def __init__(self, backbone: nn.Module, perturbation: PerturbationEncoder, adapter: PerturbationAdapter | None,
                 head: GeneHead, d: int, inject: str = "all") -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Identity() if backbone.hidden_size == d else nn.Linear(backbone.hidden_size, d)
        self.bn_emb = nn.BatchNorm1d(d)
        self.perturbation = perturbation
        self.adapter = adapter
        self.head = head
        self.inject = inject

    def forward(self, batch: Batch) -> torch.Tensor:
        """Predict post-perturbation expression.

        Parameters
        ----------
        batch
            A :class:`~pertadapt.types.Batch` of ``B`` cells over ``N`` genes.

        Returns
        -------
        torch.Tensor
            ``(B, N)`` predicted log-normalised expression.
        """
        e = self.proj(self._embed(batch))
        b, n, d = e.shape
        e = self.bn_emb(e.reshape(b * n, d)).view(b, n, d)
        p = self.perturbation(batch.pert_idx)
        if self.inject == "all":
            tokens = e + p[:, None, :]
        else:
            sel = torch.zeros(b, n, 1, dtype=e.dtype, device=e.device)
            pos = batch.pert_gene_pos
            rows = torch.arange(b, device=e.device)[:, None].expand_as(pos)
            ok = pos >= 0
            sel[rows[ok], pos[ok]] = 1.0
            tokens = e + sel * p[:, None, :]
        h = self.adapter(tokens) if self.adapter is not None else tokens
        return self.head(h, batch.x_ctrl)

    def _embed(self, batch: Batch) -> torch.Tensor:
        """``(B, N, D_backbone)`` embeddings of the paired controls: looked up in the cache, or computed."""
        if isinstance(self.backbone, CachedEmbeddings):
            return self.backbone.encode(batch.x_ctrl, batch.total_count, batch.ctrl_idx)
        return self.backbone.encode(batch.x_ctrl, batch.total_count)
