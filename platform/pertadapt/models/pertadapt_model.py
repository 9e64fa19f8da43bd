"""PertAdapt = backbone (frozen/fine-tuned FM or learned) + perturbation encoder + adapter + gene head.

With the PA off the same backbone and perturbation encoder feed either GEARS's decoder (the paper's FM
baseline, ``adapter.off_mode: decoder``) or the gene head directly (``H = E + p``, ``off_mode: sum``).
"""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.backbones.cached import CachedEmbeddings
from pertadapt.models.decoder import GearsDecoder
from pertadapt.models.head import GeneHead
from pertadapt.models.perturbation import PerturbationEncoder
from pertadapt.types import Batch

__all__ = ["PertAdaptModel"]


class PertAdaptModel(nn.Module):
    """The full network of the paper's code (``GEARS_Model_Pert_Adapter_New``), from parts the builder made.

    ``ŷ = head(PA(BatchNorm(proj(FM(x_ctrl))) + p), x_ctrl)``, the head adding ``x_ctrl`` back; ``p`` is the
    perturbation encoder's vector per cell.

    Parameters
    ----------
    backbone
        Implements :class:`~pertadapt.models.backbones.base.Backbone`, or a :class:`CachedEmbeddings`
        lookup of a frozen backbone's embeddings (indexed by ``batch.ctrl_idx``).
    perturbation
        Perturbation encoder (GO-graph SGConv + MLP).
    adapter
        The PA, or ``None`` with the PA off (then ``H = E + p`` goes to ``head``, or ``decoder`` is used).
    head
        Gene-wise output head, or ``None`` when ``decoder`` is given.
    d
        Token width inside adapter and head; a trainable projection maps the backbone width to it.
    inject
        ``all``: add ``p`` to every gene token (paper); ``perturbed``: only to the perturbed genes' tokens.
    decoder
        The FM-baseline decoder (PA off, ``adapter.off_mode: decoder``): it takes the batch-normalised
        embeddings and ``p`` in place of adapter and head (``p`` goes to every gene).
    gene_idx
        ``(N,)`` long positions of the model genes among the backbone's ``N_in`` input genes
        (``model.gene_space: measured``): the backbone embeds its whole vocabulary from
        ``batch.x_input`` and its per-gene embeddings are gathered there; ``None`` = the same genes.
    """

    def __init__(self, backbone: nn.Module, perturbation: PerturbationEncoder, adapter: PerturbationAdapter | None,
                 head: GeneHead | None, d: int, inject: str = "all", decoder: GearsDecoder | None = None,
                 gene_idx: torch.Tensor | None = None) -> None:
        super().__init__()
        if (head is None) == (decoder is None) or (decoder is not None and adapter is not None):
            raise ValueError("PertAdaptModel takes adapter/head or a decoder alone")
        self.backbone = backbone
        self.proj = nn.Identity() if backbone.hidden_size == d else nn.Linear(backbone.hidden_size, d)
        self.bn_emb = nn.BatchNorm1d(d)
        self.perturbation = perturbation
        self.adapter = adapter
        self.head = head
        self.inject = inject
        self.decoder = decoder
        self.register_buffer("gene_idx", gene_idx, persistent=False)

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
        if self.decoder is not None:
            return self.decoder(e, p, batch.x_ctrl)
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
        """``(B, N, D_backbone)`` embeddings of the paired controls over the model genes: looked up in the
        cache (stored over the model genes), or computed over the backbone's input and gathered."""
        if isinstance(self.backbone, CachedEmbeddings):
            return self.backbone.encode(batch.x_ctrl, batch.total_count, batch.ctrl_idx)
        if self.gene_idx is None:
            return self.backbone.encode(batch.x_ctrl, batch.total_count)
        if batch.x_input is None:
            raise ValueError("the model genes are a subset of the backbone's input genes but the batch has no "
                             "x_input (the controls over every gene of the data file)")
        return self.backbone.encode(batch.x_input, batch.total_count).index_select(1, self.gene_idx)
