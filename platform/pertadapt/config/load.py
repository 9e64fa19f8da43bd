"""YAML → :class:`RunConfig`: ``base:`` inheritance, dotted ``key=value`` overrides, strict validation.

OmegaConf only merges; the schema (frozen dataclasses) decides what is valid. Every failure is a
:class:`~pertadapt.config.schema.ConfigError` whose message names the file and the key path.
No heavy framework is imported here, so bad configs fail in well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pertadapt.config.schema import ConfigError, RunConfig

__all__ = [
    "config_hash",
    "config_to_dict",
    "dotted_to_nested",
    "config_from_dict",
    "load_run_config",
    "read_yaml",
    "resolve_config_path",
]

BASE_KEY = "base"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file.

    Parameters
    ----------
    path
        A ``.yaml``/``.yml``/``.json`` file.

    Returns
    -------
    dict
        The parsed mapping (``{}`` for an empty file).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_config_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config file given as a path, a path relative to another file, or a bare name in ``configs/``."""
    ref = Path(ref)
    candidates = [ref]
    if relative_to is not None:
        candidates.append(relative_to.parent / ref)
    repo = Path(__file__).resolve().parents[3]  # the checkout, for editable installs run elsewhere
    candidates += [Path("configs") / ref, repo / ref, repo / "configs" / ref]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{ref}: config file not found (looked in {', '.join(str(c) for c in candidates)})")


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain ({' -> '.join(str(s) for s in seen)})")
    raw = read_yaml(path)
    base = raw.pop(BASE_KEY, None)
    merged = OmegaConf.create()
    if base is not None:
        merged = _load_with_bases(resolve_config_path(base, path), (*seen, path))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def _validate(source: str, *layers: Mapping[str, Any] | DictConfig) -> RunConfig:
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from e
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    assert isinstance(obj, RunConfig)
    return obj


def _overrides_to_conf(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. optim.lr=0.001)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {e}") from e


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                    extra: Mapping[str, Any] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a YAML file, a mapping and command-line overrides.

    Parameters
    ----------
    path
        Run config YAML (may contain ``base: other.yaml``); ``None`` starts from the schema defaults.
    overrides
        Dotted ``key=value`` strings applied last, e.g. ``["optim.lr=0.001", "adapter.enabled=false"]``.
    extra
        A nested mapping applied between the file and the overrides (an ablation arm, a search sample).

    Returns
    -------
    RunConfig
        The frozen, validated config.
    """
    layers: list[Any] = []
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        layers.append(_load_with_bases(p))
    if extra:
        layers.append(OmegaConf.create(dict(extra)))
    overrides = list(overrides)
    if overrides:
        layers.append(_overrides_to_conf(overrides))
        source += f" + overrides {overrides}"
    return _validate(source, *layers)


def dotted_to_nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` → ``{"optim": {"lr": 0.1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"key '{key}': '{part}' is both a value and a section")
        node[leaf] = value
    return out


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe) of a config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Inverse of :func:`config_to_dict` (validates again)."""
    return _validate("<dict>", OmegaConf.create(dict(d)))


def config_hash(cfg: RunConfig) -> str:
    """Short stable hash of the resolved config."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
