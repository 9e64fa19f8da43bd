"""Ablation YAML → validated trials (datasets × backbones × arms × seeds, plus the baselines).

An ablation file::

    name: paper_toggles
    base: ../configs/demo.yaml      # a run config (relative to this file, then the shipped configs)
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

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertadapt.config.load import (
    dotted_to_nested,
    load_run_config,
    load_typed,
    read_yaml,
    resolve_config_path,
)
from pertadapt.config.schema import BASELINE_MODELS, ConfigError, RunConfig
from pertadapt.config.sweep_schema import AblationFile

__all__ = ["BASELINE_ARMS", "Ablation", "Trial", "load_ablation"]

#: The simple baselines that sit in every grid unless ``baselines: false``.
BASELINE_ARMS: dict[str, dict[str, Any]] = {name: {"model.name": name} for name in BASELINE_MODELS}


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
        return self.config.is_baseline

    def run_config(self, data_path: str) -> RunConfig:
        """The config the trial runs: its own, reading ``data_path`` (the resolved or simulated file)."""
        return dataclasses.replace(self.config, data=dataclasses.replace(self.config.data, path=data_path))


@dataclass(frozen=True)
class Ablation:
    """A parsed ablation file."""

    name: str
    path: Path
    base: Path
    seeds: tuple[int, ...]
    reference_arm: str
    max_concurrent_trials: int | None
    trials: tuple[Trial, ...]
    search_space: Path | None = None
    arms: tuple[str, ...] = field(default=())


def load_ablation(path: str | Path, *, extra_overrides: Mapping[str, Any] | None = None) -> Ablation:
    """Parse and validate an ablation file; every trial's config is built.

    Parameters
    ----------
    path
        The ablation YAML.
    extra_overrides
        Dotted overrides applied to every trial (e.g. from the command line).
    """
    path = resolve_config_path(path, kind="ablations")
    spec = load_typed(AblationFile, str(path), read_yaml(path))
    base = resolve_config_path(spec.base, path)
    arms = spec.arm_overrides()
    if spec.baselines:
        for name, o in BASELINE_ARMS.items():
            arms.setdefault(name, o)
    reference = spec.reference_arm or next(iter(arms))
    if reference not in arms:
        raise ConfigError(f"{path}: reference_arm: {reference!r} is not an arm ({', '.join(arms)})")
    extra = dict(extra_overrides or {})
    trials = []
    for (ds, ds_o), (bb, bb_o), (arm, arm_o), seed in itertools.product(
            spec.named("datasets").items(), spec.named("backbones").items(), arms.items(), spec.seeds):
        engine = spec.engine_overrides() if arm not in BASELINE_ARMS else {}
        overrides = {**ds_o, **bb_o, **engine, **arm_o, **extra, "seed": seed, "name": f"{arm}-seed{seed}",
                     "logging.group": f"{spec.name}/{arm}"}
        try:
            cfg = load_run_config(base, extra=dotted_to_nested(overrides))
        except ConfigError as e:
            raise ConfigError(f"{path}: arm '{arm}' (dataset '{ds}', backbone '{bb}', seed {seed}): {e}") from e
        key = "/".join(p for p in (ds, bb, arm, f"seed{seed}") if p)
        trials.append(Trial(key, arm, seed, ds, bb, overrides, cfg))
    return Ablation(name=spec.name, path=path, base=base, seeds=tuple(spec.seeds), reference_arm=reference,
                    max_concurrent_trials=spec.max_concurrent_trials, trials=tuple(trials),
                    search_space=(resolve_config_path(spec.search_space, path, kind="search_spaces")
                                  if spec.search_space else None), arms=tuple(arms))
