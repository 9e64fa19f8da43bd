"""The only config → object code for models: typed config + derived arrays → modules and losses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pertadapt.config.schema import RunConfig
from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.models.decoder import GearsDecoder
from pertadapt.models.finetune import apply_finetune
from pertadapt.models.head import GeneHead
from pertadapt.models.losses import LOSSES
from pertadapt.models.pertadapt_model import PertAdaptModel
from pertadapt.models.perturbation import PerturbationEncoder
from pertadapt.types import Batch, LossOutput

__all__ = ["ModelInputs", "build_loss", "build_model"]


@dataclass(frozen=True)
class ModelInputs:
    """Everything a model needs that comes from the data and GO, as plain arrays.

    Attributes
    ----------
    genes
        Model gene order ``(N,)`` (must equal a pretrained backbone's vocabulary).
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


def build_model(cfg: RunConfig, inputs: ModelInputs) -> PertAdaptModel:
    """Build the PertAdapt network and set which backbone parameters train (``backbone.finetune``).

    With ``adapter.enabled: false`` the network is the FM-baseline (GEARS) decoder over the backbone's
    embeddings (``adapter.off_mode: decoder``) or ``H = E + p`` into the gene head (``sum``). FM off
    (``backbone.name: learned``) is a full-width ``N × model.hidden_size`` gene embedding.

    Raises
    ------
    ValueError
        When the decoder is asked for but ``inputs`` has no co-expression graph, or a mask is asked for
        but none was built.
    """
    bcfg, acfg, d = cfg.backbone, cfg.adapter, cfg.model.hidden_size
    extra = {"input_mode": bcfg.input_mode} if bcfg.name == "aido_cell" else {}
    width = bcfg.hidden_size if bcfg.is_foundation_model else d  # FM off: no rank-limiting projection
    backbone = build_backbone(bcfg.name, checkpoint=bcfg.checkpoint, genes=inputs.genes,
                              hidden_size=width, layers=bcfg.layers, heads=bcfg.heads, **extra)
    perturbation = PerturbationEncoder(inputs.n_perts, d, torch.from_numpy(inputs.graph_src),
                                       torch.from_numpy(inputs.graph_dst), torch.from_numpy(inputs.graph_weight))
    if cfg.uses_fm_decoder:
        if inputs.coexpress_src is None or inputs.coexpress_dst is None or inputs.coexpress_weight is None:
            raise ValueError("adapter.off_mode='decoder' needs the co-expression graph; none was built")
        decoder = GearsDecoder(len(inputs.genes), d, cfg.model.head_hidden, torch.from_numpy(inputs.coexpress_src),
                               torch.from_numpy(inputs.coexpress_dst), torch.from_numpy(inputs.coexpress_weight))
        model = PertAdaptModel(backbone, perturbation, None, None, d, acfg.inject, decoder=decoder)
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
        head = GeneHead(len(inputs.genes), d, cfg.model.head_hidden)
        model = PertAdaptModel(backbone, perturbation, adapter, head, d, acfg.inject)
    if bcfg.is_foundation_model:  # FM off: the per-gene embedding is a trained part of the model
        apply_finetune(model.backbone, bcfg.finetune, last_k=bcfg.last_k, lora_rank=bcfg.lora_rank)
    return model


def build_loss(cfg: RunConfig, inputs: ModelInputs) -> Callable[[torch.Tensor, Batch], LossOutput]:
    """Bind the configured loss to its options: ``(pred, batch) -> LossOutput``."""
    lcfg = cfg.loss
    fn = LOSSES[lcfg.name]
    if lcfg.name == "adaptive":
        return functools.partial(fn, variant=lcfg.variant)
    if lcfg.name == "gears":
        return _GearsLoss(torch.from_numpy(inputs.ctrl_mean.astype(np.float32)), lcfg.gears_gamma,
                          lcfg.gears_direction_lambda)
    return fn


class _GearsLoss:
    def __init__(self, ctrl_mean: torch.Tensor, gamma: float, direction_lambda: float) -> None:
        self.ctrl_mean, self.gamma, self.direction_lambda = ctrl_mean, gamma, direction_lambda

    def __call__(self, pred: torch.Tensor, batch: Batch) -> LossOutput:
        return LOSSES["gears"](pred, batch, ctrl_mean=self.ctrl_mean.to(pred.device), gamma=self.gamma,
                               direction_lambda=self.direction_lambda)
