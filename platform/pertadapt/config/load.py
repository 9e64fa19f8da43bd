"""YAML → typed, frozen configs: ``base:`` inheritance, dotted ``key=value`` overrides, strict validation.

One mechanism for every file a user writes (run configs, ablations, search spaces): the YAML is read
strictly (duplicate keys, binary content and non-mappings are errors), merged by OmegaConf onto the
frozen dataclass schema (unknown keys and wrong types rejected with their key path) and turned into
the dataclass, whose ``__post_init__`` runs the cross-field checks. Every failure is a
:class:`~pertadapt.config.schema.ConfigError` naming the file and the key path. No heavy framework
is imported here, so a bad config fails in milliseconds.

``base:`` references are resolved relative to the file that contains them first, then among the
configs shipped with the package; a path typed on the command line is taken as given (relative to
the working directory), then among the shipped files. The run-config keys that name a config file
(:data:`PATH_KEYS`, e.g. ``backbone.pretrain``) are found the same way and stored as absolute paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, flag_override
from omegaconf.errors import OmegaConfBaseException

from pertadapt.config.components import COMPONENTS
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.files import package_data

__all__ = [
    "PATH_KEYS",
    "SHIPPED_DIRS",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "dotted_to_nested",
    "load_layers",
    "load_run_config",
    "load_typed",
    "merge_dotted",
    "parse_overrides",
    "read_yaml",
    "resolve_config_path",
    "resolve_path_keys",
]

BASE_KEY = "base"
#: Folders of ``pertadapt/resources`` that hold user-facing files (also linked at the repository root).
SHIPPED_DIRS = ("configs", "ablations", "search_spaces", "deepspeed")
#: Dotted run-config keys whose value names a config file (found as ``base:`` is, stored absolute).
PATH_KEYS = ("backbone.pretrain",)
T = TypeVar("T")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML would silently keep the last one)."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping strictly, with errors that name the file.

    Parameters
    ----------
    path
        A ``.yaml``/``.yml``/``.json`` file.

    Returns
    -------
    dict
        The parsed mapping.

    Raises
    ------
    ConfigError
        Missing file, a directory, binary or non-UTF-8 content, invalid YAML, a duplicate key, an empty
        file, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found" if not p.exists() else f"{p}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (invalid UTF-8 at byte {e.start}); expected YAML") from e
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (contains NUL bytes); expected YAML")
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"{p}: the file is empty; expected a mapping of settings (an empty run config "
                          "would silently train the full defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _shipped(ref: Path, kind: str) -> Path | None:
    parts = ref.parts
    if not parts or ref.is_absolute() or ".." in parts:
        return None
    node = package_data(*parts) if parts[0] in SHIPPED_DIRS else package_data(kind, *parts)
    return Path(str(node)) if node.is_file() else None


def resolve_config_path(ref: str | Path, relative_to: Path | None = None, *, kind: str = "configs") -> Path:
    """Find a file named in a config or on the command line.

    Parameters
    ----------
    ref
        A path or a bare name (``paper.yaml``).
    relative_to
        The file that names ``ref`` (``base:``, ``search_space:``): ``ref`` is looked up next to it first.
        ``None`` for a path typed by the user: taken as given (relative to the working directory).
    kind
        The shipped folder searched next (``configs``, ``ablations``, ``search_spaces``, ``deepspeed``).

    Returns
    -------
    Path
        The existing file.
    """
    if not isinstance(ref, (str, Path)) or not str(ref):
        raise ConfigError(f"expected a file name, got {ref!r}")
    ref = Path(ref)
    first = ref if relative_to is None or ref.is_absolute() else relative_to.parent / ref
    if first.is_file():
        return first
    shipped = _shipped(ref, kind)
    if shipped is not None:
        return shipped
    raise ConfigError(f"{ref}: file not found (looked at {first} and among the shipped {kind})")


def resolve_path_keys(flat: Mapping[str, Any], relative_to: Path | None) -> dict[str, Any]:
    """``flat`` (dotted key → value) with the files named by :data:`PATH_KEYS` found, as absolute paths.

    Parameters
    ----------
    flat
        Dotted overrides (an ablation's arm, level or named set; a run config's section as ``{key: value}``).
    relative_to
        The file that sets them (looked up next to it first, then among the shipped configs); ``None`` for
        values typed on the command line (relative to the working directory, then the shipped configs).
    """
    return {k: (str(resolve_config_path(v, relative_to).resolve()) if k in PATH_KEYS and isinstance(v, str) else v)
            for k, v in flat.items()}


def _resolve_layer_paths(layer: dict[str, Any], path: Path) -> None:
    """The :data:`PATH_KEYS` of a config file's layer, found relative to that file (in place)."""
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        part = layer.get(section)
        if isinstance(part, dict) and isinstance(part.get(leaf), str):
            part[leaf] = resolve_path_keys({key: part[leaf]}, path)[key]


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> tuple[list[dict[str, Any]], tuple[Path, ...]]:
    """The files of a ``base:`` chain as layers, the deepest base first (merged by :func:`load_typed`)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain ({' -> '.join(str(s) for s in (*seen, path))})")
    raw = read_yaml(path)
    _resolve_layer_paths(raw, path)
    base = raw.pop(BASE_KEY, None)
    layers: list[dict[str, Any]] = []
    chain: tuple[Path, ...] = (path,)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key '{BASE_KEY}': expected one file name, got {base!r}")
        layers, chain = _load_with_bases(resolve_config_path(base, path), (*seen, path))
        chain = (*chain, path)
    return [*layers, raw], chain


def _plain(layer: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(layer, DictConfig):
        out = OmegaConf.to_container(layer)
        assert isinstance(out, dict)
        return {str(k): v for k, v in out.items()}
    return dict(layer)


#: Former run-config keys (``section`` → ``key`` → where the setting went), named in the error for an old key.
_RENAMED_KEYS: dict[str, dict[str, str]] = {
    "eval": {"controls_per_condition": "eval.val_controls and eval.test_controls (control cells per validation "
                                       "and test condition; null = the whole pool) with eval.controls_seed"},
}


def _refuse_renamed_keys(layers: list[dict[str, Any]]) -> None:
    for layer in layers:
        for section, renamed in _RENAMED_KEYS.items():
            part = layer.get(section)
            for key in (k for k in renamed if isinstance(part, Mapping) and k in part):
                raise ConfigError(f"key '{section}.{key}': this key was replaced: use {renamed[key]}")


def _component_sections(schema: type) -> tuple[str, ...]:
    """The component sections (``model``, ``backbone``, ``loss``) that ``schema`` has as fields."""
    names = {f.name for f in dataclasses.fields(schema)}
    return tuple(section for section in COMPONENTS if section in names)


def _component_blocks(schema: type, layers: list[dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each component section's name and merged block; a layer that switches ``name`` starts the block afresh.

    Only the keys every component of the section has (``loss.scale``) are carried over a switch.
    The section is taken out of ``layers`` (it is merged here, key by key). A block that is not a mapping
    is left in place for OmegaConf to reject with its key path.
    """
    defaults = schema()
    out = {}
    for section in _component_sections(schema):
        name, block = getattr(defaults, section).name, {}
        for layer in layers:
            part = layer.get(section)
            if not isinstance(part, Mapping):
                continue
            del layer[section]
            if "name" in part and part["name"] != name:  # another component: its defaults, the section's own keys
                shared = COMPONENTS[section].shared_keys()
                name, block = part["name"], {k: v for k, v in block.items() if k in shared}
            block.update(part)
        out[section] = (name, block)
    return out


def load_typed(schema: type[T], source: str, *layers: Mapping[str, Any] | DictConfig) -> T:
    """Merge ``layers`` onto the dataclass ``schema`` and build it (``__post_init__`` checks run).

    Parameters
    ----------
    schema
        A frozen dataclass (``RunConfig``, ``AblationFile``, ``SearchSpaceFile``).
    source
        What the layers came from (file name, overrides), put in front of every error message.
    layers
        Mappings merged in order.

    Returns
    -------
    T
        The validated instance.
    """
    try:
        structured = OmegaConf.structured(schema)
        if _component_sections(schema):
            # components: the block's name picks its options dataclass, whose keys and types then apply
            plain = [_plain(layer) for layer in layers]
            _refuse_renamed_keys(plain)
            blocks = _component_blocks(schema, plain)
            with flag_override(structured, "readonly", False):
                for section, (name, block) in blocks.items():
                    registry = COMPONENTS[section]
                    registry.check_keys(name, block)
                    structured[section] = OmegaConf.structured(registry.options(name))
            layers = (*plain, {section: block for section, (_, block) in blocks.items()})
        merged = OmegaConf.merge(structured, *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from e
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    assert isinstance(obj, schema)
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


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Dotted ``key=value`` strings → ``{dotted key: value}``, values read as :func:`load_run_config` reads them.

    Parameters
    ----------
    overrides
        E.g. ``["optim.lr=1e-3", "datasets.norman.data.path=x.h5ad"]``.

    Returns
    -------
    dict
        Dotted key → plain value (a later override of the same key wins).
    """
    items = list(overrides)
    conf = _overrides_to_conf(items)
    out: dict[str, Any] = {}
    for item in items:
        key = item.split("=", 1)[0]
        value = OmegaConf.select(conf, key)
        out[key] = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    return out


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                    extra: Mapping[str, Any] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a YAML file, a mapping and command-line overrides.

    Parameters
    ----------
    path
        Run config YAML (may contain ``base: other.yaml``); ``None`` starts from the schema defaults.
    overrides
        Dotted ``key=value`` strings applied last and in order, e.g. ``["optim.lr=0.001", "loss.name=gears",
        "loss.gamma=3"]`` (a component's options after its ``name``).
    extra
        A nested mapping applied between the file and the overrides (an ablation arm, a search sample).

    Returns
    -------
    RunConfig
        The frozen, validated config.
    """
    return load_layers(RunConfig, path, overrides, extra)


def load_layers(schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                extra: Mapping[str, Any] | None = None) -> T:
    """Build a validated ``schema`` instance from a YAML file, a mapping and dotted overrides.

    What :func:`load_run_config` does for a run config, for any config dataclass with the same conventions
    (``base:`` chains, shipped files under ``configs/``, one layer per override, component blocks).

    Parameters
    ----------
    schema
        A frozen config dataclass (``RunConfig``, ``PretrainConfig``).
    path, overrides, extra
        As :func:`load_run_config`.
    """
    layers: list[Any] = []
    source = "<defaults>"
    if path is not None:
        p = resolve_config_path(path) if not Path(path).is_file() else Path(path)
        files, chain = _load_with_bases(p)
        source = str(p) if len(chain) == 1 else f"{p} (base chain: {' <- '.join(c.name for c in chain)})"
        layers.extend(files)
    if extra:
        layers.append(OmegaConf.create(dict(extra)))
    overrides = list(overrides)
    if overrides:
        # one layer per override, in order: `backbone.name=learned` after `backbone.heads=2` switches afresh
        layers.extend(_overrides_to_conf([item]) for item in overrides)
        source += f" + overrides {overrides}"
    return _typed_paths(load_typed(schema, source, *layers), source)


def _typed_paths(cfg: T, source: str) -> T:
    """``cfg`` with the :data:`PATH_KEYS` still relative (typed on the command line) found from the working
    directory, then among the shipped configs (those of a file were found relative to it when it was read)."""
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        block = getattr(cfg, section, None)
        value = getattr(block, leaf, None)
        if isinstance(value, str) and not Path(value).is_absolute():
            try:
                found = resolve_path_keys({key: value}, None)[key]
            except ConfigError as e:
                raise ConfigError(f"{source}: key '{key}': {e}") from e
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(block, **{leaf: found})})
    return cfg


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


def merge_dotted(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge flat dotted override sets in order, as :func:`load_typed` merges a component's block.

    A set that names a component (``backbone.name: learned``) other than the one named so far drops the
    earlier sets' keys of that section (but those every component of it has, ``loss.scale``): the new
    component starts from its own defaults.
    """
    out: dict[str, Any] = {}
    for layer in layers:
        for section, registry in COMPONENTS.items():
            key = f"{section}.name"
            if key in layer and out.get(key) != layer[key]:
                keep = {f"{section}.{k}" for k in registry.shared_keys()}
                out = {k: v for k, v in out.items() if not str(k).startswith(f"{section}.") or k in keep}
        out.update(layer)
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Inverse of :func:`config_to_dict` (validates again)."""
    return load_typed(RunConfig, "<dict>", OmegaConf.create(dict(d)))


def config_hash(cfg: RunConfig) -> str:
    """Short stable hash of what decides a run's results: a trial's identity.

    Left out: labels and tracking (``name``, ``logging.*``: a resumed sweep with another W&B mode still
    recognises its finished trials) and the sections the run does not use (:attr:`RunConfig.unused_sections`:
    a baseline under two backbone sets is one run), and where a checkpoint lives when its weights' digest
    is given (``backbone.checkpoint`` beside ``backbone.checkpoint_sha256``: the driver's cache or its copy on
    the sweep's object store are one run). Two trials with the same hash give the same results; a sweep
    runs them once (:func:`pertadapt.sweep.ablation.shared_runs`).
    """
    doc = config_to_dict(cfg)
    for section in ("name", "logging", *cfg.unused_sections):
        doc.pop(section, None)
    if (doc.get("backbone") or {}).get("checkpoint_sha256"):
        del doc["backbone"]["checkpoint"]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
