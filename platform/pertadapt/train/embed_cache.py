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

Concurrency
-----------
The table is written to a temporary file in the cache directory and renamed into place, so a reader
sees a complete file or none. Builders of one key serialise on an exclusive ``flock`` of
``<file>.lock``: the first builds, the others wait and then read its file. Under DeepSpeed every rank
calls :func:`prepare_embedding_cache` before the engine exists, so the first rank to take the lock builds
the whole table and the others wait on the lock (no sharding; no process group is needed). Without
``flock`` (some network file systems) each builder builds and the last rename wins — still never a
partial read.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pertadapt.config.components import AidoCellBackbone, FoundationModelBackbone
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.data.dataset import PerturbData
from pertadapt.files import atomic_write, atomic_write_json, cache_dir, sha256_bytes, sha256_file

__all__ = ["CACHE_DTYPES", "CACHE_SUBDIR", "EmbeddingCache", "build_device", "cache_key_parts", "open_or_build",
           "prepare_embedding_cache", "require_space", "weights_sha256"]

log = logging.getLogger(__name__)

#: ``backbone.cache_dtype`` → (stored NumPy dtype, torch dtype the embeddings are rounded to).
CACHE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16),
}
#: Folder of the tables under the cache root.
CACHE_SUBDIR = "fm_embeddings"
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


def require_space(directory: Path, nbytes: int, what: str) -> None:
    """Refuse to build a table of ``nbytes`` when ``directory``'s file system has less free space.

    Raises
    ------
    ConfigError
        Naming ``backbone.embedding_cache``, the size and its factors (``what``), and what to change.
    """
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise ConfigError(f"backbone.embedding_cache: the embedding cache needs {_gb(nbytes)} ({what}) but "
                          f"{directory} has {_gb(free)} free; set data.control_pool to fewer cells, "
                          "backbone.cache_dtype to float16 or bfloat16, PERTADAPT_CACHE to a larger disk, or "
                          "backbone.embedding_cache=off")


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
        self.nbytes = math.prod(self.shape) * self.np_dtype.itemsize

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

    def write(self, backbone: nn.Module, data: PerturbData, pool: np.ndarray, *, batch_size: int,
              device: torch.device) -> None:
        """Run ``backbone`` over the pool (``batch_size`` cells at a time, no grad, eval mode) into the file.

        The global RNG state is left as it was, so a run's later seeded initialisation is the same with
        or without a build.
        """
        def fill(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.np_dtype, shape=self.shape)
            fm = backbone.to(device)
            fm.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for start in range(0, len(pool), batch_size):
                    cells = pool[start: start + batch_size]
                    x = torch.from_numpy(data.input_rows(cells).toarray().astype(np.float32)).to(device)
                    total = torch.from_numpy(data.total_count[cells]).to(device)
                    e = fm.encode(x, total)
                    if data.columns is not None:  # the model genes only (model.gene_space: measured)
                        e = e.index_select(1, torch.from_numpy(data.columns).to(device))
                    e = e.float().cpu().to(self.torch_dtype)
                    if self.dtype_name == "bfloat16":  # stored as its bit patterns
                        e = e.view(torch.uint16)
                    out[start: start + len(cells)] = e.numpy()
            out.flush()
            del out

        atomic_write(self.path, fill)
        atomic_write_json(self.path.with_suffix(".json"), {"key": self.key, "shape": list(self.shape),
                                                          "stored_dtype": str(self.np_dtype), **self.parts})


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if absent); without ``flock`` support, go on unlocked."""
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("no file lock on %s (%s): concurrent builders of this key each build it", lock_path, e)
        yield


def open_or_build(cache: EmbeddingCache, backbone: nn.Module, data: PerturbData, pool: np.ndarray, *,
                  batch_size: int, device: torch.device) -> tuple[np.ndarray, bool, float]:
    """The table of ``cache``: read if stored, else built (after the free-space check) under the key's lock.

    Returns
    -------
    tuple
        ``(table, hit, build_seconds)``: the read-only memory map, whether it was already stored, and the
        seconds the build took (0 on a hit).

    Raises
    ------
    ConfigError
        When the table would not fit on the cache's file system (:func:`require_space`).
    """
    table = cache.open()
    if table is not None:
        return table, True, 0.0
    cache.root.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache.path.with_name(cache.path.name + ".lock")):
        table = cache.open()  # built by another process while this one waited
        if table is not None:
            return table, True, 0.0
        require_space(cache.root, cache.nbytes, cache.size_text)
        log.info("building the frozen-FM embedding cache %s", cache.path)
        t0 = time.perf_counter()
        cache.write(backbone, data, pool, batch_size=batch_size, device=device)
        seconds = time.perf_counter() - t0
        table = cache.open()
    if table is None:
        raise OSError(f"{cache.path}: the embedding cache was written but cannot be read back")
    return table, False, seconds


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
        With ``embedding_cache: on``, when the table does not fit on disk (``auto`` logs it and recomputes).
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
    try:
        table, hit, seconds = open_or_build(cache, backbone, data, pool, batch_size=cfg.eval.batch_size,
                                            device=build_device(cfg))
    except ConfigError as e:
        if b.embedding_cache == "on":
            raise
        log.warning("%s; recomputing the backbone every step instead (backbone.embedding_cache=auto)", e)
        return None, {"used": False, "reason": str(e), "key": cache.key, "bytes": cache.nbytes}
    log.info("embedding cache %s: %s", "hit" if hit else f"built in {seconds:.1f} s", cache.path)
    return table, {"used": True, "key": cache.key, "path": str(cache.path), "hit": hit, "bytes": cache.nbytes,
                   "shape": list(cache.shape), "dtype": cache.dtype_name, "build_s": seconds,
                   "weights_sha256": parts["weights_sha256"]}
