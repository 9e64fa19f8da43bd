"""Offline validation of cluster definitions: Ray cluster launcher YAML and KubeRay v1 manifests.

Nothing here opens a network connection, runs SSH or calls a cloud API. A Ray cluster launcher
file is checked as written against Ray's own ``ray-schema.json`` first (``prepare_config`` alone
crashes on wrong types instead of reporting them), then filled out with the provider defaults by
``prepare_config`` and re-checked by ``validate_config``. A KubeRay manifest is checked against the
vendored, stripped CRD OpenAPI schema of its kind (``cluster/kuberay/schema/``), where every object
that lists ``properties`` rejects unknown keys, so a typo such as ``replicaz`` is reported.

On top of the schemas, the mistakes that pass them but break a launch are checked: a resource named
``GPUs``/``cpu`` instead of Ray's ``GPU``/``CPU``, ``nvidia.com/gpus``, KubeRay ``minReplicas >
maxReplicas``, a container without an image, an ``authOptions`` newer than the ``rayVersion``, and shell
operators outside quotes in a RayJob ``entrypoint`` (KubeRay's submitter pastes it into a ``bash -c`` line,
so whatever follows ``&&`` or ``;`` runs in the submitter pod, not in the Ray job). Unedited template
values (``REPLACE-ME``, ``registry.example.com``, documentation IP addresses) are listed as placeholders:
what to edit before launching; ``ready=True`` makes them errors. A shell script (the SLURM batch script,
the local-cluster script) is checked with ``bash -n``.

Every problem carries the key path it refers to, written ``a.b[0].c`` (``<root>`` for the whole
document; ``line N`` in a shell script).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
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

PLACEHOLDER = re.compile(r"REPLACE-ME|registry\.example\.com|\b(?:192\.0\.2|198\.51\.100|203\.0\.113)\.\d+\b")
"""Template values to edit before launching: ``REPLACE-ME`` (also ``ami-REPLACE-ME``), the example registry,
and the documentation IP ranges of RFC 5737."""

KUBERAY_TOKEN_AUTH_MIN_RAY = (2, 52, 0)
"""The oldest ``rayVersion`` KubeRay accepts with ``authOptions.mode: token``."""

KUBERAY_K8S_TOKEN_AUTH_MIN_RAY = (2, 55, 0)
"""The oldest ``rayVersion`` KubeRay accepts with ``authOptions.enableK8sTokenAuth``."""

_RAY_RESOURCE_NAMES = {"cpu": "CPU", "cpus": "CPU", "num_cpus": "CPU", "gpu": "GPU", "gpus": "GPU",
                       "num_gpus": "GPU"}
_SHELL_OPERATORS = set("();<>|&")
_SHELL_SUFFIXES = (".sh", ".sbatch", ".bash")


class ClusterKind(StrEnum):
    """What a cluster definition file describes."""

    RAY_LAUNCHER = "ray-launcher"
    RAY_JOB = "RayJob"
    RAY_CLUSTER = "RayCluster"
    SHELL = "shell script"


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
    placeholders
        Template values still to edit before launching (errors only when validated as ready to launch).
    """

    kind: ClusterKind | None
    problems: tuple[Problem, ...] = field(default=())
    placeholders: tuple[Problem, ...] = field(default=())

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


def _walk(node: Any, parts: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every (key path, value) of a parsed document, depth first, in document order."""
    yield parts, node
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, (*parts, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*parts, i))


def placeholders(doc: Any) -> list[Problem]:
    """The unedited template values of a parsed document (:data:`PLACEHOLDER`), each at its key path."""
    return [Problem(format_path(parts), f"placeholder {m.group(0)!r} in {_short(value)!r}: edit it before launching")
            for parts, value in _walk(doc) if isinstance(value, str) and (m := PLACEHOLDER.search(value))]


def _short(text: str, width: int = 72) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _ray_resource_problems(doc: Mapping[str, Any]) -> list[Problem]:
    """Node-type resources spelled unlike Ray's ``CPU``/``GPU`` (``GPUs``, ``gpu``...): a custom resource no trial asks for."""
    problems = []
    for name, spec in (doc.get("available_node_types") or {}).items():
        for key in (spec or {}).get("resources") or {}:
            right = _RAY_RESOURCE_NAMES.get(str(key).lower())
            if right is not None and key != right:
                problems.append(Problem(format_path(["available_node_types", name, "resources", key]),
                                        f"Ray's resource is named {right!r}, not {key!r} (as written it is a custom "
                                        f"resource that no trial asks for)"))
    return problems


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
    problems = _ray_resource_problems(doc) + _local_provider_problems(doc)
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


def _version(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?.*", text.strip())
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _pod_templates(spec: Mapping[str, Any], at: list[str | int]) -> Iterator[tuple[list[str | int], Any]]:
    """(key path, pod template) of the head and of every worker group of a RayCluster spec."""
    head = spec.get("headGroupSpec") or {}
    yield [*at, "headGroupSpec", "template"], head.get("template")
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        yield [*at, "workerGroupSpecs", i, "template"], (group or {}).get("template")


def _container_problems(template: Any, at: list[str | int]) -> list[Problem]:
    """A container without an image; a GPU resource spelled unlike ``nvidia.com/gpu``."""
    problems = []
    pod = (template or {}).get("spec") or {}
    for field_ in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(field_) or []):
            here = [*at, "spec", field_, i]
            if not isinstance(c, Mapping):
                continue
            if not str(c.get("image") or "").strip():
                problems.append(Problem(format_path([*here, "image"]), "the container has no image"))
            for part in ("requests", "limits"):
                for key in (c.get("resources") or {}).get(part) or {}:
                    low = str(key).lower()
                    if low != "nvidia.com/gpu" and ("gpu" in low and ("nvidia" in low or "/" not in low)):
                        problems.append(Problem(format_path([*here, "resources", part, key]),
                                                f"the NVIDIA GPU resource is 'nvidia.com/gpu', not {key!r}"))
    return problems


def _cluster_spec_problems(spec: Any, at: list[str | int]) -> list[Problem]:
    """Replica bounds, images, GPU resource names and the Ray version that token auth needs."""
    if not isinstance(spec, Mapping):
        return []
    problems = []
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        lo, hi, n = (group.get(k) for k in ("minReplicas", "maxReplicas", "replicas"))
        here = [*at, "workerGroupSpecs", i]
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(Problem(format_path([*here, "minReplicas"]),
                                    f"minReplicas {lo} is greater than maxReplicas {hi} (KubeRay refuses the group)"))
        elif isinstance(n, int) and isinstance(lo, int) and isinstance(hi, int) and not lo <= n <= hi:
            problems.append(Problem(format_path([*here, "replicas"]),
                                    f"replicas {n} is outside minReplicas {lo} .. maxReplicas {hi}"))
    for path, template in _pod_templates(spec, at):
        problems += _container_problems(template, path)
    auth = spec.get("authOptions") or {}
    needs = []
    if auth.get("mode") == "token":
        needs.append(("authOptions.mode: token", KUBERAY_TOKEN_AUTH_MIN_RAY))
    if auth.get("enableK8sTokenAuth"):
        needs.append(("authOptions.enableK8sTokenAuth", KUBERAY_K8S_TOKEN_AUTH_MIN_RAY))
    if needs:
        what, least = max(needs, key=lambda n: n[1])
        least_s = ".".join(map(str, least))
        raw = spec.get("rayVersion")
        version = _version(str(raw)) if raw is not None else None
        if raw is None:
            problems.append(Problem(format_path([*at, "rayVersion"]), f"{what} needs rayVersion >= {least_s}; "
                                                                      "none is given"))
        elif version is None or version < least:
            problems.append(Problem(format_path([*at, "rayVersion"]), f"{what} needs rayVersion >= {least_s}, "
                                                                      f"got {raw!r} (KubeRay refuses the cluster)"))
    return problems


def entrypoint_problems(entrypoint: str, path: str = "spec.entrypoint") -> list[Problem]:
    """Shell operators outside quotes in a RayJob entrypoint.

    KubeRay's submitter runs ``/bin/bash -ce -- "... ray job submit --address ... -- <entrypoint> ; ..."``
    with the entrypoint pasted in as it is: an unquoted ``&&``, ``;``, ``|`` or redirection ends the
    ``ray job submit`` command, and the rest runs in the submitter pod.
    """
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        ops = [tok for tok in lexer if tok and set(tok) <= _SHELL_OPERATORS]
    except ValueError as e:
        return [Problem(path, f"{e}: unbalanced quotes")]
    if not ops:
        return []
    return [Problem(path, f"shell operator {ops[0]!r} outside quotes: KubeRay's submitter pastes the entrypoint "
                          "into `bash -c \"ray job submit ... -- <entrypoint>\"`, so what follows it runs in the "
                          "submitter pod, not in the Ray job; make it one quoted command, e.g. "
                          "bash -c 'cd \"$HOME/pertadapt\" && pertadapt sweep ...'")]


def kuberay_problems(doc: Mapping[str, Any], kind: ClusterKind) -> list[Problem]:
    """The mistakes a KubeRay manifest can make that its CRD schema lets through."""
    spec = doc.get("spec") or {}
    if kind is ClusterKind.RAY_CLUSTER:
        return _cluster_spec_problems(spec, ["spec"])
    problems = _cluster_spec_problems(spec.get("rayClusterSpec"), ["spec", "rayClusterSpec"])
    submitter = spec.get("submitterPodTemplate")
    if submitter is not None:
        problems += _container_problems(submitter, ["spec", "submitterPodTemplate"])
    if isinstance(spec.get("entrypoint"), str):
        problems += entrypoint_problems(spec["entrypoint"])
    return problems


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
        One problem per schema violation; if there are none, the problems of :func:`kuberay_problems`.

    Raises
    ------
    FileNotFoundError
        When the schema file is missing.
    """
    schema_file = (schema_dir or default_schema_dir()) / _KUBERAY_SCHEMA_FILES[kind]
    if not schema_file.is_file():
        raise FileNotFoundError(f"KubeRay CRD schema not found: {schema_file} (set {SCHEMA_DIR_ENV})")
    return _schema_problems(doc, _kuberay_schema(schema_file.resolve())) or kuberay_problems(doc, kind)


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
        The detected kind, every problem found and the placeholders left to edit.
    """
    try:
        kind = detect_kind(doc)
    except UnknownKindError as e:
        return Report(None, (Problem(e.path, e.reason),))
    if kind is ClusterKind.RAY_LAUNCHER:
        problems = validate_ray_launcher(doc)
    else:
        problems = validate_kuberay(doc, kind, schema_dir)
    return Report(kind, tuple(problems), tuple(placeholders(doc)))


def is_shell_script(path: Path) -> bool:
    """A file named ``*.sh``/``*.sbatch``/``*.bash`` or starting with a ``#!`` line that names a shell."""
    if path.suffix in _SHELL_SUFFIXES:
        return True
    with path.open("rb") as fh:
        first = fh.readline(200)
    return first.startswith(b"#!") and any(sh in first for sh in (b"bash", b"/sh"))


def validate_shell(path: Path) -> Report:
    """Check a shell script's syntax with ``bash -n`` (nothing is run); problems at ``line N``."""
    bash = shutil.which("bash")
    if bash is None:
        return Report(ClusterKind.SHELL, (Problem(ROOT, "bash is not installed: cannot check the script"),))
    res = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True, timeout=60, check=False)
    problems = []
    for line in res.stderr.splitlines():
        m = re.match(rf"{re.escape(str(path))}: line (\d+): (.*)", line)
        problems.append(Problem(f"line {m.group(1)}", m.group(2)) if m else Problem(ROOT, line))
    if res.returncode and not problems:
        problems.append(Problem(ROOT, f"bash -n exited with {res.returncode}"))
    text = path.read_text(errors="replace")
    marks = [Problem(f"line {text.count(chr(10), 0, m.start()) + 1}",
                     f"placeholder {m.group(0)!r}: edit it before launching") for m in PLACEHOLDER.finditer(text)]
    return Report(ClusterKind.SHELL, tuple(problems), tuple(marks))


def validate_file(path: str | os.PathLike[str], schema_dir: Path | None = None, *,
                  ready: bool = False) -> list[Report]:
    """Validate every YAML document of a cluster definition file, or a shell script.

    Parameters
    ----------
    path
        A Ray cluster launcher YAML or a KubeRay manifest (several ``---`` documents allowed), or a shell
        script (:func:`is_shell_script`: the SLURM batch script, the local-cluster script).
    schema_dir
        Directory of the KubeRay CRD schemas; defaults to :func:`default_schema_dir`.
    ready
        Validate as ready to launch: unedited placeholders are problems too.

    Returns
    -------
    list[Report]
        One report per non-empty document, in file order. A YAML syntax error or an empty file
        gives a single report with no kind.
    """
    reports = _validate_file(Path(path), schema_dir)
    if not ready:
        return reports
    return [Report(r.kind, r.problems + r.placeholders, r.placeholders) for r in reports]


def _validate_file(path: Path, schema_dir: Path | None) -> list[Report]:
    if is_shell_script(path):
        return [validate_shell(path)]
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except yaml.YAMLError as e:
        return [Report(None, (Problem(ROOT, f"not valid YAML: {e}"),))]
    if not docs:
        return [Report(None, (Problem(ROOT, "the file holds no YAML document"),))]
    reports = [validate_document(d, schema_dir) for d in docs]
    if len(reports) == 1:
        return reports
    def at(i: int, probs: tuple[Problem, ...]) -> tuple[Problem, ...]:
        return tuple(Problem(f"[{i}].{p.path}" if p.path != ROOT else f"[{i}]", p.message) for p in probs)

    return [Report(r.kind, at(i, r.problems), at(i, r.placeholders)) for i, r in enumerate(reports)]
