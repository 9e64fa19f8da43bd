"""Offline validation of cluster definitions: Ray cluster launcher YAML and KubeRay v1 manifests.

Nothing here opens a network connection, runs SSH or calls a cloud API. A Ray cluster launcher
file is checked as written against Ray's own ``ray-schema.json`` first (``prepare_config`` alone
crashes on wrong types instead of reporting them), then filled out with the provider defaults by
``prepare_config`` and re-checked by ``validate_config``. A KubeRay manifest is checked against the
vendored, stripped CRD OpenAPI schema of its kind (``cluster/kuberay/schema/``), where every object
that lists ``properties`` rejects unknown keys, so a typo such as ``replicaz`` is reported.

Every problem carries the key path it refers to, written ``a.b[0].c`` (``<root>`` for the whole
document).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import yaml

from pertadapt.files import package_data

log = logging.getLogger(__name__)

SCHEMA_DIR_ENV = "PERTADAPT_KUBERAY_SCHEMA_DIR"
"""Environment variable that overrides the directory of the vendored KubeRay CRD schemas."""

KUBERAY_API_VERSION = "ray.io/v1"
"""The only KubeRay API version these manifests are written and checked for."""

ROOT = "<root>"
"""Key path used for problems that concern the whole document."""


class ClusterKind(StrEnum):
    """What a cluster definition file describes."""

    RAY_LAUNCHER = "ray-launcher"
    RAY_JOB = "RayJob"
    RAY_CLUSTER = "RayCluster"


class UnknownKindError(ValueError):
    """The document is neither a Ray cluster launcher config nor a supported KubeRay manifest.

    Parameters
    ----------
    path
        Key path at fault (``apiVersion``, ``kind`` or ``<root>``).
    reason
        What is wrong there.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_KUBERAY_SCHEMA_FILES = {ClusterKind.RAY_JOB: "rayjob.v1.json", ClusterKind.RAY_CLUSTER: "raycluster.v1.json"}


@dataclass(frozen=True)
class Problem:
    """One validation error.

    Attributes
    ----------
    path
        Key path inside the document, e.g. ``available_node_types.gpu_worker.resources.GPU``.
    message
        What is wrong there.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Report:
    """The outcome of validating one document.

    Attributes
    ----------
    kind
        The detected kind, or ``None`` when it could not be told.
    problems
        Every problem found, in document order; empty when the document is valid.
    """

    kind: ClusterKind | None
    problems: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Whether the document is valid."""
        return not self.problems


def default_schema_dir() -> Path:
    """Directory of the vendored KubeRay CRD schemas.

    Returns
    -------
    Path
        ``$PERTADAPT_KUBERAY_SCHEMA_DIR`` when set, else the vendored schemas shipped in the package
        (``pertadapt/resources/kuberay_schema``, linked as ``cluster/kuberay/schema``).
    """
    env = os.environ.get(SCHEMA_DIR_ENV)
    if env:
        return Path(env)
    return Path(str(package_data("kuberay_schema")))


def format_path(parts: Iterable[str | int]) -> str:
    """Write a sequence of keys and list indices as ``a.b[0].c``.

    Parameters
    ----------
    parts
        Mapping keys (``str``) and list indices (``int``), outermost first.

    Returns
    -------
    str
        The dotted path, or ``<root>`` when ``parts`` is empty.
    """
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or ROOT


def detect_kind(doc: Any) -> ClusterKind:
    """Tell which kind of cluster definition a parsed YAML document is.

    Parameters
    ----------
    doc
        The parsed document.

    Returns
    -------
    ClusterKind
        ``RAY_LAUNCHER`` for a mapping with ``provider:``; ``RAY_JOB`` or ``RAY_CLUSTER`` for a
        mapping with ``apiVersion: ray.io/v1`` and that ``kind``.

    Raises
    ------
    UnknownKindError
        When the kind cannot be told; it names the key path at fault.
    """
    if not isinstance(doc, Mapping):
        raise UnknownKindError(ROOT, f"expected a mapping, got {type(doc).__name__}")
    api = doc.get("apiVersion")
    if api is not None:
        if api != KUBERAY_API_VERSION:
            raise UnknownKindError("apiVersion", f"expected {KUBERAY_API_VERSION!r}, got {api!r}")
        kind = doc.get("kind")
        for known in _KUBERAY_SCHEMA_FILES:
            if kind == known.value:
                return known
        names = ", ".join(k.value for k in _KUBERAY_SCHEMA_FILES)
        raise UnknownKindError("kind", f"expected one of {names}, got {kind!r}")
    if "provider" in doc:
        return ClusterKind.RAY_LAUNCHER
    raise UnknownKindError(ROOT, "neither a Ray cluster launcher file (no 'provider:') "
                                 f"nor a KubeRay manifest (no 'apiVersion: {KUBERAY_API_VERSION}')")


def _schema_problems(doc: Any, schema: Mapping[str, Any]) -> list[Problem]:
    """Check ``doc`` against a JSON schema and give one problem per error, with full key paths."""
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    problems: list[Problem] = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        parent = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            known = err.schema.get("properties", {})
            patterns = err.schema.get("patternProperties", {})
            for key in err.instance:
                if key not in known and not any(re.search(p, key) for p in patterns):
                    problems.append(Problem(format_path([*parent, key]), "unknown key"))
        elif err.validator == "required" and isinstance(err.instance, Mapping):
            for key in err.validator_value:
                if key not in err.instance:
                    problems.append(Problem(format_path([*parent, key]), "required key is missing"))
        else:
            problems.append(Problem(format_path(parent), err.message))
    return problems


@cache
def _ray_launcher_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@cache
def _kuberay_schema(schema_file: Path) -> dict[str, Any]:
    return json.loads(schema_file.read_text())


def _local_provider_problems(doc: Mapping[str, Any]) -> list[Problem]:
    """The on-prem (``type: local``) provider needs its hosts, unless a coordinator hands them out."""
    provider = doc["provider"]
    if provider.get("type") != "local" or "coordinator_address" in provider:
        return []
    return [Problem(f"provider.{key}", "required key is missing for the local provider")
            for key in ("head_ip", "worker_ips") if key not in provider]


def validate_ray_launcher(doc: Mapping[str, Any]) -> list[Problem]:
    """Validate a Ray cluster launcher config offline.

    Parameters
    ----------
    doc
        The parsed YAML, as a user wrote it (``ray up`` input).

    Returns
    -------
    list[Problem]
        Schema errors of the raw file; if there are none, the errors of the local provider's
        host list and of Ray's ``prepare_config`` + ``validate_config`` on the filled-out config.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = _schema_problems(doc, _ray_launcher_schema())
    if problems:
        return problems
    problems = _local_provider_problems(doc)
    if problems:
        return problems
    try:
        validate_config(prepare_config(copy.deepcopy(dict(doc))))
    except jsonschema.ValidationError as e:
        return [Problem(format_path(list(e.absolute_path)), e.message)]
    except (click.ClickException, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        return [Problem(ROOT, f"{type(e).__name__}: {message}")]
    return []


def validate_kuberay(doc: Mapping[str, Any], kind: ClusterKind, schema_dir: Path | None = None) -> list[Problem]:
    """Validate a KubeRay v1 ``RayJob`` or ``RayCluster`` manifest against its vendored CRD schema.

    Parameters
    ----------
    doc
        The parsed manifest.
    kind
        ``ClusterKind.RAY_JOB`` or ``ClusterKind.RAY_CLUSTER``.
    schema_dir
        Directory with ``rayjob.v1.json`` and ``raycluster.v1.json``; defaults to
        :func:`default_schema_dir`.

    Returns
    -------
    list[Problem]
        One problem per schema violation.

    Raises
    ------
    FileNotFoundError
        When the schema file is missing.
    """
    schema_file = (schema_dir or default_schema_dir()) / _KUBERAY_SCHEMA_FILES[kind]
    if not schema_file.is_file():
        raise FileNotFoundError(f"KubeRay CRD schema not found: {schema_file} (set {SCHEMA_DIR_ENV})")
    return _schema_problems(doc, _kuberay_schema(schema_file.resolve()))


def validate_document(doc: Any, schema_dir: Path | None = None) -> Report:
    """Detect the kind of one parsed document and validate it.

    Parameters
    ----------
    doc
        The parsed YAML document.
    schema_dir
        Directory of the KubeRay CRD schemas; defaults to :func:`default_schema_dir`.

    Returns
    -------
    Report
        The detected kind and every problem found.
    """
    try:
        kind = detect_kind(doc)
    except UnknownKindError as e:
        return Report(None, (Problem(e.path, e.reason),))
    if kind is ClusterKind.RAY_LAUNCHER:
        problems = validate_ray_launcher(doc)
    else:
        problems = validate_kuberay(doc, kind, schema_dir)
    return Report(kind, tuple(problems))


def validate_file(path: str | os.PathLike[str], schema_dir: Path | None = None) -> list[Report]:
    """Validate every YAML document of a cluster definition file.

    Parameters
    ----------
    path
        A Ray cluster launcher YAML or a KubeRay manifest (several ``---`` documents allowed).
    schema_dir
        Directory of the KubeRay CRD schemas; defaults to :func:`default_schema_dir`.

    Returns
    -------
    list[Report]
        One report per non-empty document, in file order. A YAML syntax error or an empty file
        gives a single report with no kind.
    """
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except yaml.YAMLError as e:
        return [Report(None, (Problem(ROOT, f"not valid YAML: {e}"),))]
    if not docs:
        return [Report(None, (Problem(ROOT, "the file holds no YAML document"),))]
    reports = [validate_document(d, schema_dir) for d in docs]
    if len(reports) == 1:
        return reports
    return [Report(r.kind, tuple(Problem(f"[{i}].{p.path}" if p.path != ROOT else f"[{i}]", p.message)
                                 for p in r.problems))
            for i, r in enumerate(reports)]
