"""Tensor contracts between layers (data → models → losses)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["Batch", "LossOutput", "MaskedCells"]


@dataclass(frozen=True)
class Batch:
    """A micro-batch of perturbed cells, each paired with one control cell.

    Attributes
    ----------
    x_ctrl
        ``(batch, n_genes)`` float, log1p-normalised expression of the paired control cells.
    total_count
        ``(batch,)`` float, raw UMI totals of those control cells.
    y
        ``(batch, n_genes)`` float, the observed perturbed cells (the target).
    pert_idx
        ``(batch, 2)`` long, indices into the perturbation vocabulary, ``-1`` = none (ctrl, single).
    pert_gene_pos
        ``(batch, 2)`` long, positions of the perturbed genes among the model genes, ``-1`` = absent.
    cond_id
        ``(batch,)`` long, condition index (cells of one condition share it).
    is_ctrl
        ``(batch,)`` bool, control cells.
    de_idx
        ``(batch, n_de)`` long, top DE genes of each cell's condition (rank order; zeros for ctrl).
    nz_mask
        ``(batch, n_genes)`` bool, genes with non-zero mean in the cell's condition (all for ctrl).
    ctrl_idx
        ``(batch,)`` long, position of each paired control cell in the run's control pool (the row of
        the frozen-FM embedding cache), or ``None`` when the batch was built without a pool.
    x_input
        ``(batch, n_input_genes)`` float, the paired control cells over every gene of the data file (the
        backbone's input) when the model genes (``n_genes``, ``model.gene_space: measured``) are a subset
        of them; ``None`` when they are the same genes (the backbone reads ``x_ctrl``).
    """

    x_ctrl: torch.Tensor
    total_count: torch.Tensor
    y: torch.Tensor
    pert_idx: torch.Tensor
    pert_gene_pos: torch.Tensor
    cond_id: torch.Tensor
    is_ctrl: torch.Tensor
    de_idx: torch.Tensor
    nz_mask: torch.Tensor
    ctrl_idx: torch.Tensor | None = None
    x_input: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move every tensor (``None`` fields stay ``None``); floating tensors optionally cast to ``dtype``.

        To a CUDA device the host tensors go through pinned (page-locked) memory with a non-blocking copy.
        """
        out = {}
        cuda = torch.device(device).type == "cuda"
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                if cuda and t.device.type == "cpu":
                    t = t.pin_memory().to(device, non_blocking=True)
                else:
                    t = t.to(device)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
            out[f.name] = t
        return Batch(**out)

    def __len__(self) -> int:
        return int(self.x_ctrl.shape[0])


@dataclass(frozen=True)
class LossOutput:
    """A loss value with its named components and the weights that combined them."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    weights: dict[str, float]


@dataclass(frozen=True)
class MaskedCells:
    """A micro-batch of masked-expression pretraining: cells with some genes' values hidden.

    Attributes
    ----------
    x
        ``(batch, n_genes)`` float, log1p-normalised expression with the masked genes' values replaced by the
        backbone's mask value (the model input).
    total_count
        ``(batch,)`` float, raw UMI totals of the cells.
    target
        ``(batch, n_genes)`` float, the unmasked log1p-normalised expression.
    mask
        ``(batch, n_genes)`` bool, the masked genes (scored by the loss).
    source_total
        ``(batch,)`` float, raw UMI totals of the input cells when they differ from ``total_count`` (the
        read-depth-aware objective's down-sampled inputs; ``total_count`` is then the target's total), or
        ``None`` when the input is the cell itself.
    """

    x: torch.Tensor
    total_count: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    source_total: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MaskedCells:
        """Move every tensor; floating tensors optionally cast to ``dtype``."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return MaskedCells(move(self.x), move(self.total_count), move(self.target), move(self.mask),
                           None if self.source_total is None else move(self.source_total))

    def rows(self, part: slice) -> MaskedCells:
        """The cells ``part`` of the batch (every tensor sliced along its first axis)."""
        return MaskedCells(self.x[part], self.total_count[part], self.target[part], self.mask[part],
                           None if self.source_total is None else self.source_total[part])

    def __len__(self) -> int:
        return int(self.x.shape[0])
