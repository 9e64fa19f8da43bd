"""A frozen backbone's embeddings of the control pool, precomputed: the backbone's stand-in in the model.

The table is built (and stored, memory-mapped) by :mod:`pertadapt.train.embed_cache`; this module only
reads rows of it, so the model never sees a path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["CachedEmbeddings"]

#: Storage dtypes of a table; ``uint16`` holds bfloat16 bit patterns (NumPy has no bfloat16).
_STORAGE = {np.dtype(np.float32): None, np.dtype(np.float16): None, np.dtype(np.uint16): torch.bfloat16}


class CachedEmbeddings(nn.Module):
    """Per-gene embeddings of the control pool, looked up by pool position instead of running the backbone.

    It has no parameters or buffers (nothing to train, checkpoint or partition); the table stays where it
    is (a read-only memory map) and only the rows of a batch are read.

    Parameters
    ----------
    table
        ``(pool, N, D)`` embeddings of the pool's control cells: float32, float16, or uint16 holding
        bfloat16 bit patterns.
    """

    genes = None

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        if table.ndim != 3:
            raise ValueError(f"embedding table: expected (pool, genes, dim), got shape {table.shape}")
        if table.dtype not in _STORAGE:
            raise ValueError(f"embedding table: dtype {table.dtype} is not float32, float16 or uint16 (bfloat16)")
        self.table = table
        self.hidden_size = int(table.shape[2])

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor,
               ctrl_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The cached embeddings of the paired controls.

        Parameters
        ----------
        x_ctrl
            ``(batch, N)`` control expression; only its device and dtype are used.
        total_count
            ``(batch,)`` UMI totals (unused: they went into the cached embeddings).
        ctrl_idx
            ``(batch,)`` long, rows of the table (``Batch.ctrl_idx``).

        Returns
        -------
        torch.Tensor
            ``(batch, N, D)`` on ``x_ctrl``'s device, in its dtype.
        """
        if ctrl_idx is None:
            raise ValueError("cached embeddings need Batch.ctrl_idx (the paired controls' pool positions)")
        rows = torch.from_numpy(np.ascontiguousarray(self.table[ctrl_idx.cpu().numpy()]))
        view = _STORAGE[self.table.dtype]
        if view is not None:
            rows = rows.view(view)
        return rows.to(device=x_ctrl.device, dtype=x_ctrl.dtype)

    def transformer_layers(self) -> list[nn.Module]:
        """No transformer blocks (nothing here trains)."""
        return []

    def extra_repr(self) -> str:
        return f"table={tuple(self.table.shape)}, dtype={self.table.dtype}"
