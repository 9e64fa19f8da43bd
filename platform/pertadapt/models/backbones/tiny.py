"""Small random-init backbones for tests and the demo: ``tiny`` (a real transformer) and ``learned`` (FM off)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pertadapt.config.components import LearnedBackbone, TinyBackbone
from pertadapt.models.backbones.layers import LayerStack
from pertadapt.models.perturbation import max_norm_rows

__all__ = ["LearnedGeneEmbedding", "TinyTransformer", "build_tiny", "learned_from_options", "tiny_from_options"]


class TinyTransformer(LayerStack):
    """A 2-layer bidirectional transformer over genes: value MLP + gene-ID embedding + depth token.

    Parameters
    ----------
    n_genes
        Number of input genes ``N`` (any order; the data defines it).
    hidden_size
        Token width ``d``.
    layers, heads
        Encoder depth and heads.
    """

    genes = None

    def __init__(self, n_genes: int, hidden_size: int, layers: int, heads: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.value = nn.Sequential(nn.Linear(1, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.gene = nn.Embedding(n_genes, hidden_size)
        self.depth = nn.Linear(1, hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, heads, 2 * hidden_size, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        """``(batch, N)`` log1p expression + ``(batch,)`` totals → ``(batch, N, d)``."""
        tok = self.value(x_ctrl[..., None]) + self.gene.weight
        depth = self.depth(torch.log10(total_count.clamp(min=1.0))[:, None, None])
        out = self.run_layers(self.encoder.layers, torch.cat([tok, depth], dim=1))  # = self.encoder (no norm)
        return self.norm(out[:, :-1])

    def transformer_layers(self) -> list[nn.Module]:
        """The encoder blocks in order."""
        return list(self.encoder.layers)


class LearnedGeneEmbedding(nn.Module):
    """FM off: one learned embedding per gene, identical for every cell (the paper's FM ablation).

    A full ``(N, D)`` table with rows of L2 norm ≤ 1, as the reference's ``gene_emb``
    (``nn.Embedding(N, D, max_norm=True)``); the model builder makes ``D`` the model width, so no
    projection sits between the table and the adapter or decoder. The cell's state then enters the
    model only through the ``+ x_ctrl`` residual.

    Parameters
    ----------
    n_genes
        Number of genes ``N``.
    hidden_size
        Embedding width ``D``.
    """

    genes = None

    def __init__(self, n_genes: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gene = nn.Embedding(n_genes, hidden_size)

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        """``(batch, N)`` → ``(batch, N, d)``; ignores the cell's values by design."""
        e = max_norm_rows(self.gene.weight)  # rows of norm ≤ 1, as the reference's max_norm=1 embedding
        return e.expand(x_ctrl.shape[0], -1, -1)

    def transformer_layers(self) -> list[nn.Module]:
        """No transformer blocks."""
        return []


def build_tiny(*, checkpoint: str | None, genes: Sequence[str], hidden_size: int, layers: int,
               heads: int) -> TinyTransformer:
    """Registry builder for ``backbone.name: tiny`` (random init over the data's ``genes``).

    Raises
    ------
    ValueError
        When a checkpoint is given (``tiny`` has none).
    """
    if checkpoint is not None:
        raise ValueError("backbone.checkpoint: the 'tiny' backbone is random-init and takes no checkpoint")
    return TinyTransformer(len(genes), hidden_size, layers, heads)


def tiny_from_options(options: TinyBackbone, *, genes: Sequence[str], width: int) -> TinyTransformer:
    """Registry builder for ``backbone: {name: tiny, hidden_size, layers, heads}`` (``width`` unused)."""
    return build_tiny(checkpoint=None, genes=genes, hidden_size=options.hidden_size, layers=options.layers,
                      heads=options.heads)


def learned_from_options(options: LearnedBackbone, *, genes: Sequence[str], width: int) -> LearnedGeneEmbedding:
    """Registry builder for ``backbone: {name: learned}``: an ``(N, width)`` embedding, ``width = model.hidden_size``."""
    return LearnedGeneEmbedding(len(genes), width)
