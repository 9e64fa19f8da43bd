"""Which backbone parameters train: ``frozen`` (paper), ``last_k``, ``full`` or ``lora``.

LoRA is implemented here (a weight parametrization ``W ↦ W + (α/r)·B A``) rather than through
``peft``: ``pip install --dry-run peft`` into this environment pulls ``transformers``, ``tokenizers`` and
``accelerate``, which are not project dependencies, and ``peft`` only wraps ``nn.Linear`` modules, while
scFoundation's encoder and ``nn.MultiheadAttention`` keep q/k/v in one packed ``in_proj_weight``
parameter. A parametrization covers both. ``B`` starts at zero, so a freshly adapted backbone computes
exactly what it did before. A LoRA-adapted module serialises through ``state_dict()`` only (a
``torch.nn.utils.parametrize`` rule): ``parametrizations.<name>.original`` plus the adapters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["FINETUNE_MODES", "LoRADelta", "apply_finetune", "lora_targets"]

log = logging.getLogger(__name__)

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


def _frozen(backbone: nn.Module, *, last_k: int, lora_rank: int, lora_alpha: float) -> list[nn.Parameter]:
    """Nothing trains; the backbone stays in eval mode even when its parent calls ``train()``."""
    backbone.train = _EvalOnlyTrain(backbone)
    backbone.eval()
    return []


def _full(backbone: nn.Module, *, last_k: int, lora_rank: int, lora_alpha: float) -> list[nn.Parameter]:
    """Every parameter trains."""
    return list(backbone.parameters())


def _last_k(backbone: nn.Module, *, last_k: int, lora_rank: int, lora_alpha: float) -> list[nn.Parameter]:
    """The parameters of the last ``last_k`` blocks of ``transformer_layers()``."""
    layers = backbone.transformer_layers()
    if not 1 <= last_k <= len(layers):
        raise ValueError(f"backbone.last_k: {last_k} is outside 1..{len(layers)} (the backbone's blocks)")
    return list(dict.fromkeys(p for layer in layers[-last_k:] for p in layer.parameters()))


def _lora(backbone: nn.Module, *, last_k: int, lora_rank: int, lora_alpha: float) -> list[nn.Parameter]:
    """Rank-``lora_rank`` adapters on every attention projection (see :func:`lora_targets`)."""
    if lora_rank < 1:
        raise ValueError(f"backbone.lora_rank: expected a positive integer, got {lora_rank}")
    targets = lora_targets(backbone)
    if not targets:
        raise ValueError(f"backbone.finetune=lora: {type(backbone).__name__} has no attention projections to adapt")
    params: list[nn.Parameter] = []
    for owner, attr in targets:
        out_features, in_features = getattr(owner, attr).shape
        delta = LoRADelta(out_features, in_features, lora_rank, lora_alpha).to(getattr(owner, attr))
        parametrize.register_parametrization(owner, attr, delta)
        params += [delta.lora_A, delta.lora_B]
    return params


#: ``backbone.finetune`` name → function setting up the mode and returning the parameters that train
#: (the names of the schema's ``backbone.finetune`` choices).
FINETUNE_MODES: dict[str, Callable[..., list[nn.Parameter]]] = {
    "frozen": _frozen, "last_k": _last_k, "full": _full, "lora": _lora}


def apply_finetune(backbone: nn.Module, mode: str, *, last_k: int = 1, lora_rank: int = 8,
                   lora_alpha: float = 16.0) -> list[nn.Parameter]:
    """Set which backbone parameters train and return them (what the optimiser gets from the backbone).

    Parameters
    ----------
    backbone
        A :class:`~pertadapt.models.backbones.base.Backbone` module.
    mode
        A key of :data:`FINETUNE_MODES`. ``frozen``: nothing trains and the backbone stays in eval mode
        even when its parent calls ``train()`` (as the reference re-sets it every epoch). ``last_k``: only
        the last ``last_k`` blocks of ``transformer_layers()``. ``full``: every parameter. ``lora``:
        rank-``lora_rank`` adapters on the attention projections of every block; the original weights
        stay frozen.
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
    backbone.__dict__.pop("train", None)  # a previous ``frozen`` pin
    backbone.train()
    params = FINETUNE_MODES[mode](backbone, last_k=last_k, lora_rank=lora_rank, lora_alpha=lora_alpha)
    for p in params:
        p.requires_grad_(True)
    log.info("backbone finetune=%s: %d trainable parameters", mode, sum(p.numel() for p in params))
    return params
