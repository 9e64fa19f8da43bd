"""The sweep's frozen-FM embedding tables: each built once, before any trial is queued, sharded over the cluster.

The trials of a sweep that use the embedding cache (:mod:`pertadapt.train.embed_cache`) are collected by the
table they read (its key: backbone weights, data, gene space, control pool, storage dtype), so trials sharing
a key (arms that differ after the backbone, seeds of a pretrained FM, ...) share one table. Each distinct table
is built once by :func:`build_sweep_tables`, before the first trial starts:

1. under the key's lock, the table's temporary file is created in the cache folder with every block reserved
   (``posix_fallocate``: a full disk is a :class:`~pertadapt.config.errors.ConfigError` here, exit 2);
2. its pool rows are split into contiguous shards, each starting at a multiple of ``eval.batch_size``
   (:func:`~pertadapt.train.embed_cache.shard_ranges`: every shard runs the very batches a one-process build
   runs, so the bytes do not depend on the number of shards), one Ray task per shard, as many as the workers
   available hold; each task rebuilds the backbone as the trial would (and refuses to write if its key
   differs), runs it over its rows and writes them into the shared file opened ``r+`` (``np.memmap``; rows
   disjoint);
3. only when every shard has reported its rows, and they cover the pool exactly once, is the file renamed into
   place. A failed or killed shard fails the build: the other shards are cancelled and the temporary file is
   removed, so no half-written table is ever read, and the next build starts afresh.

Progress is logged as the shards finish (rows done, elapsed, an estimate of what is left).

Why Ray tasks and not the trial's DeepSpeed ranks: the tables are built before any trial runs, when no worker
group exists, and a table belongs to no one trial; a table's rows are independent (one control cell's forward
each), so shards need no process group or collective, only disjoint rows of one file; and tasks get what the
cluster has before the trials take it (every GPU of every node), asking each for the resources of one of the
trial's workers (``engine.cpus_per_worker``, ``engine.gpus_per_worker``).

Where the file is: the cache folder of the driver (``$PERTADAPT_CACHE/fm_embeddings``). When it lies under a
storage root that is a path (``--storage`` on a shared file system, where the cache goes by default), every
node sees it and the shards run on any node. Otherwise (an object store, or a node-local cache) the shards run
on the driver's node, and on an object store the finished table is uploaded once to
``<storage>/cache/fm_embeddings/``; a trial that does not find it on its node fetches it from there, once per
node (:func:`~pertadapt.train.embed_cache.fetch_table`, on :func:`pertadapt.remote.localize`'s lock). Trials
then open the table (``provenance.json``: ``embedding_cache.hit: true``) and never build it again; only a table
the plan could not know (an Optuna sample that changes a backbone knob) is built by its trial.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pertadapt import remote
from pertadapt.config.schema import RunConfig
from pertadapt.train.embed_cache import (
    CACHE_SUBDIR,
    TABLES_ENV,
    EmbeddingCache,
    build_device,
    fetch_table,
    fill_rows,
    shard_ranges,
    table_source,
)

__all__ = ["SHARD_TASK", "build_sweep_tables", "tables_uri", "use_sweep_tables"]

log = logging.getLogger(__name__)

#: Name of a shard's Ray task (also its process title while it runs: ``ray::<name>``).
SHARD_TASK = "embedding_table_shard"


def tables_uri(storage: str) -> str | None:
    """The folder of the sweep's tables on an object-store storage root; ``None`` for a path."""
    return remote.under(storage, "cache", CACHE_SUBDIR) if remote.is_uri(storage) else None


def use_sweep_tables(storage: str) -> None:
    """Before Ray starts (its workers inherit the driver's ``PERTADAPT_*`` variables): on an object store, name
    the folder of the sweep's tables (:data:`~pertadapt.train.embed_cache.TABLES_ENV`) for every run."""
    uri = tables_uri(storage)
    if uri is not None:
        os.environ[TABLES_ENV] = uri


def _fill_shard(cfg: RunConfig, tmp: str, start: int, stop: int, key: str) -> tuple[int, int]:
    """A shard's task: the table's rows ``[start, stop)`` into ``tmp``, computed as the trial would compute them."""
    source = table_source(cfg)
    if source is None or source.cache.key != key:
        raise RuntimeError(f"shard [{start}, {stop}) of {tmp}: this node builds the table with key "
                           f"{source and source.cache.key}, the driver planned {key} (different code, data or "
                           "library versions on this node?)")
    return fill_rows(source, Path(tmp), start, stop, batch_size=cfg.eval.batch_size, device=build_device(cfg))


def _shard_resources(cfg: RunConfig) -> dict[str, float]:
    """One of the trial's workers: its CPUs and GPUs (an in-process trial: one CPU, its GPUs)."""
    return {"CPU": cfg.engine.cpus_per_worker if cfg.uses_ray_train else 1.0, "GPU": cfg.engine.gpus}


def _workers(nodes: Sequence[dict], need: dict[str, float]) -> int:
    """How many tasks asking for ``need`` the ``nodes`` hold at once."""
    total = 0
    for node in nodes:
        res = node["Resources"]
        total += min(math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    return total


def _placement(cfg: RunConfig, shared: bool) -> tuple[dict[str, object], int]:
    """The shard tasks' Ray options and how many run at once: anywhere when every node sees the file, else on
    the driver's node (CPU only if it has no GPU; one task reserving nothing if it offers Ray no CPU, as a
    cluster's head often does)."""
    need = _shard_resources(cfg)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    options: dict[str, object] = {}
    if not shared:
        here = ray.get_runtime_context().get_node_id()
        alive = [n for n in alive if n["NodeID"] == here]
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=False)
        if need["GPU"] and _workers(alive, need) == 0:
            log.warning("embedding tables: the driver's node has no GPU; building on its CPUs")
            need = {"CPU": need["CPU"], "GPU": 0.0}
        if _workers(alive, need) == 0:
            log.warning("embedding tables: the driver's node offers Ray no CPU; building there in one task")
            return {**options, "num_cpus": 0, "num_gpus": 0}, 1
    options.update(num_cpus=need["CPU"], num_gpus=need["GPU"])
    return options, max(1, _workers(alive, need))


def _under(path: Path, root: str) -> bool:
    return not remote.is_uri(root) and path.resolve().is_relative_to(Path(root).resolve())


def _build(cfg: RunConfig, cache: EmbeddingCache, storage: str) -> None:
    """Build one table, sharded (see the module docstring); nothing when it is already stored."""
    shared = _under(cache.root, storage)
    if cache.open() is None and fetch_table(cache):  # a resumed sweep on another driver node: stored already
        log.info("embedding table %s: fetched from the sweep's store", cache.path.name)
        return
    with cache.building() as tmp:
        if tmp is None:
            log.info("embedding table %s: already built", cache.path.name)
            return
        options, workers = _placement(cfg, shared)
        ranges = shard_ranges(cache.shape[0], cfg.eval.batch_size, workers)
        log.info("embedding table %s (%s): %d shard(s) on %s", cache.path.name, cache.size_text, len(ranges),
                 "the cluster" if shared else "the driver's node")
        task = ray.remote(max_retries=0)(_fill_shard).options(name=SHARD_TASK, **options)
        pending = [task.remote(cfg, str(tmp), a, b, cache.key) for a, b in ranges]
        done: list[tuple[int, int]] = []
        t0 = time.perf_counter()
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done.append(tuple(ray.get(ready[0])))
                rows, elapsed = sum(b - a for a, b in done), time.perf_counter() - t0
                log.info("embedding table %s: %d/%d shards, %d/%d rows, %.1f s (about %.0f s left)",
                         cache.path.name, len(done), len(ranges), rows, cache.shape[0], elapsed,
                         elapsed * (cache.shape[0] - rows) / max(rows, 1))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if sorted(done) != ranges:  # every row exactly once, or no table
            raise RuntimeError(f"embedding table {cache.path}: shards wrote {sorted(done)}, planned {ranges}")
    log.info("embedding table %s built in %.1f s", cache.path, time.perf_counter() - t0)


def _upload(cache: EmbeddingCache, uri: str) -> None:
    """Copy a finished table (and its key's ``.json``) to the sweep's object store, once."""
    for local in (cache.path, cache.path.with_suffix(".json")):
        target = remote.join(uri, local.name)
        if remote.upload_once(local, target):
            log.info("embedding table %s → %s", local.name, target)


def build_sweep_tables(configs: Iterable[RunConfig], storage: str) -> list[Path]:
    """Build every distinct table the trials ``configs`` read, once each, before they run (Ray must be up).

    Parameters
    ----------
    configs
        The trials' run configs (``data.path`` in); those without a table (baselines, FM off, fine-tuned
        FM, ``embedding_cache: off``) are skipped.
    storage
        The sweep's storage root: on an object store the tables are uploaded there for the trials to fetch.

    Returns
    -------
    list of Path
        The tables, in the order first needed.

    Raises
    ------
    ConfigError
        A table does not fit the cache's file system (nothing is computed, no file is left).
    ray.exceptions.RayError
        A shard failed or its worker died (no table is left; the next build starts afresh).
    """
    seen: set[str] = set()
    keys: set[str] = set()
    tables: list[Path] = []
    uri = tables_uri(storage)
    for cfg in configs:
        signature = repr((cfg.backbone, cfg.data, cfg.model, cfg.seed, cfg.is_baseline))
        if signature in seen:
            continue
        seen.add(signature)
        source = table_source(cfg)
        if source is None or source.cache.key in keys:
            continue
        keys.add(source.cache.key)
        cache = source.cache
        del source  # the driver needs only the key and the file: the shards build their own backbone
        _build(cfg, cache, storage)
        if uri is not None:
            _upload(cache, uri)
        tables.append(cache.path)
    return tables
