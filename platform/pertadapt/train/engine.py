"""Training engines: one small protocol, a plain-torch implementation and a DeepSpeed one.

The engine owns device, precision, distribution, the loss scale, gradient accumulation, value
clipping, the optimiser and checkpoints; the training loop only calls the methods below. This is the
only module that imports :mod:`deepspeed`.
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
from pertadapt.config.schema import ConfigError, EngineConfig, OptimConfig
from pertadapt.train.checkpoint import (
    CheckpointError,
    Codec,
    consolidated_state_dict,
    expected_shapes,
    load_tree,
    read_checkpoint,
    save_tree,
    set_rng_state,
    trained_state,
    write_checkpoint,
)
from pertadapt.types import Batch, MaskedCells

__all__ = ["CLIPPERS", "ENGINES", "OPTIMIZERS", "DeepSpeedEngine", "Engine", "EngineSettings", "TorchEngine",
           "ValueClipper", "build_engine", "consolidated_state_dict", "deepspeed_config"]

log = logging.getLogger(__name__)


class EngineSettings(Protocol):
    """What an engine reads from a config: a trial's ``RunConfig`` or a ``PretrainConfig``."""

    @property
    def optim(self) -> OptimConfig:
        """Optimiser, batch sizes and clipping."""
        ...

    @property
    def engine(self) -> EngineConfig:
        """Engine name, workers, DeepSpeed JSON, devices."""
        ...

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each worker."""
        ...

    @property
    def loss_scale(self) -> float:
        """Factor on the loss before backward."""
        ...


class Engine(Protocol):
    """What the training loop needs from an engine."""

    rank: int
    world_size: int
    model: nn.Module
    device: torch.device

    def forward(self, batch: Batch | MaskedCells) -> torch.Tensor:
        """``(B, N)`` predictions for a batch (a trial's or a pretraining's; moved to the engine's device and dtype)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch loss, times ``loss.scale`` / accumulation (then value-clipped)."""
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
        """Write a resumable checkpoint (every rank calls it; format: :mod:`pertadapt.train.checkpoint`)."""
        ...

    def load(self, directory: Path) -> dict[str, Any]:
        """Validate, then restore a checkpoint written by :meth:`save` (RNG states included); its client state.

        Raises :class:`~pertadapt.train.checkpoint.CheckpointError` before changing anything when a file
        is missing or malformed or the tensors do not match the model.
        """
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (in rank order)."""
        ...


def _frozen_backbone_eval(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
        backbone.eval()


def _clip_accumulated(clipper: ValueClipper, i: int, g: torch.Tensor) -> torch.Tensor:
    """The contribution that makes the accumulated gradient ``clamp(acc + g)``; records the new ``acc``."""
    acc = clipper.accumulated.get(i)
    new = (g if acc is None else acc + g).clamp(-clipper.clip, clipper.clip)
    clipper.accumulated[i] = new
    return new if acc is None else new - acc


def _clip_per_micro_batch(clipper: ValueClipper, i: int, g: torch.Tensor) -> torch.Tensor:
    """This micro-batch's own gradient, clamped (the accumulated sum is not)."""
    return g.clamp(-clipper.clip, clipper.clip)


#: Closed registry: ``optim.clip_mode`` → parameter-gradient hook ``(clipper, param index, grad) -> grad``.
CLIPPERS: dict[str, Callable[[ValueClipper, int, torch.Tensor], torch.Tensor]] = {
    "accumulated": _clip_accumulated, "per_micro_batch": _clip_per_micro_batch}


class ValueClipper:
    """Gradient value clipping at ``[-clip, clip]`` through hooks on the trainable parameters.

    A hook sees each micro-batch's gradient ``g`` of a parameter before the engine accumulates it, so the
    same code serves the torch engine (which sums into ``.grad``) and DeepSpeed (which sums into its own,
    possibly partitioned, buffers). ``accumulated`` (the reference's ``clip_grad_value_`` after every
    micro-step backward) keeps this rank's clipped running sum ``acc`` per parameter and returns
    ``clamp(acc + g) - acc``, so that whatever the engine accumulates equals the clamped accumulated
    gradient after every micro-step; ``per_micro_batch`` returns ``clamp(g)``. Under DeepSpeed with ``W``
    ranks a rank's gradient is ``1/W`` of the averaged one, so the engine clips it at ``W × clip``:
    ``per_micro_batch`` is then exactly world-size invariant, while ``accumulated`` clips each rank's own
    running share before the ranks are averaged (like the reference's DDP ``no_sync`` micro-steps), which
    depends on how the cells are split over ranks.

    Parameters
    ----------
    params
        Trainable parameters (hooks are registered on them).
    clip
        Clip value (``optim.clip_value``); ``None`` = no clipping (no hooks).
    mode
        ``optim.clip_mode``: a key of :data:`CLIPPERS`.
    """

    def __init__(self, params: list[nn.Parameter], clip: float | None, mode: str) -> None:
        self.clip = clip
        #: Parameter index → this rank's clipped accumulated gradient since the last optimiser step.
        self.accumulated: dict[int, torch.Tensor] = {}
        if clip is None:
            return
        hook = CLIPPERS[mode]
        for i, p in enumerate(params):
            p.register_hook(lambda g, i=i: hook(self, i, g))

    def reset(self) -> None:
        """Forget the accumulated gradients (call after each optimiser step)."""
        self.accumulated.clear()


#: Registry: ``optim.name`` → builder ``(params, optim config) -> torch optimiser`` (the DeepSpeed engine
#: takes the same one as its client optimiser). ``adam`` adds ``weight_decay × θ`` to the gradient (L2, the
#: paper); ``adamw`` decays the weights directly (decoupled); ``sgd`` with ``momentum``.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], OptimConfig], torch.optim.Optimizer]] = {
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay),
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum),
}


def _optimizer(params: list[nn.Parameter], cfg: EngineSettings) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optim.name](params, cfg.optim)


#: Torch engine: the optimiser's ``state_dict()`` as a :func:`~pertadapt.train.checkpoint.save_tree` file.
OPTIMIZER_FILE = "optimizer.safetensors"


def _check_optimizer_state(path: Path, state: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimiser state whose groups or per-parameter tensors do not fit ``optimizer``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        sizes = [len(g["params"]) for g in state["param_groups"]]
        shape_of = dict(zip([i for g in state["param_groups"] for i in g["params"]], params, strict=True))
        ok = sizes == [len(g["params"]) for g in optimizer.param_groups] and all(
            not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape == shape_of[i].shape
            for i, entry in state["state"].items() for v in entry.values())
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: optimiser state does not match the model's trainable parameters")


class TorchEngine:
    """Single-process engine (CPU or one GPU), fp32.

    Parameters
    ----------
    model
        The model; its parameters with ``requires_grad`` are optimised.
    cfg
        Run config (optimiser, accumulation, loss scale, clipping).
    device
        Torch device.
    """

    rank = 0
    world_size = 1

    def __init__(self, model: nn.Module, cfg: EngineSettings, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(params, cfg)
        self.clipper = ValueClipper(params, cfg.optim.clip_value, cfg.optim.clip_mode)
        self.accumulation = cfg.accumulation_steps
        self.loss_scale = cfg.loss_scale
        self._micro = 0

    def forward(self, batch: Batch | MaskedCells) -> torch.Tensor:
        return self.model(batch.to(self.device))

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale / self.accumulation).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.clipper.reset()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        _frozen_backbone_eval(self.model)

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        save_tree(directory / OPTIMIZER_FILE, self.optimizer.state_dict())
        write_checkpoint(directory, rank=0, world_size=1, engine="torch", client_state=client_state,
                         rank_state={"micro": self._micro, "files": [OPTIMIZER_FILE]},
                         trained=trained_state(self.model))

    def load(self, directory: Path) -> dict[str, Any]:
        loaded = read_checkpoint(directory, engine="torch", world_size=1, rank=0, shapes=expected_shapes(self.model))
        optim = load_tree(directory / OPTIMIZER_FILE)
        _check_optimizer_state(directory / OPTIMIZER_FILE, optim, self.optimizer)
        micro = loaded.rank_state.get("micro")
        if not isinstance(micro, int) or micro < 0:
            raise CheckpointError(f"{directory / 'rank0.json'}: 'micro' must be a non-negative integer")
        self.model.load_state_dict(loaded.trained, strict=False)
        self.optimizer.load_state_dict(optim)
        self._micro = micro
        set_rng_state(loaded.rank_state["rng"])
        return loaded.client_state

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def deepspeed_config(cfg: EngineSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: parallelism/precision knobs from the JSON, batch sizes from the run config."""
    if world_size != cfg.engine.workers:
        raise ConfigError(f"engine.workers: the config asks for {cfg.engine.workers} workers but "
                          f"{world_size} processes joined")
    ds = read_deepspeed_json(cfg.engine.deepspeed_config)
    accumulation = cfg.accumulation_steps
    # gradient_clipping=0: DeepSpeed would otherwise clip the global gradient norm at 1.0 by default; the
    # paper clips gradient *values* (optim.clip_value / clip_mode, applied by the engine's ValueClipper hooks).
    ds.update(train_micro_batch_size_per_gpu=cfg.optim.micro_batch_size, gradient_accumulation_steps=accumulation,
              train_batch_size=cfg.optim.micro_batch_size * accumulation * world_size, gradient_clipping=0.0)
    return ds


#: DeepSpeed's checkpoint tag (its files go to ``<checkpoint>/ds/``).
DS_TAG = "ds"


def _deepspeed_codecs() -> list[Codec]:
    """The non-JSON objects DeepSpeed 0.19 puts in its checkpoint dicts (closed allow-list)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def scaler(cls: type) -> Codec:
        def decode(state: Any) -> Any:
            if not (isinstance(state, dict) and all(isinstance(v, bool | int | float) for v in state.values())):
                raise ValueError(f"{cls.__name__}: expected a dict of numbers")
            obj = cls.__new__(cls)
            obj.__dict__.update(state)
            return obj

        return Codec(cls, cls.__name__, lambda o: dict(vars(o)), decode)

    return [scaler(LossScaler), scaler(DynamicLossScaler),
            Codec(ZeroStageEnum, "ZeroStageEnum", int, ZeroStageEnum),
            Codec(fragment_address, "fragment_address", lambda a: [a.numel, a.start],
                  lambda v: fragment_address(*map(int, v)))]


def _safe_checkpoint_engine() -> Any:
    """A DeepSpeed checkpoint engine that writes and reads :func:`save_tree` files instead of pickles.

    DeepSpeed keeps its own layout and logic (ZeRO 0–3 partitions, module states); only the file
    format changes. ``written`` lists the files of the last save.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    codecs = _deepspeed_codecs()

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self) -> None:
            super().__init__()
            self.written: list[str] = []

        def save(self, state_dict: Any, path: str) -> None:
            save_tree(Path(path), state_dict, codecs)
            self.written.append(path)

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_tree(Path(path), codecs)

    return SafeCheckpointEngine()


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0–3 engine (gloo on CPU, NCCL on GPU), client torch optimiser (``optim.name``).

    Parameters
    ----------
    model
        The model; its parameters with ``requires_grad`` are optimised.
    cfg
        Run config; ``engine.deepspeed_config`` names the JSON.
    """

    def __init__(self, model: nn.Module, cfg: EngineSettings) -> None:
        import deepspeed

        # Skip the CPU shared-memory comm op: it JIT-compiles C++ for ~50 s and only speeds up inference.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if cfg.engine.on_gpu:  # one process per GPU: LOCAL_RANK (set by Ray Train / the launcher) → cuda:<local rank>
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if cfg.engine.on_gpu else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, self.world_size)
        self.dtype = torch.bfloat16 if ds_cfg.get("bf16", {}).get("enabled") else None
        params = [p for p in model.parameters() if p.requires_grad]
        # a rank's gradient is 1/world of the averaged one: clip it at world × clip_value, so that the
        # averaged gradient is clipped at clip_value (per micro-batch: exactly as on one process)
        clip = None if cfg.optim.clip_value is None else cfg.optim.clip_value * self.world_size
        self.clipper = ValueClipper(params, clip, cfg.optim.clip_mode)
        self.loss_scale = cfg.loss_scale
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(params, cfg), config=ds_cfg)
        self.ds.checkpoint_engine = _safe_checkpoint_engine()
        self.model = self.ds.module
        self.device = self.ds.device
        self._stage3 = self.ds.zero_optimization_stage() == 3

    def forward(self, batch: Batch | MaskedCells) -> torch.Tensor:
        return self.ds(batch.to(self.device, self.dtype)).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.loss_scale)  # DeepSpeed divides by the accumulation steps

    def step(self) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        if boundary:
            self.clipper.reset()

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
        import deepspeed

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self._stage3):  # ZeRO-3: full params on rank 0
            trained = trained_state(self.model) if self.rank == 0 else None
        written = self.ds.checkpoint_engine.written
        written.clear()
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={}, save_latest=False,
                                exclude_frozen_parameters=True)
        files = [Path(f).relative_to(directory).as_posix() for f in written]
        for script in directory.glob("zero_to_*.py"):  # DeepSpeed's consolidation scripts read pickles, not this format
            script.unlink(missing_ok=True)
        write_checkpoint(directory, rank=self.rank, world_size=self.world_size, engine="deepspeed",
                         client_state=client_state, rank_state={"files": files}, trained=trained)

    def load(self, directory: Path) -> dict[str, Any]:
        full = {n: list(p.ds_shape) for n, p in self.model.named_parameters() if hasattr(p, "ds_shape")}
        loaded = read_checkpoint(directory, engine="deepspeed", world_size=self.world_size, rank=self.rank,
                                 shapes=expected_shapes(self.model, full))
        # every file this load reads is a validated save_tree file, read by the safe checkpoint engine
        path, _ = self.ds.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise CheckpointError(f"{directory / DS_TAG}: DeepSpeed found no checkpoint to load")
        set_rng_state(loaded.rank_state["rng"])
        return loaded.client_state

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _torch_engine(model: nn.Module, cfg: EngineSettings) -> Engine:
    return TorchEngine(model, cfg, torch.device("cuda" if cfg.engine.on_gpu else "cpu"))


#: Closed registry: ``engine.name`` → builder ``(model, cfg) -> Engine``.
ENGINES: dict[str, Callable[[nn.Module, EngineSettings], Engine]] = {"torch": _torch_engine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: EngineSettings) -> Engine:
    """The engine named by ``engine.name``."""
    return ENGINES[cfg.engine.name](model, cfg)
