"""GO-masked multi-head attention that never forms an ``n_genes x n_genes`` tensor.

The mask arrives as CSR arrays (``indptr``, ``indices``) over the model's genes, as built by the GO
layer. Queries are processed in chunks; for each chunk only its mask rows are densified
(``chunk x n_genes`` booleans) and handed to :func:`torch.nn.functional.scaled_dot_product_attention`.
This is the one function to replace when a block-sparse kernel arrives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["SparseMask", "masked_attention"]


class SparseMask(torch.nn.Module):
    """A boolean ``(n, n)`` attention mask stored as CSR buffers (``True`` = may attend).

    Parameters
    ----------
    indptr
        ``(n + 1,)`` CSR row pointer.
    indices
        ``(nnz,)`` column indices; row ``i`` lists the keys query ``i`` may attend to.

    Notes
    -----
    The buffers are non-persistent: a mask is rebuilt from GO by the builder, never stored in a
    checkpoint.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.n = int(indptr.numel() - 1)
        self.register_buffer("indptr", indptr.to(torch.long), persistent=False)
        self.register_buffer("indices", indices.to(torch.long), persistent=False)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Dense boolean rows ``[start, stop)`` of the mask, shape ``(stop - start, n)``."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        counts = self.indptr[start + 1: stop + 1] - self.indptr[start:stop]
        row_ids = torch.repeat_interleave(torch.arange(stop - start, device=counts.device), counts)
        dense = torch.zeros(stop - start, self.n, dtype=torch.bool, device=self.indices.device)
        dense[row_ids, self.indices[a:b]] = True
        return dense


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask | None, *,
                     chunk_size: int = 2048, checkpoint_chunks: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over genes, restricted by a sparse mask.

    Parameters
    ----------
    q, k, v
        ``(batch, heads, n_genes, head_dim)``.
    mask
        Sparse boolean mask over genes, or ``None`` for full attention.
    chunk_size
        Queries per chunk; memory is ``O(batch * heads * chunk_size * n_genes)``.
    checkpoint_chunks
        Recompute each chunk in the backward pass (activation checkpointing) to bound memory.

    Returns
    -------
    torch.Tensor
        ``(batch, heads, n_genes, head_dim)``.
    """
    n = q.shape[-2]
    outs = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        m = None if mask is None else mask.rows(start, stop)
        qc = q[..., start:stop, :]
        if checkpoint_chunks and torch.is_grad_enabled():
            outs.append(checkpoint(_chunk, qc, k, v, m, use_reentrant=False))
        else:
            outs.append(_chunk(qc, k, v, m))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
