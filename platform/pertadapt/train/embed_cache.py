"""Frozen-FM embedding cache: the backbone's per-gene embeddings of the control pool, computed once.

With a frozen foundation-model backbone, ``E = FM(x_ctrl)`` depends on the control cell only, and every
perturbed cell is paired with a control of the run's pool (``data.control_pool``). So the ``(pool, N, D)``
table over the N model genes (``model.gene_space: measured``: the backbone reads every gene of the file
and only the measured genes' rows are stored) is computed once, stored memory-mapped under ``$PERTADAPT_CACHE/fm_embeddings/`` as ``.npy``
(``backbone.cache_dtype``: float32, float16, or bfloat16 stored as its uint16 bit patterns) and reused by
every epoch, every evaluation and every trial with the same key. The model then looks rows up by the
control's pool position (:class:`~pertadapt.models.backbones.cached.CachedEmbeddings`).

Key
---
SHA-256 of: the backbone's weights (a hash of its state dict as built — for a random-init FM these are
the weights ``torch.manual_seed(seed)`` produced, so seed, sizes and init code are all in it), its class
and the source of the modules defining it, ``backbone.{name, hidden_size, layers, heads, input_mode}``,
the torch version, the data file's hash, the model gene order (so the gene space), the pool (size, seed and the cells themselves)
and the storage dtype. Any change gives another file name, so a stale table is never read.

Size
----
``pool × N × D × bytes`` (:func:`cache_bytes`; ``float16``/``bfloat16`` halve it). Before a build, and in
the sweep's ``--dry-run`` plan, :func:`check_cache_space` compares it with the cache disk's free space;
the build then reserves the whole file (``posix_fallocate``) before the first backbone forward. A table
that does not fit is a :class:`ConfigError` naming the bytes needed, the bytes free and the ways out
(``backbone.cache_dtype=bfloat16``, a smaller ``data.control_pool``, another ``PERTADAPT_CACHE``, or
``backbone.embedding_cache=off`` to recompute the backbone every step) — with ``auto`` as with ``on``:
``auto`` never falls back to recomputing silently.

Concurrency
-----------
A table is written to a temporary file in the cache directory, every block reserved first, and renamed into
place only when complete (:meth:`EmbeddingCache.building`), so a reader sees a complete file or none (a full
disk leaves no file at all). Builders of one key serialise on an exclusive ``flock`` of ``<file>.lock``: the
first builds, the others wait and then read its file (without ``flock``, on some network file systems, each
builds and the last rename wins — still never a partial read).

A sweep builds every table its trials read once, before any trial is queued, its pool rows sharded over the
cluster's workers (:mod:`pertadapt.sweep.tables`: Ray tasks, each :func:`fill_rows` on disjoint rows of the
one preallocated file), and on an object store uploads it once (:data:`TABLES_ENV`); its trials then open
it, after fetching it once per node from the store (:func:`fetch_table`). Outside a sweep (``pertadapt
train``) the run builds its table in one process; under DeepSpeed every rank calls
:func:`prepare_embedding_cache` before the engine exists, the first to take the lock builds and the others
wait on it.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pertadapt import remote
from pertadapt.config.components import AidoCellBackbone, FoundationModelBackbone
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.data.dataset import PerturbData, draw_control_pool
from pertadapt.files import (
    atomic_file,
    atomic_write_json,
    cache_dir,
    exclusive_lock,
    node_sha256_file,
    sha256_bytes,
    sha256_file,
)
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.train.fm_weights import local_checkpoint
from pertadapt.train.setup import gene_order_sha256, model_data

__all__ = ["CACHE_DTYPES", "CACHE_SUBDIR", "TABLES_ENV", "EmbeddingCache", "TableSource", "build_device",
           "cache_bytes", "cache_key_parts", "check_cache_space", "fetch_table", "fill_rows", "free_bytes", "open_or_build",
           "prepare_embedding_cache", "shard_ranges", "table_source", "weights_sha256"]

log = logging.getLogger(__name__)

#: ``backbone.cache_dtype`` → (stored NumPy dtype, torch dtype the embeddings are rounded to).
CACHE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
}
#: Folder of the tables under the cache root.
CACHE_SUBDIR = "fm_embeddings"
#: Environment variable naming the folder on the sweep's object store that holds the tables the sweep built
#: (set by the sweep's driver for every Ray worker): a run that does not find its table on its node fetches it
#: from there before it would build one.
TABLES_ENV = "PERTADAPT_FM_TABLES"
#: Bumped when the table layout or the key changes meaning.
_FORMAT = 1


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every state-dict tensor of ``module`` (in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _code_sha256(module: nn.Module) -> str:
    """SHA-256 of the source files of the platform classes ``module``'s class derives from (its forward code)."""
    files = sorted({inspect.getsourcefile(c) for c in type(module).__mro__ if c.__module__.startswith("pertadapt.")})
    return sha256_bytes("".join(f"{Path(f).name}:{sha256_file(f)}\n" for f in files))


def cache_key_parts(cfg: RunConfig, data_hashes: dict[str, str], pool: np.ndarray, backbone: nn.Module) -> dict:
    """Everything the cached table depends on (the key is their hash; also written next to the table).

    Parameters
    ----------
    cfg
        The run config (``backbone.*``, ``data.control_pool*``).
    data_hashes
        ``data_sha256`` and ``gene_order_sha256`` of the run's data (``RunData.hashes``).
    pool
        ``(pool,)`` cell indices of the control pool.
    backbone
        The backbone as built for this run (its weights are hashed).
    """
    b = cfg.backbone
    if not isinstance(b, FoundationModelBackbone):
        raise ValueError(f"backbone.name={b.name!r}: only a foundation model's embeddings are cached")
    return {
        "format": _FORMAT,
        "weights_sha256": weights_sha256(backbone),
        "backbone": {"name": b.name, "class": type(backbone).__qualname__, "code_sha256": _code_sha256(backbone),
                     "hidden_size": b.hidden_size, "layers": b.layers, "heads": b.heads,
                     "input_mode": b.input_mode if isinstance(b, AidoCellBackbone) else "code"},
        "torch": torch.__version__,
        "data_sha256": data_hashes["data_sha256"],
        "gene_order_sha256": data_hashes["gene_order_sha256"],
        "pool": {"size": cfg.data.control_pool, "seed": cfg.data.control_pool_seed, "n_cells": int(len(pool)),
                 "cells_sha256": sha256_bytes(np.asarray(pool, dtype="<i8").tobytes())},
        "dtype": b.cache_dtype,
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def cache_bytes(pool: int, n_genes: int, hidden_size: int, dtype: str = "float32") -> int:
    """Bytes of a ``(pool, n_genes, hidden_size)`` table stored as ``dtype`` (``backbone.cache_dtype``).

    The ``.npy`` header (128 bytes) is not counted. The ``--dry-run`` plan and the build both size the
    cache with this function.
    """
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"backbone.cache_dtype: expected one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    return int(pool) * int(n_genes) * int(hidden_size) * CACHE_DTYPES[dtype][0].itemsize


def _existing(directory: Path) -> Path:
    """``directory`` or its nearest existing ancestor (where the file system's free space is read)."""
    d = Path(directory).absolute()
    return next(p for p in (d, *d.parents) if p.exists())


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Free bytes of the file system ``directory`` is on (or would be on: its nearest existing ancestor's)."""
    return shutil.disk_usage(_existing(Path(directory))).free


def check_cache_space(directory: str | os.PathLike[str], shape: tuple[int, int, int], dtype: str) -> int:
    """Refuse a ``(pool, N, D)`` table of ``dtype`` that does not fit the free space of ``directory``.

    ``directory`` need not exist yet (the free space of its nearest existing ancestor is read), so the
    ``--dry-run`` plan can call this before anything is created.

    Returns
    -------
    int
        The table's bytes (:func:`cache_bytes`).

    Raises
    ------
    ConfigError
        Naming ``backbone.embedding_cache``, the bytes needed and their factors, the free bytes, and the
        ways out: a smaller storage dtype or control pool that fits, another cache disk, or
        ``backbone.embedding_cache=off`` to recompute the backbone every step knowingly.
    """
    nbytes = cache_bytes(*shape, dtype)
    free = free_bytes(directory)
    if nbytes > free:
        raise ConfigError(_no_space_message(Path(directory), shape, dtype, nbytes, free))
    return nbytes


def _no_space_message(directory: Path, shape: tuple[int, int, int], dtype: str, nbytes: int, free: int) -> str:
    pool, n, d = shape
    item = CACHE_DTYPES[dtype][0].itemsize
    fits = free // max(1, n * d * 2)  # pool cells that fit at 2 bytes a value
    return (f"backbone.embedding_cache: the frozen-FM embedding cache needs {nbytes} bytes ({_gb(nbytes)}: pool "
            f"{pool} × {n} genes × {d} dims × {item} B {dtype}) but {directory} has {free} bytes "
            f"({_gb(free)}) free. Make it fit: backbone.cache_dtype=bfloat16 "
            f"({_gb(cache_bytes(pool, n, d, 'bfloat16'))}) and/or data.control_pool={fits} or fewer cells "
            f"(or PERTADAPT_CACHE on a larger disk); or set backbone.embedding_cache=off to recompute the "
            "backbone every step (no cache; many times slower per step)")


class EmbeddingCache:
    """One key's table: where it lives, its shape, and whether it is already built.

    Parameters
    ----------
    parts
        :func:`cache_key_parts`; the key is the first 24 hex digits of their SHA-256.
    shape
        ``(pool, N, D)``.
    root
        Cache folder (default ``$PERTADAPT_CACHE/fm_embeddings``).
    """

    def __init__(self, parts: dict, shape: tuple[int, int, int], root: Path | None = None) -> None:
        self.parts, self.shape = parts, tuple(int(s) for s in shape)
        self.key = sha256_bytes(json.dumps(parts, sort_keys=True))[:24]
        self.dtype_name = parts["dtype"]
        self.np_dtype, self.torch_dtype = CACHE_DTYPES[self.dtype_name]
        self.root = root or cache_dir() / CACHE_SUBDIR
        self.path = self.root / f"{parts['backbone']['name']}-{self.key}.npy"
        self.nbytes = cache_bytes(*self.shape, self.dtype_name)

    @property
    def size_text(self) -> str:
        """``pool × genes × dim × bytes = size``."""
        pool, n, d = self.shape
        item = self.np_dtype.itemsize
        return f"pool {pool} × {n} genes × {d} dims × {item} B ({self.dtype_name}) = {_gb(self.nbytes)}"

    def open(self) -> np.ndarray | None:
        """The stored table as a read-only memory map, or ``None`` when it is absent or does not fit the key."""
        if not self.path.is_file():
            return None
        try:
            table = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            log.warning("embedding cache %s is unreadable (%s); rebuilding it", self.path, e)
            return None
        if table.shape != self.shape or table.dtype != self.np_dtype:
            log.warning("embedding cache %s holds %s %s, expected %s %s; rebuilding it", self.path, table.shape,
                        table.dtype, self.shape, self.np_dtype)
            return None
        return table

    def _preallocate(self, tmp: Path) -> None:
        """Reserve every block of the (sparse) file ``tmp`` now, so a full disk fails here and not mid-build.

        Raises
        ------
        ConfigError
            When the file system has no room for the whole table (the caller removes ``tmp``).
        """
        size = tmp.stat().st_size
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ConfigError(_no_space_message(self.root, self.shape, self.dtype_name, self.nbytes,
                                                    shutil.disk_usage(self.root).free)) from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("%s: cannot preallocate the embedding cache (%s); a full disk may fail mid-build", tmp, e)
        finally:
            os.close(fd)

    @contextmanager
    def building(self) -> Iterator[Path | None]:
        """Under the key's lock: ``None`` when the table is already stored (perhaps by another process while
        this one waited), else the table's temporary file, every block reserved (``posix_fallocate``), for
        the ``with`` block to fill. It is renamed into place (and the key's ``.json`` written) when the block
        ends without an error and removed otherwise, so a reader sees a complete table or none.

        Raises
        ------
        ConfigError
            When the table does not fit the cache's file system (:func:`check_cache_space`, then the
            preallocation), before anything is computed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path.with_name(self.path.name + ".lock")):
            if self.open() is not None:
                yield None
                return
            check_cache_space(self.root, self.shape, self.dtype_name)
            with atomic_file(self.path) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=self.np_dtype, shape=self.shape).flush()
                self._preallocate(tmp)
                yield tmp
            atomic_write_json(self.path.with_suffix(".json"), {"key": self.key, "shape": list(self.shape),
                                                              "stored_dtype": str(self.np_dtype), **self.parts})

    def write(self, backbone: nn.Module, data: PerturbData, pool: np.ndarray, *, batch_size: int,
              device: torch.device) -> bool:
        """Build the table in this process: run ``backbone`` over the whole pool into the file
        (:meth:`building`, :func:`fill_rows`); a full disk is a :class:`ConfigError` before any backbone
        forward and leaves no file behind.

        Returns
        -------
        bool
            ``False`` when another process had stored it meanwhile (nothing computed).
        """
        with self.building() as tmp:
            if tmp is None:
                return False
            log.info("building the frozen-FM embedding cache %s", self.path)
            fill_rows(TableSource(self, backbone, data, pool), tmp, 0, len(pool), batch_size=batch_size,
                      device=device)
        return True


@dataclass(frozen=True)
class TableSource:
    """What one table is computed from.

    Attributes
    ----------
    cache
        The table (key, path, shape).
    backbone
        The frozen backbone as a run builds it (seeded with the run's seed).
    data
        The run's data over the model genes (``data.columns``: the model genes among the backbone's inputs).
    pool
        ``(pool,)`` cell indices of the control pool; row ``i`` of the table is cell ``pool[i]``.
    """

    cache: EmbeddingCache
    backbone: nn.Module
    data: PerturbData
    pool: np.ndarray


def table_source(cfg: RunConfig, *, root: Path | None = None) -> TableSource | None:
    """The table a run of ``cfg`` reads, built exactly as the run builds it (:func:`pertadapt.train.run.
    build_run_engine`: the data, its control pool, the backbone seeded with ``cfg.seed``), without the GO
    graph or the model; ``None`` when ``cfg`` uses no table (a baseline, no frozen FM, or ``embedding_cache:
    off``).

    Parameters
    ----------
    cfg
        The run config, ``data.path`` in (a sweep's trial config).
    root
        Folder of the tables (default ``$PERTADAPT_CACHE/fm_embeddings``).
    """
    from pertadapt.train.run import seed_everything

    b = cfg.backbone
    if cfg.is_baseline or not (isinstance(b, FoundationModelBackbone) and b.wants_embedding_cache):
        return None
    path, full, _, data = model_data(cfg)
    pool = draw_control_pool(data, cfg.data.control_pool, cfg.data.control_pool_seed)
    seed_everything(cfg.seed)
    backbone = build_backbone(local_checkpoint(cfg).backbone, genes=full.genes,  # build_backbone_for's
                              width=cfg.model.hidden_size)
    hashes = {"data_sha256": node_sha256_file(path), "gene_order_sha256": gene_order_sha256(data.genes)}
    cache = EmbeddingCache(cache_key_parts(cfg, hashes, pool, backbone),
                           (len(pool), len(data.genes), backbone.hidden_size), root)
    return TableSource(cache, backbone, data, pool)


def shard_ranges(rows: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of ``shards`` shards (fewer when there are fewer batches), contiguous, disjoint,
    covering ``range(rows)``, each starting at a multiple of ``batch_size``: every shard runs the very batches a
    single-process build runs, so the table's bytes do not depend on the number of shards."""
    batches = math.ceil(rows / batch_size)
    shards = max(1, min(shards, batches))
    edges = [round(i * batches / shards) * batch_size for i in range(shards + 1)]
    return [(a, min(b, rows)) for a, b in itertools.pairwise(edges) if a < rows]


def fill_rows(source: TableSource, tmp: Path, start: int, stop: int, *, batch_size: int,
              device: torch.device) -> tuple[int, int]:
    """Run the backbone over pool rows ``[start, stop)`` (``batch_size`` cells at a time from ``start``, no grad,
    eval mode) into those rows of the table file ``tmp`` (a ``.npy`` of the table's shape and dtype, opened
    ``r+``: other shards write other rows of it at the same time).

    The global RNG state is left as it was, so a run's later seeded initialisation is the same with or without
    a build.

    Returns
    -------
    tuple
        ``(start, stop)``, the rows written.
    """
    cache, data, pool = source.cache, source.data, source.pool
    out = np.lib.format.open_memmap(tmp, mode="r+")
    if out.shape != cache.shape or out.dtype != cache.np_dtype:
        raise ValueError(f"{tmp}: holds {out.shape} {out.dtype}, expected the table's {cache.shape} {cache.np_dtype}")
    fm = source.backbone.to(device)
    fm.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for a in range(start, stop, batch_size):
            cells = pool[a: min(a + batch_size, stop)]
            x = torch.from_numpy(data.input_rows(cells).toarray().astype(np.float32)).to(device)
            total = torch.from_numpy(data.total_count[cells]).to(device)
            e = fm.encode(x, total)
            if data.columns is not None:  # the model genes only (model.gene_space: measured)
                e = e.index_select(1, torch.from_numpy(data.columns).to(device))
            e = e.float().cpu().to(cache.torch_dtype)
            if cache.dtype_name == "bfloat16":  # stored as its bit patterns
                e = e.view(torch.uint16)
            out[a: a + len(cells)] = e.numpy()
    out.flush()
    del out
    return start, stop


def fetch_table(cache: EmbeddingCache) -> bool:
    """Copy the table of ``cache`` from the sweep's object store (:data:`TABLES_ENV`) to its place on this node,
    once per node (:func:`pertadapt.remote.localize`'s lock); ``False`` when no store is named or it lacks
    the table."""
    folder = os.environ.get(TABLES_ENV)
    if not folder:
        return False
    uri = remote.join(folder, cache.path.name)
    if remote.size(uri) is None:
        return False
    cache.root.mkdir(parents=True, exist_ok=True)
    remote.localize(uri, cache.path)
    return True


def open_or_build(cache: EmbeddingCache, backbone: nn.Module, data: PerturbData, pool: np.ndarray, *,
                  batch_size: int, device: torch.device) -> tuple[np.ndarray, bool, float]:
    """The table of ``cache``: read if stored (or fetched from the sweep's object store), else built in this
    process (after the free-space check) under the key's lock.

    Returns
    -------
    tuple
        ``(table, hit, build_seconds)``: the read-only memory map, whether it was already stored, and the
        seconds the build took (0 on a hit).

    Raises
    ------
    ConfigError
        When the table does not fit on the cache's file system (:func:`check_cache_space`, then the
        preallocation of the file).
    """
    table = cache.open()
    if table is None and fetch_table(cache):
        table = cache.open()
    if table is not None:
        return table, True, 0.0
    t0 = time.perf_counter()
    built = cache.write(backbone, data, pool, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - t0 if built else 0.0
    table = cache.open()
    if table is None:
        raise OSError(f"{cache.path}: the embedding cache was written but cannot be read back")
    return table, not built, seconds


def build_device(cfg: RunConfig) -> torch.device:
    """Where this process runs the backbone for a build: its GPU (``LOCAL_RANK``) when training on GPUs, else CPU."""
    if cfg.engine.on_gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def prepare_embedding_cache(cfg: RunConfig, data: PerturbData, data_hashes: dict[str, str], pool: np.ndarray,
                            backbone: nn.Module, *, root: Path | None = None
                            ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The run's embedding table when ``backbone.embedding_cache`` asks for one, and what to record about it.

    Parameters
    ----------
    cfg
        The run config.
    data, data_hashes, pool
        The run's data, its ``data_sha256`` / ``gene_order_sha256``, and the control pool's cell indices.
    backbone
        The frozen backbone as built for the run (run over the pool on a miss, hashed always).
    root
        Folder of the tables (default ``$PERTADAPT_CACHE/fm_embeddings``).

    Returns
    -------
    tuple
        ``(table or None, provenance)``: the ``(pool, N, D)`` memory map (``None``: recompute the backbone)
        and ``used``, ``key``, ``path``, ``hit``, ``bytes``, ``shape``, ``dtype``, ``build_s``,
        ``weights_sha256`` (or ``used: false`` and the ``reason``).

    Raises
    ------
    ConfigError
        When the table does not fit on disk, with ``embedding_cache`` ``on`` or ``auto`` alike: ``auto``
        never falls back to recomputing the backbone every step (only ``off`` does that).
    """
    b = cfg.backbone
    if not isinstance(b, FoundationModelBackbone):
        return None, {"used": False, "reason": f"backbone.name={b.name} is not a foundation model"}
    if not b.wants_embedding_cache:
        return None, {"used": False, "reason": f"backbone.embedding_cache={b.embedding_cache}"
                      + ("" if b.embedding_cache == "off" else " and the backbone is not a frozen FM")}
    parts = cache_key_parts(cfg, data_hashes, pool, backbone)
    cache = EmbeddingCache(parts, (len(pool), len(data.genes), backbone.hidden_size), root)
    log.info("frozen-FM embedding cache %s: %s", cache.path, cache.size_text)
    table, hit, seconds = open_or_build(cache, backbone, data, pool, batch_size=cfg.eval.batch_size,
                                        device=build_device(cfg))
    log.info("embedding cache %s: %s", "hit" if hit else f"built in {seconds:.1f} s", cache.path)
    return table, {"used": True, "key": cache.key, "path": str(cache.path), "hit": hit, "bytes": cache.nbytes,
                   "shape": list(cache.shape), "dtype": cache.dtype_name, "build_s": seconds,
                   "weights_sha256": parts["weights_sha256"]}
