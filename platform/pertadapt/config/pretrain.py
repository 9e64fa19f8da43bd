"""The typed, frozen schema of ``pertadapt pretrain``: self-supervised masked-expression pretraining of an FM.

A pretrain config is YAML like a run config (``base:`` inheritance, dotted ``key=value`` overrides, strict
keys and types, loaded by :func:`load_pretrain_config`). Its ``backbone:`` block is a run config's backbone
block (``config.components.BACKBONE_OPTIONS``: ``tiny``, ``aido_cell``, ``scfoundation``, with random
weights), its ``optim:`` and ``engine:`` sections are the run config's own types (the same engines train
it), and ``data:`` names the cells::

    data: {simulate_preset: demo, simulate_seed: 0, cells: control, heldout_frac: 0.1}
    backbone: {name: tiny, hidden_size: 32, layers: 1, heads: 2}
    objective: {mask_ratio: 0.15, read_depth: full}
    optim: {name: adamw, lr: 0.01, batch_size: 32, micro_batch_size: 32, schedule: cosine}
    steps: 200
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertadapt.config.components import BACKBONE_OPTIONS, BackboneOptions, TinyBackbone
from pertadapt.config.errors import ConfigError
from pertadapt.config.errors import check as _check
from pertadapt.config.errors import check_choice as _choice
from pertadapt.config.load import load_layers
from pertadapt.config.schema import EngineConfig, LoggingConfig, OptimConfig

__all__ = ["PRETRAIN_BACKBONES", "PRETRAIN_CELLS", "RDA_BACKBONES", "READ_DEPTH_OBJECTIVES", "PretrainConfig",
           "PretrainDataConfig", "PretrainObjective", "load_pretrain_config", "pretrain_config_from_dict"]

#: ``data.cells``: which cells of the file are pretrained on (``control``: the unperturbed cells, the default).
PRETRAIN_CELLS = ("control", "all")
#: Backbones ``pertadapt pretrain`` can train: transformer FMs (not ``learned``, which reads no cell values).
PRETRAIN_BACKBONES = tuple(n for n in BACKBONE_OPTIONS.names() if BACKBONE_OPTIONS.options(n).is_foundation_model)
#: ``objective.read_depth``: ``full`` (the input is the cell at its full read depth, the default) or ``rda``
#: (scFoundation's read-depth-aware objective: the input is often a binomially down-sampled copy of the cell).
READ_DEPTH_OBJECTIVES = ("full", "rda")
#: Backbones whose input has a target-depth and a source-depth token of their own (``rda`` needs both).
RDA_BACKBONES = ("scfoundation",)


@dataclass(frozen=True)
class PretrainDataConfig:
    """The cells pretrained on: an ``.h5ad`` (``path``) or a simulator preset, and the held-out share of them."""

    path: str | None = None
    simulate_preset: str = "demo"
    simulate_seed: int = 0
    #: ``control`` (the file's control cells) or ``all``.
    cells: str = "control"
    #: Share of those cells held out of training and scored at the end (at least one cell on each side).
    heldout_frac: float = 0.1
    heldout_seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.cells", self.cells, PRETRAIN_CELLS)
        _check("data.heldout_frac", 0.0 < self.heldout_frac < 1.0, "a fraction in (0, 1)", self.heldout_frac)
        _check("data.heldout_seed", self.heldout_seed >= 0, "a non-negative integer", self.heldout_seed)
        _check("data.simulate_seed", self.simulate_seed >= 0, "a non-negative integer", self.simulate_seed)


@dataclass(frozen=True)
class PretrainObjective:
    """Masked-value regression: a random ``mask_ratio`` of each cell's genes is hidden and predicted (MSE).

    The hidden genes' input values are replaced by the backbone's mask value (``models.pretrain.MASK_VALUES``)
    and the loss is the mean squared error of the value head's predictions on those genes only.

    With ``read_depth: rda`` (scFoundation's read-depth-aware objective) each training cell is, with probability
    ``rda_prob``, replaced in the input by a binomial thinning of its raw counts: a ratio ``γ ~ Beta(rda_alpha,
    rda_beta)`` is drawn for the cell and each gene keeps ``Binomial(count, γ)`` of its counts. The input is the
    thinned cell, log1p-normalised like ``X``; the target stays the cell's own ``X``; the backbone's target-depth
    token carries the cell's raw total and its source-depth token the thinned total (docs/pretraining.md).
    """

    mask_ratio: float = 0.15
    #: Held-out cells scored in the in-silico perturbation edge score (``eval.edges``), at most.
    edge_cells: int = 16
    #: ``full`` or ``rda`` (:data:`READ_DEPTH_OBJECTIVES`; ``rda`` only for :data:`RDA_BACKBONES`).
    read_depth: str = "full"
    #: ``rda``: probability that a training cell is down-sampled (else its input is the cell itself, ``S = T``).
    rda_prob: float = 0.5
    #: ``rda``: the down-sampling ratio of a cell is drawn from ``Beta(rda_alpha, rda_beta)``.
    rda_alpha: float = 1.0
    rda_beta: float = 1.0

    def __post_init__(self) -> None:
        _check("objective.mask_ratio", 0.0 < self.mask_ratio < 1.0, "a fraction in (0, 1)", self.mask_ratio)
        _check("objective.edge_cells", self.edge_cells >= 1, "an integer >= 1", self.edge_cells)
        _choice("objective.read_depth", self.read_depth, READ_DEPTH_OBJECTIVES)
        _check("objective.rda_prob", 0.0 <= self.rda_prob <= 1.0, "a probability in [0, 1]", self.rda_prob)
        for key, value in (("objective.rda_alpha", self.rda_alpha), ("objective.rda_beta", self.rda_beta)):
            _check(key, math.isfinite(value) and value > 0.0, "a finite number > 0 (a Beta shape)", value)


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining: data, backbone, objective, optimiser, engine, steps, checkpointing, seed, logging.

    ``optim.epochs``, ``optim.max_steps_per_epoch``, ``optim.warmup_epochs`` and the ``step`` schedule are not
    used: pretraining counts optimiser steps (``steps``), each over ``optim.batch_size`` cells drawn afresh.
    """

    name: str = "pretrain"
    seed: int = 0
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    backbone: BackboneOptions = field(default_factory=TinyBackbone)
    objective: PretrainObjective = field(default_factory=PretrainObjective)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0,
                                                                    schedule="constant", batch_size=32,
                                                                    micro_batch_size=32, clip_value=None))
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: Optimiser steps.
    steps: int = 300
    #: A resumable checkpoint every this many steps (and at the end).
    checkpoint_every: int = 50
    #: Log the training loss every this many steps.
    log_every: int = 10
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self) -> None:
        _check("name", bool(self.name) and "/" not in self.name and ".." not in self.name,
               "a non-empty name without '/' or '..'", self.name)
        _choice("backbone.name", self.backbone.name, PRETRAIN_BACKBONES)
        _check("steps", self.steps >= 1, "an integer >= 1", self.steps)
        _check("checkpoint_every", self.checkpoint_every >= 1, "an integer >= 1", self.checkpoint_every)
        _check("log_every", self.log_every >= 1, "an integer >= 1", self.log_every)
        _choice("optim.schedule", self.optim.schedule, ("constant", "cosine"))
        if self.objective.read_depth == "rda" and self.backbone.name not in RDA_BACKBONES:
            raise ConfigError(f"objective.read_depth: 'rda' feeds the backbone a target and a source read depth, "
                              f"which only {', '.join(RDA_BACKBONES)} takes (backbone.name is "
                              f"{self.backbone.name!r}); use objective.read_depth=full")
        if getattr(self.backbone, "checkpoint", None) is not None:
            raise ConfigError("backbone.checkpoint: pretraining starts from random weights; remove the checkpoint")
        if getattr(self.backbone, "pretrain", None) is not None:
            raise ConfigError("backbone.pretrain: pretraining starts from random weights; remove it")
        per_step = self.optim.micro_batch_size * self.engine.workers
        if self.optim.batch_size % per_step:
            raise ConfigError(f"optim.batch_size: {self.optim.batch_size} cells per step is not a multiple of "
                              f"optim.micro_batch_size × engine.workers = {self.optim.micro_batch_size} × "
                              f"{self.engine.workers} = {per_step}")
        if self.engine.name == "deepspeed":
            from pertadapt.config.deepspeed import read_deepspeed_json

            read_deepspeed_json(self.engine.deepspeed_config)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each worker (``batch_size / (micro_batch_size × workers)``)."""
        return self.optim.batch_size // (self.optim.micro_batch_size * self.engine.workers)

    @property
    def loss_scale(self) -> float:
        """Factor on the loss before backward (the engines read it): 1."""
        return 1.0


def pretrain_config_from_dict(d: Mapping[str, Any]) -> PretrainConfig:
    """Inverse of ``config_to_dict`` for a :class:`PretrainConfig` (validates again; a Ray Train worker's copy)."""
    return load_layers(PretrainConfig, None, (), extra=d)


def load_pretrain_config(path: str | Path, overrides: Iterable[str] = ()) -> PretrainConfig:
    """Build a validated :class:`PretrainConfig` from a YAML file (``base:`` allowed) and dotted overrides.

    Parameters
    ----------
    path
        Pretrain config YAML, or the name of a shipped one (``pretrain_demo.yaml``).
    overrides
        Dotted ``key=value`` strings applied last, e.g. ``["steps=100", "objective.mask_ratio=0.3"]``.

    Raises
    ------
    ConfigError
        Naming the file and the key path of what is wrong.
    """
    return load_layers(PretrainConfig, path, overrides)
