"""The only config → object code for models: typed config + derived arrays → modules and losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pertadapt.config.components import FoundationModelBackbone
from pertadapt.config.schema import RunConfig
from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask
from pertadapt.models.backbones.cached import CachedEmbeddings
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.models.decoder import GearsDecoder
from pertadapt.models.finetune import apply_finetune
from pertadapt.models.head import GeneHead
from pertadapt.models.losses import LOSSES, LossFn
from pertadapt.models.pertadapt_model import PertAdaptModel
from pertadapt.models.perturbation import PerturbationEncoder

__all__ = ["ModelInputs", "build_backbone_for", "build_loss", "build_model"]


@dataclass(frozen=True)
class ModelInputs:
    """Everything a model needs that comes from the data and GO, as plain arrays.

    Attributes
    ----------
    genes
        Model gene order ``(N,)``: the genes the adapter, GO mask, head and loss work on.
    n_perts
        Size ``P`` of the perturbation vocabulary.
    graph_src, graph_dst, graph_weight
        ``(n_edges,)`` GO gene graph over the perturbation vocabulary.
    mask_indptr, mask_indices
        CSR arrays of the ``(N, N)`` attention mask, or ``None`` for full attention.
    ctrl_mean
        ``(N,)`` mean control expression (used by the ``gears`` loss).
    coexpress_src, coexpress_dst, coexpress_weight
        ``(n_edges,)`` co-expression graph over the ``N`` genes (FM-baseline decoder only), else ``None``.
    input_genes
        The backbone's input genes ``(N_in,)`` (the data file's genes; must equal a pretrained backbone's
        vocabulary) when ``genes`` are a subset of them (``model.gene_space: measured``), else ``None``.
    gene_idx
        ``(N,)`` positions of ``genes`` in ``input_genes``: the backbone's per-gene embeddings are gathered
        there right after the backbone; ``None`` with ``input_genes``.
    """

    genes: tuple[str, ...]
    n_perts: int
    graph_src: np.ndarray
    graph_dst: np.ndarray
    graph_weight: np.ndarray
    mask_indptr: np.ndarray | None
    mask_indices: np.ndarray | None
    ctrl_mean: np.ndarray
    coexpress_src: np.ndarray | None = None
    coexpress_dst: np.ndarray | None = None
    coexpress_weight: np.ndarray | None = None
    input_genes: tuple[str, ...] | None = None
    gene_idx: np.ndarray | None = None


def build_backbone_for(cfg: RunConfig, inputs: ModelInputs) -> nn.Module:
    """The configured backbone (``backbone.*``) over the data's genes; :func:`build_model` sets its fine-tuning.

    It reads the data file's genes (``inputs.input_genes`` when the model genes are a subset of them).
    FM off (``backbone.name: learned``) is a full-width ``N_in × model.hidden_size`` gene embedding (no
    rank-limiting projection).
    """
    genes = inputs.genes if inputs.input_genes is None else inputs.input_genes
    return build_backbone(cfg.backbone, genes=genes, width=cfg.model.hidden_size)


def build_model(cfg: RunConfig, inputs: ModelInputs, *, backbone: nn.Module | None = None,
                embeddings: np.ndarray | None = None) -> PertAdaptModel:
    """Build the PertAdapt network and set which backbone parameters train (``backbone.finetune``).

    With ``adapter.enabled: false`` the network is the FM-baseline (GEARS) decoder over the backbone's
    embeddings (``adapter.off_mode: decoder``) or ``H = E + p`` into the gene head (``sum``).

    Parameters
    ----------
    cfg, inputs
        The run config and the data-derived arrays.
    backbone
        The backbone from :func:`build_backbone_for` (built here by default, first, as it always is, so
        that the seeded initialisation of the other parts does not depend on who built it).
    embeddings
        ``(pool, N, D)`` table of the frozen backbone's embeddings of the control pool over the model
        genes (the embedding cache, already gathered at ``inputs.gene_idx``). The model then holds a
        :class:`CachedEmbeddings` lookup instead of the backbone.

    Raises
    ------
    ValueError
        When the decoder is asked for but ``inputs`` has no co-expression graph, a mask is asked for but
        none was built, or ``embeddings`` do not fit.
    """
    bcfg, acfg, d = cfg.backbone, cfg.adapter, cfg.model.hidden_size
    backbone = build_backbone_for(cfg, inputs) if backbone is None else backbone
    if embeddings is not None:
        if not bcfg.is_frozen_foundation_model:
            raise ValueError("embeddings: only a frozen foundation-model backbone can be replaced by its cache")
        if embeddings.shape[1:] != (len(inputs.genes), backbone.hidden_size):
            raise ValueError(f"embedding table {embeddings.shape} does not fit {len(inputs.genes)} genes x "
                             f"backbone width {backbone.hidden_size}")
        backbone = CachedEmbeddings(embeddings)
    gene_idx = None if inputs.gene_idx is None or embeddings is not None else torch.from_numpy(inputs.gene_idx)
    perturbation = PerturbationEncoder(inputs.n_perts, d, torch.from_numpy(inputs.graph_src),
                                       torch.from_numpy(inputs.graph_dst), torch.from_numpy(inputs.graph_weight))
    if cfg.uses_fm_decoder:
        if inputs.coexpress_src is None or inputs.coexpress_dst is None or inputs.coexpress_weight is None:
            raise ValueError("adapter.off_mode='decoder' needs the co-expression graph; none was built")
        decoder = GearsDecoder(len(inputs.genes), d, cfg.model.head_hidden, torch.from_numpy(inputs.coexpress_src),
                               torch.from_numpy(inputs.coexpress_dst), torch.from_numpy(inputs.coexpress_weight))
        model = PertAdaptModel(backbone, perturbation, None, None, d, acfg.inject, decoder=decoder,
                               gene_idx=gene_idx)
    else:
        adapter = None
        if acfg.enabled:
            mask = None
            if acfg.attention_mask != "none":
                if inputs.mask_indptr is None or inputs.mask_indices is None:
                    raise ValueError(f"adapter.attention_mask={acfg.attention_mask!r} needs a mask; none was built")
                mask = SparseMask(torch.from_numpy(inputs.mask_indptr), torch.from_numpy(inputs.mask_indices))
            adapter = PerturbationAdapter(d, acfg.heads, acfg.ffn_dim, acfg.layers, mask, acfg.chunk_size,
                                          attention_impl=acfg.attention_impl)
        head = GeneHead(len(inputs.genes), d, cfg.model.head_hidden, init=cfg.model.head_init)
        model = PertAdaptModel(backbone, perturbation, adapter, head, d, acfg.inject, gene_idx=gene_idx)
    if isinstance(bcfg, FoundationModelBackbone) and embeddings is None:  # cached: no FM to fine-tune
        apply_finetune(model.backbone, bcfg.finetune, last_k=bcfg.last_k, lora_rank=bcfg.lora_rank)
    return model


def build_loss(cfg: RunConfig, inputs: ModelInputs) -> LossFn:
    """Bind the configured loss to its options: ``(pred, batch) -> LossOutput``."""
    try:
        builder = LOSSES[cfg.loss.name]
    except KeyError:
        raise ValueError(f"loss.name: unknown loss {cfg.loss.name!r}; valid: {', '.join(sorted(LOSSES))}") from None
    return builder(cfg.loss, inputs)
