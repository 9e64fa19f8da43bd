"""Ablation YAML → validated trials (datasets × backbones × arms × seeds, plus the baselines).

An ablation file::

    name: fm_pa
    base: ../configs/demo.yaml      # a run config (relative to this file, then the shipped configs)
    seeds: [1, 2]
    reference_arm: fm+pa            # paired tests are made against it (default: the first arm)
    baselines: true                 # add baseline_nochange/mean/additive/linear arms (default true)
    max_concurrent_trials: 2
    datasets: {sim: {}}             # optional named override sets (default: one, unnamed)
    backbones: {tiny: {}}           # optional named override sets
    factors:                        # a factorial design: factor → level → dotted overrides
      fm: {on: {}, off: {backbone.name: learned}}
      pa: {on: {}, off: {adapter.enabled: false}}
    exclude: [{fm: off, pa: on}]    # drop the product's rows that match (or rows: [...] to list them)
    arms:                           # named arms, next to (or instead of) the factorial ones
      pa_sum: {adapter.enabled: false, adapter.off_mode: sum}

Arms of ``factors:`` come first, in product order (the last factor varying fastest) or in the order of
``rows:``; then ``arms:``; then the baselines. A factorial arm is named by :func:`arm_name`, and its
overrides are the union of its levels' (two levels setting one key to different values is an error).

A config file named in an override (``backbone.pretrain``, :data:`~pertadapt.config.load.PATH_KEYS`) is found
relative to the ablation file, then among the shipped configs; one typed on the command line, relative to the
working directory.

Every arm × seed × dataset × backbone is turned into a :class:`RunConfig` here, so a bad key fails
before any cluster starts. Overrides from the command line apply to every trial (after the arm's), or,
spelled ``datasets.<name>.<key>=value`` / ``backbones.<name>.<key>=value``, to one named set as if
written there (so an arm still overrides them: an FM-off arm, ``backbone.name: learned``, drops a
backbone set's other ``backbone.*`` keys, as a component switch does; :func:`pertadapt.config.load.merge_dotted`).

Trials whose configs have the same identity (:func:`~pertadapt.config.load.config_hash`: labels and unused
sections left out), e.g. an FM-off arm under two backbone sets, run once: :func:`shared_runs`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertadapt.config.components import MODEL_OPTIONS
from pertadapt.config.load import (
    dotted_to_nested,
    load_run_config,
    load_typed,
    merge_dotted,
    read_yaml,
    resolve_config_path,
    resolve_path_keys,
)
from pertadapt.config.schema import BASELINE_MODELS, ConfigError, RunConfig
from pertadapt.config.sweep_schema import AblationFile

__all__ = ["BASELINE_ARMS", "SCOPED_SETS", "Ablation", "Trial", "arm_name", "load_ablation", "run_of", "shared_runs"]

#: The simple baselines that sit in every grid unless ``baselines: false``.
BASELINE_ARMS: dict[str, dict[str, Any]] = {name: {"model.name": name} for name in BASELINE_MODELS}
#: Named override sets of an ablation that a command-line override can address (``backbones.<name>.<key>``).
SCOPED_SETS = ("datasets", "backbones")


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
    levels
        factor → level of a factorial arm (empty for a named arm or a baseline).
    """

    key: str
    arm: str
    seed: int
    dataset: str
    backbone: str
    overrides: dict[str, Any]
    config: RunConfig
    levels: dict[str, str] = field(default_factory=dict)

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
    #: factor → its levels, in file order (empty without ``factors:``).
    factors: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def toggles(self, trial: Trial) -> list[str]:
        """What sets ``trial`` apart from the reference arm (same dataset, backbone, seed), as ``name=value``.

        Factor levels when both are factorial arms (``pa=off``), otherwise the dotted overrides that
        differ (``adapter.off_mode=sum``, ``model.name=baseline_mean``), those of sections ``trial`` does not
        use left out (a baseline's ``backbone.*``); empty for the reference arm itself.
        """
        ref = next((t for t in self.trials if t.arm == self.reference_arm and t.seed == trial.seed
                    and t.dataset == trial.dataset and t.backbone == trial.backbone), None)
        if ref is None or ref.key == trial.key:
            return []
        if trial.levels and ref.levels:
            return [f"{f}={lvl}" for f, lvl in trial.levels.items() if ref.levels.get(f) != lvl]
        unused = set(trial.config.unused_sections)  # a baseline's backbone, loss, ... set nothing apart
        keys = sorted(k for k in (set(trial.overrides) | set(ref.overrides)) - {"logging.group", "name"}
                      if k.partition(".")[0] not in unused)
        return [f"{k}={trial.overrides.get(k, '(base)')}" for k in keys
                if trial.overrides.get(k) != ref.overrides.get(k)]


def arm_name(levels: Mapping[str, str]) -> str:
    """The name of a factorial arm: its factors' parts joined by ``+`` in the order of ``factors:``.

    A factor at level ``on`` contributes its name, at ``off`` nothing, at any other level
    ``<factor>=<level>``; a row with no part is ``none``. E.g. ``{fm: on, pa: on, am: random, ladapt: off}``
    → ``fm+pa+am=random``. Factor and level names hold no ``+``, ``=`` or ``.``, so distinct rows get
    distinct names.

    Parameters
    ----------
    levels
        factor → level, in the order the factors are declared.
    """
    parts = [f if lv == "on" else f"{f}={lv}" for f, lv in levels.items() if lv != "off"]
    return "+".join(parts) or "none"


def shared_runs(identities: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Trials with the same identity run once: run key → the keys of every trial it stands for.

    The run of an identity is its first trial in plan order (deterministic, so a resumed sweep finds the
    runs it started); the keys of the others follow it in plan order.

    Parameters
    ----------
    identities
        (trial key, :func:`~pertadapt.config.load.config_hash` of the config it runs, data path in), in
        plan order.

    Returns
    -------
    dict
        run key → [run key, alias keys...], runs in plan order.
    """
    first: dict[str, str] = {}
    runs: dict[str, list[str]] = {}
    for key, identity in identities:
        runs.setdefault(first.setdefault(identity, key), []).append(key)
    return runs


def run_of(identities: Iterable[tuple[str, str]]) -> dict[str, str]:
    """trial key → the key of the run that gives its results (:func:`shared_runs`; its own key when first)."""
    return {key: run for run, keys in shared_runs(identities).items() for key in keys}


def _row_overrides(factors: Mapping[str, Mapping[str, Mapping[str, Any]]], row: Mapping[str, str]
                   ) -> dict[str, Any]:
    """Union of a row's level overrides; two levels that set one key to different values are an error."""
    out: dict[str, Any] = {}
    setter: dict[str, str] = {}
    for f, lv in row.items():
        for k, v in factors[f][lv].items():
            if k in out and out[k] != v:
                raise ConfigError(f"factors.{setter[k]} and factors.{f}.{lv} set {k} to {out[k]!r} and "
                                  f"{v!r} in arm '{arm_name(row)}'; the factors must not overlap")
            out[k], setter[k] = v, f"{f}.{lv}"
    return out


def _arms(spec: AblationFile) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """arm → overrides (factorial arms, then ``arms:``) and factorial arm → its levels."""
    factors = spec.factor_levels()
    arms: dict[str, dict[str, Any]] = {}
    levels: dict[str, dict[str, str]] = {}
    for row in spec.factor_rows():
        name = arm_name(row)
        arms[name], levels[name] = _row_overrides(factors, row), row
    for name, overrides in spec.arm_overrides().items():
        if name in arms:
            shown = ", ".join(f"{f}: {lv}" for f, lv in levels[name].items())
            raise ConfigError(f"arms.{name}: the name of an arm of factors: too (the row {{{shown}}}); rename "
                              "one of them")
        arms[name] = overrides
    return arms, levels


def _split_scoped(spec: AblationFile, extra: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
    """Split command-line overrides into those for every trial and those for one named set."""
    plain: dict[str, Any] = {}
    scoped: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in SCOPED_SETS}
    for key, value in extra.items():
        kind, _, rest = str(key).partition(".")
        if kind not in SCOPED_SETS:
            plain[key] = value
            continue
        name, _, inner = rest.partition(".")
        names = [n for n in spec.named(kind) if n]
        if name not in names or not inner:
            valid = ", ".join(names) or f"none: the file has no {kind}:"
            raise ConfigError(f"override '{key}': expected {kind}.<name>.<config key>=value with <name> one of "
                              f"the file's {kind} ({valid})")
        scoped[kind].setdefault(name, {})[inner] = value
    return plain, scoped


def _for_baseline(name: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The command-line overrides a baseline arm takes: a ``model.<key>`` its model block does not have (a knob of
    the PertAdapt network, e.g. ``model.head_init``) is meant for the model arms and left out."""
    own = set(MODEL_OPTIONS.keys(name))
    return {k: v for k, v in extra.items()
            if not (str(k).startswith("model.") and str(k).removeprefix("model.") not in own)}


def load_ablation(path: str | Path, *, extra_overrides: Mapping[str, Any] | None = None) -> Ablation:
    """Parse and validate an ablation file; every trial's config is built.

    Parameters
    ----------
    path
        The ablation YAML.
    extra_overrides
        Dotted overrides applied to every trial (e.g. from the command line); a key
        ``datasets.<name>.<key>`` or ``backbones.<name>.<key>`` goes into that named set instead, and a
        ``model.<key>`` that a baseline's model block does not have skips that baseline's arm.
    """
    path = resolve_config_path(path, kind="ablations")
    spec = load_typed(AblationFile, str(path), read_yaml(path))
    base = resolve_config_path(spec.base, path)
    try:
        arms, levels = _arms(spec)
        extra, scoped = _split_scoped(spec, extra_overrides or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if spec.baselines:
        for name, o in BASELINE_ARMS.items():
            arms.setdefault(name, o)
    reference = spec.reference_arm or next(iter(arms))
    if reference not in arms:
        raise ConfigError(f"{path}: reference_arm: {reference!r} is not an arm ({', '.join(arms)})")
    try:  # files named in the ablation (backbone.pretrain) are found relative to it, those typed from the shell
        arms = {name: resolve_path_keys(o, path) for name, o in arms.items()}
        sets = {kind: {n: {**resolve_path_keys(o, path), **scoped[kind].get(n, {})} for n, o in spec.named(kind).items()}
                for kind in SCOPED_SETS}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    trials = []
    for (ds, ds_o), (bb, bb_o), (arm, arm_o) in itertools.product(
            sets["datasets"].items(), sets["backbones"].items(), arms.items()):
        engine = spec.engine_overrides() if arm not in BASELINE_ARMS else {}
        own = _for_baseline(arm, extra) if arm in BASELINE_ARMS else extra
        shared = {**merge_dotted(ds_o, bb_o, engine, arm_o, own), "logging.group": f"{spec.name}/{arm}"}
        first = spec.seeds[0]
        try:
            cfg = load_run_config(base, extra=dotted_to_nested(
                {**shared, "seed": first, "name": f"{arm}-seed{first}"}))
        except ConfigError as e:
            raise ConfigError(f"{path}: arm '{arm}' (dataset '{ds}', backbone '{bb}', seed {first}): {e}") from e
        for seed in spec.seeds:
            # seed and name are set last and nothing else derives from them: the other seeds' configs
            # are the first one's with these two fields replaced (validated again), not parsed again
            overrides = {**shared, "seed": seed, "name": f"{arm}-seed{seed}"}
            key = "/".join(p for p in (ds, bb, arm, f"seed{seed}") if p)
            trials.append(Trial(key, arm, seed, ds, bb, overrides,
                                dataclasses.replace(cfg, seed=seed, name=overrides["name"]),
                                dict(levels.get(arm, {}))))
    return Ablation(name=spec.name, path=path, base=base, seeds=tuple(spec.seeds), reference_arm=reference,
                    max_concurrent_trials=spec.max_concurrent_trials, trials=tuple(trials),
                    search_space=(resolve_config_path(spec.search_space, path, kind="search_spaces")
                                  if spec.search_space else None), arms=tuple(arms),
                    factors={f: tuple(lv) for f, lv in spec.factor_levels().items()})
