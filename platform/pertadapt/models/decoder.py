"""The FM-baseline decoder: GEARS's gene-wise decoder over per-gene embeddings ("PA off" in the paper).

The paper's FM-only rows are its published FM baselines, the scFoundation-GEARS model
(``biomap-research/scFoundation`` ``GEARS/gears/model.py::GEARS_Model``, mode ``v1``); over the learned
gene embedding instead of an FM the same network is GEARS itself (``snap-stanford/GEARS``
``gears/model.py::GEARS_Model``). Written from the layer sequence and shapes of those files.
"""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.models.head import GeneHead
from pertadapt.models.perturbation import GraphPropagation, max_norm_rows, mlp_bn

__all__ = ["POSITION_WEIGHT", "GearsDecoder"]

#: Weight of the co-expression positional embedding added to the gene embedding (GEARS: 0.2).
POSITION_WEIGHT = 0.2


class GearsDecoder(nn.Module):
    """GEARS's decoder from batch-normalised gene embeddings and the perturbation vector to expression.

    With ``E`` the ``(B, N, d)`` gene embeddings after ``bn_emb`` and ``p`` the ``(B, d)`` output of the
    shared perturbation encoder (zero for control cells):

    1. ``pos = Linear(SGConv_coexpress(max_norm(pos_emb)))``, ``(N, d)``, the same for every cell;
    2. ``H = emb_trans(ReLU(E) + 0.2 · pos)`` with ``emb_trans`` = Linear-BN-ReLU-Linear-BN over B·N tokens;
    3. ``H = H + p`` on every gene;
    4. ``o1 = GeneHead.delta(H)``: BN → ReLU → recovery MLP ``d → hidden → d`` → gene-wise linear, ``(B, N)``;
    5. ``c = cross_gene(o1)``: MLP ``N → d → d`` with BN over the ``B`` cells, ``(B, d)``;
    6. ``ŷ_bg = indv_w2[g, 0] · o1_bg + <indv_w2[g, 1:], c_b> + indv_b2[g] + x_ctrl,bg``.

    GEARS batches cells as one PyG graph of ``B · N`` nodes while its co-expression edges index only
    the first ``N``, so there only the batch's first cell gets the propagated positional embedding;
    here every cell gets it (the embedding does not depend on the cell).

    Parameters
    ----------
    n_genes
        Number of genes ``N``.
    d
        Token width (GEARS ``hidden_size``).
    hidden
        Hidden width of the recovery MLP (GEARS: ``2 d``).
    coexpress_src, coexpress_dst, coexpress_weight
        ``(n_edges,)`` co-expression graph over the ``N`` genes (edge ``src → dst``: ``src`` is one of
        ``dst``'s top co-expressed genes; weight = absolute Pearson correlation).
    """

    def __init__(self, n_genes: int, d: int, hidden: int, coexpress_src: torch.Tensor,
                 coexpress_dst: torch.Tensor, coexpress_weight: torch.Tensor) -> None:
        super().__init__()
        self.pos_emb = nn.Embedding(n_genes, d)
        self.coexpress = GraphPropagation(n_genes, coexpress_src, coexpress_dst, coexpress_weight)
        self.coexpress_lin = nn.Linear(d, d)
        self.emb_trans = mlp_bn([d, d, d])
        self.head = GeneHead(n_genes, d, hidden)
        self.cross_gene = mlp_bn([n_genes, d, d])
        self.indv_w2 = nn.Parameter(torch.empty(1, n_genes, d + 1))
        self.indv_b2 = nn.Parameter(torch.empty(1, n_genes))
        nn.init.xavier_normal_(self.indv_w2)
        nn.init.xavier_normal_(self.indv_b2)

    def positional(self) -> torch.Tensor:
        """``(N, d)`` co-expression positional embedding (one SGConv step over the learned table)."""
        return self.coexpress_lin(self.coexpress(max_norm_rows(self.pos_emb.weight)))

    def forward(self, e: torch.Tensor, p: torch.Tensor, x_ctrl: torch.Tensor) -> torch.Tensor:
        """Decode one micro-batch.

        Parameters
        ----------
        e
            ``(B, N, d)`` gene embeddings, already batch-normalised over the ``B · N`` tokens.
        p
            ``(B, d)`` perturbation vectors (zero rows for control cells).
        x_ctrl
            ``(B, N)`` paired control expression (the residual).

        Returns
        -------
        torch.Tensor
            ``(B, N)`` predicted post-perturbation expression.
        """
        b, n, d = e.shape
        base = torch.relu(e) + POSITION_WEIGHT * self.positional()
        base = self.emb_trans(base.reshape(b * n, d)).view(b, n, d) + p[:, None, :]
        first = self.head.delta(base)
        if self.training and b == 1:  # BatchNorm over cells needs two samples; duplicate, as for pert_fuse
            cross = self.cross_gene(first.repeat(2, 1))[:1]
        else:
            cross = self.cross_gene(first)
        w2 = self.indv_w2[0]
        out = first * w2[:, 0] + cross @ w2[:, 1:].T + self.indv_b2
        return out + x_ctrl
