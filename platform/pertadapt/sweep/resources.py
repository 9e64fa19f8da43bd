"""What a sweep's trials ask of the cluster, checked before any trial is queued.

A trial's workers each ask for one bundle (CPUs, GPUs, an ``accelerator_type:<name>`` resource). The
check compares them with the live nodes and, on an autoscaling cluster, with the node types the
autoscaler may launch: ``available_node_types`` of a Ray cluster-launcher YAML, which ``ray up`` leaves
on the head as ``~/ray_bootstrap_config.yaml``, or, without that file (KubeRay), the worker groups the
autoscaler reported to the cluster's GCS (Ray's autoscaler v2, ``autoscalerOptions.version: v2``). A
trial that fits neither fails naming the key; one that only an autoscaled node type holds is reported
with that type's name, and the autoscaler is asked for one such trial's bundles at once
(``ray.autoscaler.sdk.request_resources``) instead of waiting for Tune's queue to show the demand. When an
autoscaler v2 runs but its node types are not known here, a trial the live nodes cannot hold is asked for
the same way and the check waits (up to ``scale_timeout_s``) for a node that holds it, then fails naming
the key if none came.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pertadapt.config.schema import ConfigError
from pertadapt.sweep.ablation import Ablation, Trial

__all__ = ["AUTOSCALER_CONFIG", "NodeType", "autoscaler_node_types", "capacity", "check_resources",
           "autoscaler_v2_runs", "cluster_concurrency", "node_types_from_cluster_config", "prepare_cluster",
           "read_node_types",
           "release_cluster", "scale_up_bundles", "summed", "worker_bundle"]

log = logging.getLogger(__name__)

#: Where ``ray up`` leaves the autoscaler's config on the head node (the sweep driver runs there).
AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")
_KEYS = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}
#: Nodes counted for a node group the autoscaler may grow without a bound (``max_count`` -1).
UNBOUNDED = 1024
#: How long the pre-check waits for an autoscaler whose node types it does not know to add a node (seconds).
SCALE_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may launch: its resources per node and how many nodes at most."""

    name: str
    resources: dict[str, float]
    max_workers: int


def read_node_types(path: Path) -> list[NodeType]:
    """The worker node types of a Ray cluster-launcher YAML (``available_node_types``; the head excluded).

    Raises
    ------
    ConfigError
        When the file is not a mapping with ``available_node_types``.
    """
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the autoscaler config ({e})") from None
    types = doc.get("available_node_types") if isinstance(doc, dict) else None
    if not isinstance(types, dict):
        raise ConfigError(f"{path}: available_node_types: expected a mapping of node types")
    head = doc.get("head_node_type")
    out = []
    for name, spec in types.items():
        if name == head or not isinstance(spec, dict):
            continue
        res = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        out.append(NodeType(str(name), res, int(spec.get("max_workers", doc.get("max_workers", 0)) or 0)))
    return out


def worker_bundle(trial: Trial) -> dict[str, float]:
    """Resources one worker of a trial asks Ray for (the whole trial, for in-process trials)."""
    e = trial.config.engine
    if not trial.config.uses_ray_train:
        return {"CPU": 1.0, **({"GPU": e.gpus} if e.on_gpu and not trial.is_baseline else {})}
    bundle = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus} if e.on_gpu else {})}
    if e.accelerator_type:
        bundle[f"accelerator_type:{e.accelerator_type}"] = 0.001
    return bundle


def _workers(trial: Trial) -> int:
    return trial.config.engine.workers if trial.config.uses_ray_train else 1


def _fits(bundle: Mapping[str, float], workers: int, nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether ``workers`` bundles fit ``nodes`` (each bundle on one node; first fit, largest nodes first)."""
    free = sorted(({k: float(v) for k, v in n.items()} for n in nodes), key=lambda n: -n.get("CPU", 0.0))
    for _ in range(workers):
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] -= v
    return True


def capacity(nodes: Sequence[Mapping[str, float]], node_types: Sequence[NodeType] = ()) -> list[Mapping[str, float]]:
    """The live nodes and every node the autoscaler may add (``max_workers`` of each type)."""
    return [*nodes, *[nt.resources for nt in node_types for _ in range(nt.max_workers)]]


def summed(nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """resource → its total over ``nodes``."""
    total: dict[str, float] = {}
    for res in nodes:
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _has(nodes: Sequence[Mapping[str, float]]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(summed(nodes).items())
                     if k in ("CPU", "GPU") or k.startswith("accelerator_type")) or "nothing"


def check_resources(ablation: Ablation, nodes: Sequence[Mapping[str, float]],
                    node_types: Sequence[NodeType] = ()) -> dict[str, str]:
    """Check every trial's workers against the live ``nodes`` and the autoscaler's ``node_types``.

    Parameters
    ----------
    ablation
        The sweep's trials.
    nodes
        Resources of each live node (``ray.nodes()[i]["Resources"]``).
    node_types
        Node types an autoscaler may add (empty: the cluster is what it is).

    Returns
    -------
    dict
        trial key → the node type that will hold it, for trials the live nodes cannot hold (each also logged).

    Raises
    ------
    ConfigError
        Naming the ``resources.*`` / ``engine.*`` key that asks too much, what the cluster has and, with
        an autoscaler, what its node types offer.
    """
    scaled: dict[str, str] = {}
    everything = capacity(nodes, node_types)
    for t in ablation.trials:
        bundle, workers = worker_bundle(t), _workers(t)
        if _fits(bundle, workers, nodes):
            continue
        by_type = [nt for nt in node_types if _fits(bundle, workers, capacity(nodes, [nt]))]
        if by_type:
            scaled[t.key] = by_type[0].name
            log.info("trial %s: %d worker(s) × %s wait for the autoscaler's node type %r (%s per node, up to %d)",
                     t.key, workers, bundle, by_type[0].name, _has([by_type[0].resources]), by_type[0].max_workers)
            continue
        res, need = next(((k, v) for k, v in bundle.items() if not _fits({k: v}, workers, everything)),
                         next(iter(bundle.items())))
        key = _KEYS.get(res, "accelerator_type")
        largest = max((n.get(res, 0.0) for n in nodes), default=0.0)
        types = ("; autoscaler node types: " + ", ".join(f"{nt.name} ({_has([nt.resources])}, up to {nt.max_workers})"
                                                         for nt in node_types)) if node_types else ""
        raise ConfigError(f"resources.{key} (engine.{key}) of trial {t.key}: {workers} worker(s) × {need:g} {res} "
                          f"do not fit this cluster (largest node: {largest:g} {res}; cluster: {_has(nodes)}"
                          f"{types}); ask for less or add nodes")
    return scaled


def _trial_need(trial: Trial) -> dict[str, float]:
    """Everything one trial holds at once: its workers' bundles (and the Tune trial function's sliver)."""
    need = {k: v * _workers(trial) for k, v in worker_bundle(trial).items() if k in ("CPU", "GPU")}
    need["CPU"] = need.get("CPU", 0.0) + (0.01 if trial.config.uses_ray_train else 0.0)
    return need


def cluster_concurrency(ablation: Ablation, total: Mapping[str, float]) -> int:
    """How many of the ablation's largest trials ``total`` (the cluster's CPUs and GPUs) holds at once (≥ 1)."""
    fits = []
    for t in ablation.trials:
        need = _trial_need(t)
        fits.append(min(math.floor(total.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0))
    return max(1, min(fits))


def node_types_from_cluster_config(config: Any) -> list[NodeType]:
    """The node groups of the cluster config an autoscaler reports to the GCS (``autoscaler_pb2.ClusterConfig``).

    Groups that can hold no node (``max_count`` 0) or offer no resource are left out; an unbounded group
    (``max_count`` -1) counts as :data:`UNBOUNDED` nodes.
    """
    if config is None:
        return []
    out = []
    for group in config.node_group_configs:
        if group.max_count == 0 or not group.resources:
            continue
        count = UNBOUNDED if group.max_count < 0 else int(group.max_count)
        out.append(NodeType(group.name, {str(k): float(v) for k, v in group.resources.items()}, count))
    return out


def autoscaler_node_types(path: Path = AUTOSCALER_CONFIG) -> list[NodeType]:
    """The autoscaler's worker node types: its config on this machine (a ``ray up`` head), else the node
    groups it reported to the GCS of the cluster this process joined (KubeRay with autoscaler v2), else none."""
    path = path.expanduser()
    if path.is_file():
        return read_node_types(path)
    import ray

    if not ray.is_initialized():
        return []
    from ray._private.state import state

    return node_types_from_cluster_config(state.get_cluster_config())


def scale_up_bundles(ablation: Ablation, waiting: Collection[str]) -> list[dict[str, float]]:
    """The worker bundles (one per worker) of the largest of the trials ``waiting`` (keys) for the autoscaler;
    empty when none waits."""
    trials = [t for t in ablation.trials if t.key in waiting]
    if not trials:
        return []
    largest = max(trials, key=lambda t: tuple(sorted(_trial_need(t).items())))
    return [dict(worker_bundle(largest)) for _ in range(_workers(largest))]


def _live_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def autoscaler_v2_runs() -> bool:
    """Whether the cluster this process joined runs Ray's autoscaler v2 (KubeRay ``autoscalerOptions.version: v2``)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return is_autoscaler_v2(fetch_from_server=True)


def prepare_cluster(ablation: Ablation, *, scale_timeout_s: float = SCALE_TIMEOUT_S,
                    poll_s: float = 5.0) -> tuple[list[dict[str, float]], list[NodeType]]:
    """The pre-check of a sweep on the Ray cluster this process joined, before any trial is queued.

    Reads the live nodes and the autoscaler's node types (:func:`autoscaler_node_types`), checks every trial
    (:func:`check_resources`) and, when some trial waits for the autoscaler, asks it for that trial's
    bundles (``ray.autoscaler.sdk.request_resources``) so the nodes start now. Without node types but with
    an autoscaler v2 (:func:`autoscaler_v2_runs`), a trial the live nodes cannot hold is asked for the same
    way and the check waits up to ``scale_timeout_s`` for the live nodes to hold every trial.
    :func:`release_cluster` withdraws the request when the sweep ends.

    Parameters
    ----------
    ablation
        The sweep's trials.
    scale_timeout_s
        How long to wait for an autoscaler whose node types are unknown.
    poll_s
        Seconds between two looks at the live nodes while waiting.

    Returns
    -------
    tuple
        The live nodes' resources and the autoscaler's node types.

    Raises
    ------
    ConfigError
        From :func:`check_resources`: a trial that neither the live nodes nor any node type can hold; or a
        trial no node held after ``scale_timeout_s`` of waiting for an autoscaler.
    """
    from ray.autoscaler.sdk import request_resources

    types = autoscaler_node_types()
    if types:
        log.info("autoscaler node types: %s", ", ".join(f"{nt.name} (up to {nt.max_workers})" for nt in types))
    nodes = _live_nodes()
    try:
        bundles = scale_up_bundles(ablation, check_resources(ablation, nodes, types))
    except ConfigError as e:
        if types or not autoscaler_v2_runs():
            raise
        unfit = {t.key for t in ablation.trials if not _fits(worker_bundle(t), _workers(t), nodes)}
        bundles = scale_up_bundles(ablation, unfit)
        log.info("%d trial(s) fit no live node yet; asking the autoscaler for %s and waiting up to %.0f s",
                 len(unfit), bundles, scale_timeout_s)
        request_resources(bundles=bundles)
        deadline = time.monotonic() + scale_timeout_s
        while True:
            nodes = _live_nodes()
            try:
                check_resources(ablation, nodes)
                return nodes, types
            except ConfigError:
                if time.monotonic() >= deadline:
                    release_cluster()
                    raise ConfigError(f"{e} (the autoscaler added no node that holds it in {scale_timeout_s:.0f} s)"
                                      ) from None
            time.sleep(poll_s)
    if bundles:
        log.info("asking the autoscaler for %d bundle(s) %s", len(bundles), bundles[0])
        request_resources(bundles=bundles)
    return nodes, types


def release_cluster() -> None:
    """Withdraw the sweep's standing request to the autoscaler (idle nodes may then scale down)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if ray.is_initialized():
        request_resources(bundles=[])
