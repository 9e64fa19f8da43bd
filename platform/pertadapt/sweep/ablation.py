"""Ablation YAML → validated trials (datasets × backbones × arms × seeds, plus the baselines).

An ablation file::

    name: paper_toggles
    base: demo.yaml                 # a run config (path or name in configs/)
    seeds: [1, 2]
    reference_arm: full             # paired tests are made against it
    baselines: true                 # add baseline_nochange/mean/additive/linear arms (default true)
    max_concurrent_trials: 2
    datasets: {sim: {}}             # optional named override sets (default: one, unnamed)
    backbones: {tiny: {}}           # optional named override sets
    arms:
      full: {}
      no_fm: {backbone.name: learned}
      no_pa: {adapter.enabled: false}

Every arm × seed × dataset × backbone is turned into a :class:`RunConfig` here, so a bad key fails
before any cluster starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertadapt.config.load import dotted_to_nested, load_run_config, read_yaml, resolve_config_path
from pertadapt.config.schema import ConfigError, RunConfig

__all__ = ["BASELINE_ARMS", "Ablation", "Trial", "load_ablation"]

#: The simple baselines that sit in every grid unless ``baselines: false``.
BASELINE_ARMS: dict[str, dict[str, Any]] = {
    name: {"model.name": name}
    for name in ("baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear")
}
_TOP_KEYS = {"name", "base", "seeds", "reference_arm", "baselines", "max_concurrent_trials", "datasets",
             "backbones", "arms", "search_space", "description"}


@dataclass(frozen=True)
class Trial:
    """One cell of the grid.

    Attributes
    ----------
    key
        Stable identifier, ``<dataset>/<backbone>/<arm>/seed<k>`` (empty parts dropped).
    arm, seed, dataset, backbone
        Grid coordinates.
    overrides
        Dotted overrides applied on top of the base config (what makes this trial).
    config
        The validated run config.
    """

    key: str
    arm: str
    seed: int
    dataset: str
    backbone: str
    overrides: dict[str, Any]
    config: RunConfig

    @property
    def is_baseline(self) -> bool:
        """Whether the arm is one of the simple baselines."""
        return self.config.model.name != "pertadapt"


@dataclass(frozen=True)
class Ablation:
    """A parsed ablation file."""

    name: str
    path: Path
    base: Path
    seeds: tuple[int, ...]
    reference_arm: str
    max_concurrent_trials: int
    trials: tuple[Trial, ...]
    search_space: Path | None = None
    arms: tuple[str, ...] = field(default=())


def _dotted(path: Path, where: str, overrides: Any) -> dict[str, Any]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{path}: {where}: expected a mapping of dotted keys to values, got {overrides!r}")
    return {str(k): v for k, v in overrides.items()}


def _named(path: Path, key: str, raw: Any) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {"": {}}
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{path}: {key}: expected a non-empty mapping of name → overrides")
    return {str(n): _dotted(path, f"{key}.{n}", o) for n, o in raw.items()}


def load_ablation(path: str | Path, *, extra_overrides: Mapping[str, Any] | None = None) -> Ablation:
    """Parse and validate an ablation file; every trial's config is built.

    Parameters
    ----------
    path
        The ablation YAML.
    extra_overrides
        Dotted overrides applied to every trial (e.g. from the command line).
    """
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    for req in ("name", "base", "arms"):
        if req not in raw:
            raise ConfigError(f"{path}: missing required key '{req}'")
    base = resolve_config_path(raw["base"])
    seeds = raw.get("seeds", [1])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers, got {seeds!r}")
    arms = _named(path, "arms", raw["arms"])
    if raw.get("baselines", True):
        for name, o in BASELINE_ARMS.items():
            arms.setdefault(name, o)
    reference = raw.get("reference_arm", next(iter(arms)))
    if reference not in arms:
        raise ConfigError(f"{path}: reference_arm: {reference!r} is not an arm ({', '.join(arms)})")
    datasets, backbones = _named(path, "datasets", raw.get("datasets")), _named(path, "backbones", raw.get("backbones"))
    extra = dict(extra_overrides or {})
    trials = []
    for (ds, ds_o), (bb, bb_o), (arm, arm_o), seed in itertools.product(
            datasets.items(), backbones.items(), arms.items(), seeds):
        overrides = {**ds_o, **bb_o, **arm_o, **extra, "seed": seed, "name": f"{arm}-seed{seed}",
                     "logging.group": f"{raw['name']}/{arm}"}
        try:
            cfg = load_run_config(base, extra=dotted_to_nested(overrides))
        except ConfigError as e:
            raise ConfigError(f"{path}: arm '{arm}' (dataset '{ds}', backbone '{bb}', seed {seed}): {e}") from e
        key = "/".join(p for p in (ds, bb, arm, f"seed{seed}") if p)
        trials.append(Trial(key, arm, seed, ds, bb, overrides, cfg))
    sp = raw.get("search_space")
    return Ablation(name=str(raw["name"]), path=path, base=base, seeds=tuple(seeds), reference_arm=reference,
                    max_concurrent_trials=int(raw.get("max_concurrent_trials", 2)), trials=tuple(trials),
                    search_space=resolve_config_path(sp, path) if sp else None, arms=tuple(arms))
