"""Search-space YAML → a validated description of the dimensions Optuna samples.

A search-space file::

    metric: val_mse_de            # a metric the training loop reports
    mode: min
    num_samples: 8                # Optuna samples per arm
    sampler_seed: 0
    scheduler: asha               # or none
    storage: sqlite               # or journal (both persist in the sweep dir), or a database URL
    params:
      optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}
      adapter.heads: {type: choice, values: [2, 4, 8]}
      optim.micro_batch_size: {type: int, low: 2, high: 8}

Keys must be real schema paths; each dimension's bounds are checked by building a run config.
Ablation arms are enumerated elsewhere, never sampled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertadapt.config.components import COMPONENTS
from pertadapt.config.load import (
    dotted_to_nested,
    load_run_config,
    load_typed,
    read_yaml,
    resolve_config_path,
)
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.config.sweep_schema import SearchSpaceFile

__all__ = ["Dimension", "SearchSpace", "load_search_space"]


@dataclass(frozen=True)
class Dimension:
    """One sampled hyperparameter: ``key`` (dotted schema path), ``kind`` and its bounds or values."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A parsed search space (see :class:`~pertadapt.config.sweep_schema.SearchSpaceFile`)."""

    path: Path
    metric: str
    mode: str
    num_samples: int
    sampler_seed: int
    scheduler: str
    storage: str
    dims: tuple[Dimension, ...]
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    where = f"{path}: params.{key}"
    if spec.type == "choice":
        dim, samples = Dimension(key, spec.type, values=tuple(spec.values)), list(spec.values)
    else:
        dim, samples = Dimension(key, spec.type, float(spec.low), float(spec.high)), [spec.low, spec.high]
    section, _, option = key.partition(".")
    owners = [n for n in COMPONENTS[section].names() if option in COMPONENTS[section].keys(n)] if (
        section in COMPONENTS and option != "name") else []
    # a component's option (loss.gamma) is checked on a component that has it (the arm decides which one runs)
    context = {f"{section}.name": owners[0]} if owners and option not in COMPONENTS[section].keys(
        getattr(RunConfig(), section).name) else {}
    for v in samples:
        try:
            load_run_config(None, extra=dotted_to_nested({**context, key: v}))
        except ConfigError as e:
            raise ConfigError(f"{where}: value {v!r} is not valid: {e}") from e
    return dim


def load_search_space(path: str | Path) -> SearchSpace:
    """Parse and validate a search-space YAML (keys must be real config paths, every bound a valid value)."""
    path = resolve_config_path(path, kind="search_spaces")
    spec = load_typed(SearchSpaceFile, str(path), read_yaml(path))
    dims = tuple(_dimension(path, str(k), v) for k, v in spec.params.items())
    return SearchSpace(path, spec.metric, spec.mode, spec.num_samples, spec.sampler_seed, spec.scheduler,
                       spec.storage, dims, spec.grace_period, spec.reduction_factor, spec.max_t)
