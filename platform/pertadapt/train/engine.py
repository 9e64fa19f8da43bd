"""Training engines: one small protocol, a plain-torch implementation and a DeepSpeed one.

The engine owns device, precision, distribution, gradient accumulation, value clipping, the
optimiser and checkpoints; the training loop only calls the methods below. This is the only
module that imports :mod:`deepspeed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pertadapt.config.deepspeed import read_deepspeed_json
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.types import Batch

__all__ = ["ENGINES", "DeepSpeedEngine", "Engine", "TorchEngine", "build_engine", "consolidated_state_dict", "deepspeed_config"]

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the training loop needs from an engine."""

    rank: int
    world_size: int
    model: nn.Module

    def forward(self, batch: Batch) -> torch.Tensor:
        """``(B, N)`` predictions for a batch (moved to the engine's device and dtype)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch loss (scaled by 1/accumulation)."""
        ...

    def step(self) -> None:
        """End of a micro-batch; the optimiser steps at accumulation boundaries."""
        ...

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        ...

    def train(self, mode: bool = True) -> None:
        """Switch train/eval mode (a frozen backbone stays in eval mode)."""
        ...

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write a resumable checkpoint (every rank calls it)."""
        ...

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its client state."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (in rank order)."""
        ...


def _frozen_backbone_eval(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
        backbone.eval()


def _clip_value_hooks(params: list[nn.Parameter], clip: float | None) -> None:
    """Clamp each micro-batch gradient to ``[-clip, clip]`` (value clipping, as the paper, per micro-step)."""
    if clip is None:
        return
    for p in params:
        p.register_hook(lambda g, c=clip: g.clamp(-c, c))


def _optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


class TorchEngine:
    """Single-process engine (CPU or one GPU), fp32.

    Parameters
    ----------
    model
        The model; its parameters with ``requires_grad`` are optimised.
    cfg
        Run config (optimiser, accumulation, clipping).
    device
        Torch device.
    """

    rank = 0
    world_size = 1

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(params, cfg)
        _clip_value_hooks(params, cfg.optim.clip_value)
        self.accumulation = cfg.accumulation_steps
        self._micro = 0

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.to(self.device))

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        _frozen_backbone_eval(self.model)

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "state.pt.tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client_state": client_state, "micro": self._micro}, tmp)
        os.replace(tmp, directory / "state.pt")

    def load(self, directory: Path) -> dict[str, Any]:
        state = torch.load(directory / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._micro = state["micro"]
        return state["client_state"]

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: parallelism/precision knobs from the JSON, batch sizes from the run config."""
    if world_size != cfg.engine.workers:
        raise ConfigError(f"engine.workers: the config asks for {cfg.engine.workers} workers but "
                          f"{world_size} processes joined")
    ds = read_deepspeed_json(cfg.engine.deepspeed_config)
    accumulation = cfg.accumulation_steps
    # gradient_clipping=0: DeepSpeed would otherwise clip the global gradient norm at 1.0 by default; the
    # paper clips gradient *values* (optim.clip_value, applied per micro-batch by the engine's hooks).
    ds.update(train_micro_batch_size_per_gpu=cfg.optim.micro_batch_size, gradient_accumulation_steps=accumulation,
              train_batch_size=cfg.optim.micro_batch_size * accumulation * world_size, gradient_clipping=0.0)
    return ds


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0–3 engine (gloo on CPU, NCCL on GPU), client torch Adam optimiser.

    Parameters
    ----------
    model
        The model; its parameters with ``requires_grad`` are optimised.
    cfg
        Run config; ``engine.deepspeed_config`` names the JSON.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        import deepspeed

        # Skip the CPU shared-memory comm op: it JIT-compiles C++ for ~50 s and only speeds up inference.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cfg.engine.use_gpu else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world_size)
        self.dtype = torch.bfloat16 if ds_cfg.get("bf16", {}).get("enabled") else None
        params = [p for p in model.parameters() if p.requires_grad]
        _clip_value_hooks(params, cfg.optim.clip_value)
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(params, cfg), config=ds_cfg)
        self.model = self.ds.module
        self.device = self.ds.device

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.ds(batch.to(self.device, self.dtype)).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def set_lr(self, lr: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr

    def train(self, mode: bool = True) -> None:
        if not mode:
            self._average_buffers()
        self.ds.train(mode)
        _frozen_backbone_eval(self.model)

    def _average_buffers(self) -> None:
        """Average floating buffers (BatchNorm running statistics) across ranks before evaluation.

        Each rank updates its BN statistics on its own micro-batches; without this, ranks would evaluate
        their shards of the validation set with different statistics.
        """
        for buf in self.model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world_size)

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        self.ds.save_checkpoint(str(directory), tag="ds", client_state=client_state)

    def load(self, directory: Path) -> dict[str, Any]:
        _, client_state = self.ds.load_checkpoint(str(directory), tag="ds")
        return client_state or {}

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def consolidated_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model state dict from a checkpoint of either engine (ZeRO shards are merged).

    Parameters
    ----------
    directory
        A checkpoint directory written by :meth:`Engine.save` (``ckpt/best`` or ``ckpt/last``).
    """
    if (directory / "state.pt").exists():
        return torch.load(directory / "state.pt", map_location="cpu", weights_only=False)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="ds")


def _torch_engine(model: nn.Module, cfg: RunConfig) -> Engine:
    return TorchEngine(model, cfg, torch.device("cuda" if cfg.engine.use_gpu else "cpu"))


#: Closed registry: ``engine.name`` → builder ``(model, cfg) -> Engine``.
ENGINES: dict[str, Callable[[nn.Module, RunConfig], Engine]] = {"torch": _torch_engine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: RunConfig) -> Engine:
    """The engine named by ``engine.name``."""
    return ENGINES[cfg.engine.name](model, cfg)
