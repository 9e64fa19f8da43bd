"""Small backbones for tests and the demo: ``tiny`` (a real transformer, random init or a checkpoint written by
``pertadapt pretrain``) and ``learned`` (FM off).

A ``tiny`` checkpoint is a directory: ``config.json`` (``hidden_size``, ``layers``, ``heads``, ``n_genes``),
``model.safetensors`` (the module's state dict) and ``genes.txt`` (its gene order, one symbol a line).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pertadapt.config.components import LearnedBackbone, TinyBackbone
from pertadapt.files import atomic_write_json
from pertadapt.models.backbones.checkpoint import (
    CheckpointError,
    build_or_load,
    load_checked_state,
    read_json_object,
    read_safetensors,
    resolve_vocab,
    write_gene_file,
    write_safetensors,
)
from pertadapt.models.backbones.layers import LayerStack
from pertadapt.models.perturbation import max_norm_rows

log = logging.getLogger(__name__)

#: The keys of a ``tiny`` checkpoint's ``config.json``.
TINY_CONFIG_KEYS = ("hidden_size", "layers", "heads", "n_genes")

__all__ = ["TINY_CONFIG_KEYS", "LearnedGeneEmbedding", "TinyTransformer", "build_tiny", "learned_from_options",
           "tiny_from_options"]


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

    def __init__(self, n_genes: int, hidden_size: int, layers: int, heads: int,
                 genes: Sequence[str] | None = None) -> None:
        super().__init__()
        if genes is not None and len(genes) != n_genes:
            raise CheckpointError(f"tiny: {len(genes)} genes but n_genes={n_genes}")
        #: The gene order of a loaded checkpoint (data must match it); ``None`` for a random init (any order).
        self.genes: tuple[str, ...] | None = tuple(genes) if genes is not None else None
        self.hidden_size = hidden_size
        self.layers, self.heads, self.n_genes = layers, heads, n_genes
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

    def save_pretrained_dir(self, directory: str | Path, genes: Sequence[str] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``genes.txt`` into ``directory`` (each atomically).

        Parameters
        ----------
        directory
            The checkpoint directory (created if absent).
        genes
            The ``N`` genes in input order; default the model's own (required for a random init).
        """
        directory = Path(directory)
        genes = tuple(genes) if genes is not None else self.genes
        if genes is None or len(genes) != self.n_genes:
            raise ValueError(f"tiny: saving needs the {self.n_genes} genes in input order")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "config.json", {"hidden_size": self.hidden_size, "layers": self.layers,
                                                      "heads": self.heads, "n_genes": self.n_genes})
        write_safetensors(directory / "model.safetensors", self.state_dict())
        write_gene_file(directory, genes)

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path) -> TinyTransformer:
        """Load a checkpoint written by :meth:`save_pretrained_dir`.

        Raises
        ------
        CheckpointError
            When ``config.json`` is missing or malformed, or the tensors or gene list do not fit.
        """
        directory = Path(directory)
        what = f"tiny checkpoint {directory}"
        path = directory / "config.json"
        raw = read_json_object(path, "a tiny checkpoint directory written by pertadapt pretrain")
        sizes = _tiny_sizes(raw, path)
        genes = resolve_vocab(directory, sizes["n_genes"], what)
        model = cls(sizes["n_genes"], sizes["hidden_size"], sizes["layers"], sizes["heads"], genes=genes)
        load_checked_state(model, read_safetensors(directory / "model.safetensors"), what)
        log.info("loaded tiny FM (%d layers, hidden %d, %d genes) from %s", model.layers, model.hidden_size,
                 model.n_genes, directory)
        return model


def _tiny_sizes(raw: object, path: Path) -> dict[str, int]:
    """The four positive integer sizes of a ``tiny`` ``config.json``; anything else is a :class:`CheckpointError`."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    bad = [k for k in TINY_CONFIG_KEYS if not (isinstance(raw.get(k), int) and raw[k] > 0)]
    if bad:
        raise CheckpointError(f"{path}: expected positive integers for {', '.join(TINY_CONFIG_KEYS)}; "
                              f"missing or invalid: {', '.join(bad)}")
    if raw["hidden_size"] % raw["heads"]:
        raise CheckpointError(f"{path}: heads={raw['heads']} does not divide hidden_size={raw['hidden_size']}")
    return {k: int(raw[k]) for k in TINY_CONFIG_KEYS}


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


def build_tiny(*, checkpoint: str | None, genes: Sequence[str] | None, hidden_size: int, layers: int,
               heads: int) -> TinyTransformer:
    """Registry builder for ``backbone.name: tiny``: random init over the data's ``genes``, or a checkpoint.

    Parameters
    ----------
    checkpoint
        A directory written by :meth:`TinyTransformer.save_pretrained_dir`, or ``None`` for a random init.
    genes
        The data's gene order; a checkpoint's genes must equal it (``None``: no check). A random init needs it.
    hidden_size, layers, heads
        Sizes of a random init (a checkpoint's own sizes win).

    Raises
    ------
    CheckpointError
        Naming the first gene mismatches, or a layout/shape problem of the checkpoint.
    """
    if checkpoint is None and genes is None:
        raise ValueError("tiny: a random init needs the data's genes")
    return build_or_load(checkpoint, genes, random_init=lambda vocab: TinyTransformer(len(vocab), hidden_size,
                                                                                      layers, heads),
                         load=TinyTransformer.from_pretrained_dir, what="tiny")


def tiny_from_options(options: TinyBackbone, *, genes: Sequence[str] | None, width: int) -> TinyTransformer:
    """Registry builder for ``backbone: {name: tiny, hidden_size, layers, heads, checkpoint}`` (``width`` unused)."""
    return build_tiny(checkpoint=options.checkpoint, genes=genes, hidden_size=options.hidden_size,
                      layers=options.layers, heads=options.heads)


def learned_from_options(options: LearnedBackbone, *, genes: Sequence[str], width: int) -> LearnedGeneEmbedding:
    """Registry builder for ``backbone: {name: learned}``: an ``(N, width)`` embedding, ``width = model.hidden_size``."""
    return LearnedGeneEmbedding(len(genes), width)
