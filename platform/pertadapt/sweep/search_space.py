"""Search-space YAML → a validated description of the dimensions Optuna samples.

A search-space file::

    metric: val_mse_de            # a metric the training loop reports
    mode: min
    num_samples: 8                # Optuna samples per arm
    sampler_seed: 0
    scheduler: asha               # or none
    storage: sqlite               # or journal (both persist in the sweep dir)
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

from pertadapt.config.load import dotted_to_nested, load_run_config, read_yaml
from pertadapt.config.schema import ConfigError

__all__ = ["Dimension", "SearchSpace", "load_search_space"]

_TYPES = ("uniform", "loguniform", "int", "choice")
_TOP = {"metric", "mode", "num_samples", "sampler_seed", "scheduler", "storage", "params", "description"}


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
    """A parsed search space."""

    path: Path
    metric: str
    mode: str
    num_samples: int
    sampler_seed: int
    scheduler: str
    storage: str
    dims: tuple[Dimension, ...]


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    where = f"{path}: params.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        raise ConfigError(f"{where}: expected a mapping with type one of {', '.join(_TYPES)}, got {spec!r}")
    kind = spec["type"]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values: expected a non-empty list")
        dim = Dimension(key, kind, values=tuple(values))
        samples = values
    else:
        low, high = spec.get("low"), spec.get("high")
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
            raise ConfigError(f"{where}: expected numeric low < high, got low={low!r}, high={high!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.low: loguniform needs low > 0, got {low}")
        dim = Dimension(key, kind, float(low), float(high))
        samples = [int(low), int(high)] if kind == "int" else [low, high]
    for v in samples:
        try:
            load_run_config(None, extra=dotted_to_nested({key: v}))
        except ConfigError as e:
            raise ConfigError(f"{where}: value {v!r} is not valid: {e}") from e
    return dim


def load_search_space(path: str | Path) -> SearchSpace:
    """Parse and validate a search-space YAML."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(_TOP)}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: params: expected a non-empty mapping of dotted keys to dimensions")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"{path}: mode: expected min or max, got {mode!r}")
    scheduler = raw.get("scheduler", "none")
    if scheduler not in ("none", "asha"):
        raise ConfigError(f"{path}: scheduler: expected none or asha, got {scheduler!r}")
    storage = raw.get("storage", "sqlite")
    if storage not in ("sqlite", "journal"):
        raise ConfigError(f"{path}: storage: expected sqlite or journal, got {storage!r}")
    n = raw.get("num_samples", 4)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{path}: num_samples: expected an integer >= 1, got {n!r}")
    dims = tuple(_dimension(path, str(k), v) for k, v in params.items())
    return SearchSpace(path, str(raw.get("metric", "val_mse_de")), mode, n, int(raw.get("sampler_seed", 0)),
                       scheduler, storage, dims)
