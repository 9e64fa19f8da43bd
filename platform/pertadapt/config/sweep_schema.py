"""Typed, frozen schemas of the two sweep files: ablations and search spaces.

They are loaded by the same mechanism as run configs (:func:`pertadapt.config.load.load_typed`): strict
YAML, OmegaConf onto these dataclasses (unknown keys and wrong types rejected with their key path),
then the checks in ``__post_init__``. Whether an arm's overrides make valid run configs is checked by
:mod:`pertadapt.sweep.ablation`, which builds every trial's :class:`~pertadapt.config.schema.RunConfig`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from pertadapt.config.errors import ConfigError
from pertadapt.config.metrics import is_metric_name, select_mode

__all__ = ["AblationFile", "DimensionSpec", "SearchSpaceFile", "check_name"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")
#: Factor and level names: no ``+``, ``=`` or ``.``, so that a derived arm name (``fm+pa+mask=random``)
#: names exactly one row of the product.
_FACTOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
DIMENSION_TYPES = ("uniform", "loguniform", "int", "choice")
#: Keys of an ablation's ``resources:`` (the same as ``engine.*`` of a run config).
RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker", "accelerator_type", "placement")


def check_name(where: str, name: object) -> str:
    """A name that becomes part of a path (sweep, arm, dataset, backbone): letters, digits, ``_.+=-``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(f"{where}: {name!r} is not a valid name (letters, digits and _ . + = -, no '..', "
                          "not starting with a dot)")
    return name


def _overrides(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _factor_word(where: str, name: object) -> str:
    """A factor or level name; YAML's ``on``/``off`` (read as booleans) stand for the levels ``on``/``off``."""
    if isinstance(name, bool):
        return "on" if name else "off"
    if isinstance(name, int):
        name = str(name)
    if not isinstance(name, str) or not _FACTOR_NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is not a valid factor or level name (letters, digits, _ and -)")
    return name


def _level_row(where: str, raw: Any, factors: Mapping[str, Mapping[str, Any]], *, complete: bool
               ) -> dict[str, str]:
    """One ``exclude``/``rows`` entry as factor → level, every name checked against ``factors``."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: expected a non-empty mapping of factor → level, got {raw!r}")
    row = {}
    for f, level in raw.items():
        f = _factor_word(where, f)
        if f not in factors:
            raise ConfigError(f"{where}.{f}: unknown factor; factors: {', '.join(factors)}")
        level = _factor_word(f"{where}.{f}", level)
        if level not in factors[f]:
            raise ConfigError(f"{where}.{f}: unknown level {level!r}; levels of {f}: {', '.join(factors[f])}")
        row[f] = level
    missing = [f for f in factors if f not in row]
    if complete and missing:
        raise ConfigError(f"{where}: a row gives a level for every factor; missing: {', '.join(missing)}")
    return {f: row[f] for f in factors if f in row}


def _named(where: str, raw: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {"": {}}
    if not raw:
        raise ConfigError(f"{where}: expected a non-empty mapping of name → overrides")
    return {check_name(f"{where}.{n}", n): _overrides(f"{where}.{n}", o) for n, o in raw.items()}


@dataclass(frozen=True)
class AblationFile:
    """An ablation YAML: arms (named, and/or rows of a factorial design) × seeds × optional datasets × backbones.

    Attributes
    ----------
    name
        Sweep name (W&B groups are ``<name>/<arm>``).
    base
        The run config every trial starts from (relative to the ablation file, then the shipped configs).
    arms
        arm name → dotted overrides (``{}`` = the base as it is).
    factors
        factor → level → dotted overrides. Every row of the product of the levels (or each of ``rows``)
        is an arm named by :func:`pertadapt.sweep.ablation.arm_name`. YAML reads unquoted ``on``/``off``
        (also ``yes``/``no``, ``true``/``false``) as booleans; they are the levels ``on`` and ``off``.
    exclude
        Partial rows (factor → level); every row of the product that matches one of them is dropped.
    rows
        Instead of the whole product: exactly these rows, in this order (each gives every factor's level).
    seeds
        Run seeds (distinct).
    reference_arm
        What paired tests compare to (default: the first arm).
    baselines
        Add the four simple baselines as arms.
    max_concurrent_trials
        Cap on concurrent trials (``None``: as many as the resources hold).
    datasets, backbones
        Optional named override sets crossed with the arms.
    search_space
        Optional search-space YAML (relative to the ablation file, then the shipped ones).
    resources
        Per-trial resources, the keys of :data:`RESOURCE_KEYS` (``engine.<key>`` of every model trial).
    max_failures
        Ray Train restarts per trial after a failure (``engine.max_failures``).
    """

    def engine_overrides(self) -> dict[str, Any]:
        """The dotted ``engine.*`` overrides that ``resources`` and ``max_failures`` stand for."""
        out = {f"engine.{k}": v for k, v in (self.resources or {}).items()}
        if self.max_failures is not None:
            out["engine.max_failures"] = self.max_failures
        return out

    name: str = MISSING
    base: str = MISSING
    arms: dict[str, Any] | None = None
    factors: dict[str, Any] | None = None
    exclude: list[Any] | None = None
    rows: list[Any] | None = None
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [1])
    reference_arm: str | None = None
    baselines: bool = True
    max_concurrent_trials: int | None = None
    datasets: dict[str, Any] | None = None
    backbones: dict[str, Any] | None = None
    search_space: str | None = None
    resources: dict[str, Any] | None = None
    max_failures: int | None = None

    def __post_init__(self) -> None:
        check_name("name", self.name)
        unknown = sorted(set(self.resources or {}) - set(RESOURCE_KEYS))
        if unknown:
            raise ConfigError(f"resources: unknown key(s) {unknown}; valid: {', '.join(RESOURCE_KEYS)}")
        if self.max_failures is not None and self.max_failures < 0:
            raise ConfigError(f"max_failures: expected an integer >= 0, got {self.max_failures}")
        if not self.arms and not self.factors:
            raise ConfigError("arms / factors: expected a non-empty mapping of arm name → overrides under arms:, "
                              "or factors: (factor → level → overrides)")
        if self.arms is not None:
            self.arm_overrides()
        self.factor_rows()
        self.named("datasets")
        self.named("backbones")
        if not self.seeds:
            raise ConfigError("seeds: expected a non-empty list of integers")
        dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if dup:
            raise ConfigError(f"seeds: {dup} listed more than once (two trials would share one run directory)")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials: expected an integer >= 1 or null, got "
                              f"{self.max_concurrent_trials}")

    def arm_overrides(self) -> dict[str, dict[str, Any]]:
        """arm name → dotted overrides of ``arms:``, names checked (empty without ``arms:``)."""
        return _named("arms", self.arms) if self.arms is not None else {}

    def factor_levels(self) -> dict[str, dict[str, dict[str, Any]]]:
        """factor → level → dotted overrides, in file order, names checked (empty without ``factors:``)."""
        if self.factors is None:
            if self.exclude is not None or self.rows is not None:
                raise ConfigError("exclude / rows: select rows of factors:, which this file does not have")
            return {}
        if not self.factors:
            raise ConfigError("factors: expected a non-empty mapping of factor → {level: overrides}")
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for f, levels in self.factors.items():
            name = _factor_word("factors", f)
            if name in out:
                raise ConfigError(f"factors.{name}: listed twice")
            if not isinstance(levels, Mapping) or not levels:
                raise ConfigError(f"factors.{name}: expected a non-empty mapping of level → overrides, got "
                                  f"{levels!r}")
            out[name] = {}
            for level, overrides in levels.items():
                lv = _factor_word(f"factors.{name}", level)
                if lv in out[name]:
                    raise ConfigError(f"factors.{name}.{lv}: listed twice")
                out[name][lv] = _overrides(f"factors.{name}.{lv}", overrides)
        return out

    def factor_rows(self) -> list[dict[str, str]]:
        """The selected rows of the factorial design as factor → level, in order (empty without factors).

        ``rows:`` gives them explicitly; otherwise the product of the levels (factors in file order, the
        last varying fastest) minus every row that matches an ``exclude:`` entry.
        """
        factors = self.factor_levels()
        if not factors:
            return []
        if self.rows is not None and self.exclude is not None:
            raise ConfigError("rows / exclude: rows lists the arms, exclude filters the whole product; use one")
        if self.rows is not None:
            if not self.rows:
                raise ConfigError("rows: expected a non-empty list of rows (factor → level)")
            rows = [_level_row(f"rows[{i}]", r, factors, complete=True) for i, r in enumerate(self.rows)]
            for i, r in enumerate(rows):
                if r in rows[:i]:
                    raise ConfigError(f"rows[{i}]: the same row as rows[{rows.index(r)}]")
            return rows
        drop = [_level_row(f"exclude[{i}]", e, factors, complete=False) for i, e in enumerate(self.exclude or [])]
        product = [dict(zip(factors, levels, strict=True)) for levels in itertools.product(*factors.values())]
        rows = [r for r in product if not any(all(r[f] == lv for f, lv in e.items()) for e in drop)]
        if not rows:
            raise ConfigError(f"exclude: drops every one of the {len(product)} rows of factors:; no arm is left")
        return rows

    def named(self, key: str) -> dict[str, dict[str, Any]]:
        """``datasets`` or ``backbones`` as name → overrides (``{"": {}}`` when absent)."""
        return _named(key, getattr(self, key))


@dataclass(frozen=True)
class DimensionSpec:
    """One sampled hyperparameter of a search space.

    Attributes
    ----------
    type
        ``uniform``, ``loguniform``, ``int`` or ``choice``.
    low, high
        Bounds (numbers; integers for ``int``).
    values
        Options of a ``choice``.
    """

    type: str = MISSING
    low: Any = None
    high: Any = None
    values: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in DIMENSION_TYPES:
            raise ConfigError(f"type: {self.type!r} is not one of {', '.join(DIMENSION_TYPES)}")
        if self.type == "choice":
            if not self.values:
                raise ConfigError("values: a choice needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ConfigError("low/high: a choice takes values, not bounds")
            return
        if self.values is not None:
            raise ConfigError(f"values: a {self.type} dimension takes low/high, not values")
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.low, self.high))
        if not numeric or not self.low < self.high:
            raise ConfigError(f"low/high: expected numbers with low < high, got low={self.low!r}, high={self.high!r}")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high)):
            raise ConfigError(f"low/high: an int dimension needs integer bounds, got {self.low!r}, {self.high!r}")
        if self.type == "loguniform" and self.low <= 0:
            raise ConfigError(f"low: loguniform needs low > 0, got {self.low}")


@dataclass(frozen=True)
class SearchSpaceFile:
    """A search-space YAML: the dimensions Optuna samples (ablation arms are never sampled).

    Attributes
    ----------
    params
        dotted config key → :class:`DimensionSpec`.
    metric, mode
        What the search optimises (a validation metric the training loop reports) and how (``min``,
        ``max``; ``null``: from the metric's direction).
    num_samples
        Optuna samples per arm.
    sampler_seed
        TPE sampler seed.
    scheduler
        ``none`` or ``asha`` (``grace_period``, ``reduction_factor``, ``max_t`` in epochs).
    storage
        ``sqlite`` or ``journal`` (both persist in the sweep directory), or an SQLAlchemy database URL
        (``postgresql://user@host/db``, ``mysql+pymysql://...``, ``sqlite:////shared/optuna.db``) for a study
        kept outside it.
    """

    params: dict[str, DimensionSpec] = MISSING
    description: str = ""
    metric: str = "val_mse_de"
    mode: str | None = None
    num_samples: int = 4
    sampler_seed: int = 0
    scheduler: str = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None
    storage: str = "sqlite"

    def __post_init__(self) -> None:
        if not self.params:
            raise ConfigError("params: expected a non-empty mapping of dotted config keys to dimensions")
        if not is_metric_name(self.metric, "val"):
            raise ConfigError(f"metric: {self.metric!r} is not a validation metric (val_<metric> or "
                              "val_<subgroup>_<metric>, e.g. val_mse_de)")
        if self.mode is None:
            object.__setattr__(self, "mode", select_mode(self.metric))
        for key, choices in (("mode", ("min", "max")), ("scheduler", ("none", "asha"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(choices)}")
        if self.storage not in ("sqlite", "journal") and not re.match(r"^[a-z][a-z0-9+]*://", self.storage):
            raise ConfigError(f"storage: {self.storage!r} is not sqlite, journal or a database URL "
                              "(e.g. postgresql://user@host/optuna)")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: expected an integer >= 1, got {self.num_samples}")
        if self.grace_period < 1 or self.reduction_factor <= 1 or (self.max_t is not None and self.max_t < 1):
            raise ConfigError("grace_period / reduction_factor / max_t: expected grace_period >= 1, "
                              "reduction_factor > 1 and max_t >= 1 (epochs)")
