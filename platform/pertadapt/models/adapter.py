"""The perturbation adapter (PA): post-norm transformer block(s) with GO-masked attention."""

from __future__ import annotations

import torch
from torch import nn

from pertadapt.models.attention import SparseMask, masked_attention, resolve_impl

__all__ = ["AdapterBlock", "PerturbationAdapter"]


class AdapterBlock(nn.Module):
    """One post-norm block as in the paper's reference code (``PertAdapterNew``, heads 8, no dropout).

    ``x = LN0(E + p)``; ``h = LN1(MHA(x) + x)``; ``out = LN2(h + W2 ReLU(W1 h))``.
    With ``d = 512, heads = 8, ffn_dim = 256`` it has 1,316,608 parameters.

    Parameters
    ----------
    d
        Token width.
    heads
        Attention heads (``d`` must be divisible by it).
    ffn_dim
        Bottleneck width of the feed-forward network.
    chunk_size
        Query chunk of the chunked attention path.
    attention_impl
        ``chunked``, ``sparse`` or ``auto`` (:func:`~pertadapt.models.attention.resolve_impl`); the
        path taken by the latest forward is in :attr:`last_attention_impl`.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, chunk_size: int = 2048, attention_impl: str = "auto") -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"adapter width {d} is not divisible by heads={heads}")
        resolve_impl(attention_impl, None, torch.device("cpu"))  # validates the name
        self.heads, self.chunk_size, self.attention_impl = heads, chunk_size, attention_impl
        self.last_attention_impl: str | None = None
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d))

    def forward(self, x: torch.Tensor, mask: SparseMask | None) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            ``(batch, n_genes, d)`` tokens with the perturbation already added.
        mask
            Sparse gene mask or ``None`` (full attention).

        Returns
        -------
        torch.Tensor
            ``(batch, n_genes, d)``.
        """
        b, n, d = x.shape
        x = self.ln0(x)
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        self.last_attention_impl = resolve_impl(self.attention_impl, mask, x.device)
        a = masked_attention(q, k, v, mask, chunk_size=self.chunk_size, checkpoint_chunks=n > self.chunk_size,
                             impl=self.last_attention_impl)
        a = self.out_proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.ln1(a + x)
        return self.ln2(h + self.ffn(h))


class PerturbationAdapter(nn.Module):
    """A stack of :class:`AdapterBlock` sharing one GO mask (the paper uses one block).

    Parameters
    ----------
    d, heads, ffn_dim, chunk_size, attention_impl
        See :class:`AdapterBlock`.
    layers
        Number of blocks.
    mask
        The sparse GO mask (AM) or ``None`` for the ``attention_mask: none`` ablation.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, layers: int = 1, mask: SparseMask | None = None,
                 chunk_size: int = 2048, attention_impl: str = "auto") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AdapterBlock(d, heads, ffn_dim, chunk_size, attention_impl) for _ in range(layers))
        self.mask = mask

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, n_genes, d)`` → ``(batch, n_genes, d)``."""
        for block in self.blocks:
            tokens = block(tokens, self.mask)
        return tokens
