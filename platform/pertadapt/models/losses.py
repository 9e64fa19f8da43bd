"""Training losses, each returning a :class:`~pertadapt.types.LossOutput` with named components.

All losses are pure functions of the prediction and the batch (DE indices and non-zero masks ride
in the batch); none reads AnnData.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from pertadapt.config.components import LOSS_OPTIONS, AdaptiveLoss, GearsLoss, LossOptions, MseLoss
from pertadapt.types import Batch, LossOutput

if TYPE_CHECKING:
    from pertadapt.models.build import ModelInputs

__all__ = ["LOSSES", "LossFn", "adaptive_loss", "gears_loss", "mse_loss", "register_loss"]

#: A bound loss: ``(pred (B, N), batch) -> LossOutput``.
LossFn = Callable[[torch.Tensor, Batch], LossOutput]


def _groups(batch: Batch) -> list[torch.Tensor]:
    return [torch.nonzero(batch.cond_id == c).flatten() for c in torch.unique(batch.cond_id)]


def adaptive_loss(pred: torch.Tensor, batch: Batch, *, variant: str = "code") -> LossOutput:
    """L_adapt (paper code: ``loss_adapt``): DE-gene and all-gene MSE re-weighted by their detached ratio.

    With ``K`` conditions in the micro-batch (ctrl included),
    ``L_DE = (1/K) Σ_{p≠ctrl} MSE(ŷ[I_p, DE_p], y[I_p, DE_p])`` and
    ``L_all = (1/K) [Σ_{p≠ctrl} MSE(ŷ[I_p, NZ_p], y[I_p, NZ_p]) + 1[ctrl] MSE(ŷ[ctrl], y[ctrl])]``;
    ``w_DE = sg((L_DE + L_all) / L_DE)``; ``w_all = 2`` (``variant='code'``, as shipped) or
    ``sg((L_DE + L_all) / L_all)`` (``variant='intended'``).

    Parameters
    ----------
    pred
        ``(B, N)`` predictions.
    batch
        Supplies ``y``, ``cond_id``, ``is_ctrl``, ``de_idx`` ``(B, n_de)`` and ``nz_mask`` ``(B, N)``.
    variant
        ``code`` or ``intended``.
    """
    groups = _groups(batch)
    k = len(groups)
    l_de = pred.new_zeros(())
    l_all = pred.new_zeros(())
    for idx in groups:
        err = (pred[idx] - batch.y[idx]) ** 2
        if bool(batch.is_ctrl[idx[0]]):
            l_all = l_all + err.mean()
            continue
        de = batch.de_idx[idx[0]]
        l_de = l_de + err[:, de].mean()
        nz = batch.nz_mask[idx[0]]
        if nz.any():
            l_all = l_all + err[:, nz].mean()
    l_de, l_all = l_de / k, l_all / k
    total_d = (l_de + l_all).detach()
    w_de = float(total_d / l_de.detach()) if l_de.item() > 0 else 0.0
    if variant == "code":
        w_all = 2.0 if l_all.item() > 0 else 0.0
    else:
        w_all = float(total_d / l_all.detach()) if l_all.item() > 0 else 0.0
    total = w_de * l_de + w_all * l_all
    return LossOutput(total, {"loss_de": l_de.detach(), "loss_all": l_all.detach()}, {"w_de": w_de, "w_all": w_all})


def gears_loss(pred: torch.Tensor, batch: Batch, *, ctrl_mean: torch.Tensor, gamma: float = 2.0,
               direction_lambda: float = 0.1) -> LossOutput:
    """GEARS autofocus + direction loss (GEARS ``utils.py::loss_fct``) over each condition's non-zero genes.

    ``(1/K) Σ_p [Σ |ŷ−y|^(2+γ) / (n_p g_p) + λ Σ (sign(y−c) − sign(ŷ−c))² / (n_p g_p)]``, with ``c``
    the ``(N,)`` mean control expression and all genes for ctrl.
    """
    groups = _groups(batch)
    focus = pred.new_zeros(())
    direction = pred.new_zeros(())
    for idx in groups:
        genes = slice(None) if bool(batch.is_ctrl[idx[0]]) else batch.nz_mask[idx[0]]
        p, y, c = pred[idx][:, genes], batch.y[idx][:, genes], ctrl_mean[genes]
        if p.numel() == 0:
            continue
        focus = focus + (p - y).abs().pow(2 + gamma).mean()
        direction = direction + ((torch.sign(y - c) - torch.sign(p - c)) ** 2).mean()
    k = len(groups)
    focus, direction = focus / k, direction / k
    return LossOutput(focus + direction_lambda * direction,
                      {"loss_autofocus": focus.detach(), "loss_direction": direction.detach()},
                      {"direction_lambda": direction_lambda})


def mse_loss(pred: torch.Tensor, batch: Batch) -> LossOutput:
    """Plain mean squared error over all cells and genes."""
    loss = torch.mean((pred - batch.y) ** 2)
    return LossOutput(loss, {"loss_mse": loss.detach()}, {})


def _adaptive(options: AdaptiveLoss, inputs: ModelInputs) -> LossFn:
    return lambda pred, batch: adaptive_loss(pred, batch, variant=options.variant)


def _mse(options: MseLoss, inputs: ModelInputs) -> LossFn:
    return mse_loss


def _gears(options: GearsLoss, inputs: ModelInputs) -> LossFn:
    ctrl_mean = torch.from_numpy(inputs.ctrl_mean.astype(np.float32))
    return lambda pred, batch: gears_loss(pred, batch, ctrl_mean=ctrl_mean.to(pred.device), gamma=options.gamma,
                                          direction_lambda=options.direction_lambda)


#: Registry: loss name → builder ``(options, inputs) -> LossFn``, ``options`` being the loss's block (the
#: dataclass registered under the same name in ``config.components.LOSS_OPTIONS``).
LOSSES: dict[str, Callable[..., LossFn]] = {"adaptive": _adaptive, "gears": _gears, "mse": _mse}


def register_loss(options: type[LossOptions], builder: Callable[..., LossFn]) -> None:
    """Add a loss: its option dataclass (``name`` default = the loss's name) and its builder.

    Parameters
    ----------
    options
        A frozen dataclass deriving from :class:`~pertadapt.config.components.LossOptions`.
    builder
        ``(options, inputs: ModelInputs) -> LossFn``.
    """
    LOSSES[LOSS_OPTIONS.register(options).name] = builder
