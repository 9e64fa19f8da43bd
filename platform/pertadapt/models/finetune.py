"""Which backbone parameters train: ``frozen`` (paper), ``last_k``, ``full`` or ``lora``.

LoRA is implemented here (a weight parametrization ``W ↦ W + (α/r)·B A``) rather than through
``peft``: ``pip install --dry-run peft`` into this environment pulls ``transformers``, ``tokenizers``,
``accelerate`` and ``safetensors``, which are not project dependencies (the dependency pins may not be
changed here), and ``peft`` only wraps ``nn.Linear`` modules, while scFoundation's encoder and
``nn.MultiheadAttention`` keep q/k/v in one packed ``in_proj_weight`` parameter. A parametrization
covers both. ``B`` starts at zero, so a freshly adapted backbone computes exactly what it did before.
A LoRA-adapted module serialises through ``state_dict()`` only (a ``torch.nn.utils.parametrize`` rule);
:func:`merge_lora` folds the adapters back into plain weights.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["FINETUNE_MODES", "LoRADelta", "apply_finetune", "lora_targets", "merge_lora"]

log = logging.getLogger(__name__)

FINETUNE_MODES = ("frozen", "last_k", "full", "lora")

#: Attention projection weights (names relative to a transformer block) that LoRA adapts:
#: AIDO.Cell ``attention.self.{query,key,value}`` / ``attention.output.dense``; scFoundation encoder and
#: ``nn.MultiheadAttention`` ``in_proj_weight`` / ``out_proj``; Performer ``to_{q,k,v,out}``.
_ATTENTION_WEIGHT = re.compile(
    r"(?:^|\.)(?:(?:query|key|value|to_q|to_k|to_v|to_out|out_proj|q_proj|k_proj|v_proj|o_proj"
    r"|attention\.output\.dense)\.weight|in_proj_weight)$")


class LoRADelta(nn.Module):
    """Low-rank update of a ``(out, in)`` weight: ``W + (alpha / rank) · B A``.

    Parameters
    ----------
    out_features, in_features
        Shape of the adapted weight.
    rank
        ``r``: ``lora_A`` is ``(r, in)`` (Kaiming-uniform), ``lora_B`` is ``(out, r)`` (zeros).
    alpha
        Scale numerator.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``(out, in)`` frozen weight → ``(out, in)`` adapted weight."""
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


def lora_targets(backbone: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner module, parameter name)`` of every attention projection weight in the transformer blocks."""
    targets = []
    for layer in backbone.transformer_layers():
        for name, param in layer.named_parameters():
            if param.dim() == 2 and _ATTENTION_WEIGHT.search(name):
                owner, _, attr = name.rpartition(".")
                targets.append((layer.get_submodule(owner) if owner else layer, attr))
    return targets


class _EvalOnlyTrain:
    """Picklable replacement of a frozen backbone's ``train``: it stays in eval mode (reference behaviour)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def apply_finetune(backbone: nn.Module, mode: str, *, last_k: int = 1, lora_rank: int = 8,
                   lora_alpha: float = 16.0) -> list[nn.Parameter]:
    """Set which backbone parameters train and return them (what the optimiser gets from the backbone).

    Parameters
    ----------
    backbone
        A :class:`~pertadapt.models.backbones.base.Backbone` module.
    mode
        ``frozen``: nothing trains and the backbone stays in eval mode even when its parent calls
        ``train()`` (as the reference re-sets it every epoch). ``last_k``: only the last ``last_k`` blocks
        of ``transformer_layers()``. ``full``: every parameter. ``lora``: rank-``lora_rank`` adapters on
        the attention projections of every block; the original weights stay frozen.
    last_k
        Number of trailing blocks for ``last_k`` (``1 ≤ last_k ≤`` number of blocks).
    lora_rank, lora_alpha
        LoRA rank ``r`` and scale numerator ``α`` (update scaled by ``α / r``).

    Returns
    -------
    list[nn.Parameter]
        The trainable backbone parameters (``requires_grad=True``); every other backbone parameter has
        ``requires_grad=False``.

    Raises
    ------
    ValueError
        For an unknown mode, an out-of-range ``last_k``/``lora_rank``, or a backbone without attention
        projections in ``lora`` mode.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"backbone.finetune: {mode!r} is not one of {', '.join(FINETUNE_MODES)}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    if mode == "frozen":
        backbone.train = _EvalOnlyTrain(backbone)
        backbone.eval()
        return []
    backbone.__dict__.pop("train", None)
    backbone.train()
    if mode == "full":
        params = list(backbone.parameters())
    elif mode == "last_k":
        layers = backbone.transformer_layers()
        if not 1 <= last_k <= len(layers):
            raise ValueError(f"backbone.last_k: {last_k} is outside 1..{len(layers)} (the backbone's blocks)")
        params = list(dict.fromkeys(p for layer in layers[-last_k:] for p in layer.parameters()))
    else:
        params = _add_lora(backbone, lora_rank, lora_alpha)
    for p in params:
        p.requires_grad_(True)
    log.info("backbone finetune=%s: %d trainable parameters", mode, sum(p.numel() for p in params))
    return params


def _add_lora(backbone: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    if rank < 1:
        raise ValueError(f"lora_rank: expected a positive integer, got {rank}")
    targets = lora_targets(backbone)
    if not targets:
        raise ValueError(f"finetune=lora: {type(backbone).__name__} has no attention projections to adapt")
    params: list[nn.Parameter] = []
    for owner, attr in targets:
        out_features, in_features = getattr(owner, attr).shape
        delta = LoRADelta(out_features, in_features, rank, alpha).to(getattr(owner, attr))
        parametrize.register_parametrization(owner, attr, delta)
        params += [delta.lora_A, delta.lora_B]
    return params


def merge_lora(backbone: nn.Module) -> int:
    """Fold every LoRA update into its weight and remove the adapters (e.g. before ``save_pretrained_dir``).

    Returns
    -------
    int
        Number of merged weights.
    """
    merged = 0
    for module in list(backbone.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                if any(isinstance(p, LoRADelta) for p in module.parametrizations[attr]):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
                    merged += 1
    return merged
