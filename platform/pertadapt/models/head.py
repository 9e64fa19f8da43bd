"""Gene-wise output head: BN → ReLU → MLP → per-gene linear → + paired control expression."""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.models.perturbation import mlp_bn

__all__ = ["GeneHead"]


class GeneHead(nn.Module):
    """Map adapter tokens to predicted post-perturbation expression, as the paper's reference code does.

    BatchNorm → ReLU → recovery MLP ``d → hidden → d`` → a per-gene linear map to ``Δ̂`` → ``+ x_ctrl``.

    Parameters
    ----------
    n_genes
        Number of output genes ``N``.
    d
        Token width.
    hidden
        Width of the recovery MLP (paper: ``2 d``).
    init
        ``xavier``: per-gene weights ``w`` ``(N, d, 1)`` and biases ``b`` ``(N, 1)`` Xavier-normal (the
        reference); ``zero``: both zero, so that the model starts as no-change (``Δ̂ = 0``).
    """

    def __init__(self, n_genes: int, d: int, hidden: int, init: str = "xavier") -> None:
        super().__init__()
        inits = {"xavier": nn.init.xavier_normal_, "zero": nn.init.zeros_}
        if init not in inits:
            raise ValueError(f"init: {init!r} is not one of {', '.join(inits)}")
        self.bn = nn.BatchNorm1d(d)
        self.recovery = mlp_bn([d, hidden, d])
        self.w = nn.Parameter(torch.empty(n_genes, d, 1))
        self.b = nn.Parameter(torch.empty(n_genes, 1))
        for t in (self.w, self.b):
            inits[init](t)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``(batch, n_genes, d)`` tokens → ``(batch, n_genes)`` per-gene outputs before the residual.

        ``Δ̂_bg = <recovery(ReLU(BN(h_bg))), w_g> + b_g`` (GEARS: ``bn_pert_base`` → ReLU →
        ``recovery_w`` → ``indv_w1``/``indv_b1``).
        """
        b, n, d = h.shape
        z = torch.relu(self.bn(h.reshape(b * n, d)))
        z = self.recovery(z).view(b, n, d)
        return (z * self.w[:, :, 0]).sum(-1) + self.b[:, 0]

    def forward(self, h: torch.Tensor, x_ctrl: torch.Tensor) -> torch.Tensor:
        """``(batch, n_genes, d)`` tokens and ``(batch, n_genes)`` control → ``(batch, n_genes)``."""
        return self.delta(h) + x_ctrl
