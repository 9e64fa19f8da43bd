"""Bottom-layer file helpers shared by every layer: cache root, file hashes, atomic writes, package data.

Nothing here imports a heavy framework, so every layer (config, go, data, train, sweep, cli) can use it.
Every file the platform writes goes through :func:`atomic_write`: a temporary file in the destination's
directory, then :func:`os.replace`, so a reader sees the old content or the complete new one, never a
half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "exclusive_lock",
    "fm_gene_vocabulary",
    "node_sha256_file",
    "package_data",
    "sha256_bytes",
    "sha256_file",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache root (simulated data, GO tables, graphs and masks).
CACHE_ENV = "PERTADAPT_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$PERTADAPT_CACHE`` (``~`` expanded) or ``~/.cache/pertadapt``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pertadapt"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def node_sha256_file(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file` of ``path``, computed once per node and remembered under ``$PERTADAPT_CACHE/hashes/``.

    The record is keyed by the absolute path and checked against the file's size, modification time and
    inode, so a changed file is hashed again. Concurrent callers (the ranks and trials of a node) serialise
    on an exclusive lock of the record: the first hashes, the others read its result.
    """
    p = Path(path).absolute()
    st = p.stat()
    stamp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    record = cache_dir() / "hashes" / f"{sha256_bytes(str(p))[:24]}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(record.with_suffix(".lock")):
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
        log.info("hashing %s (%d bytes)", p, st.st_size)
        digest = sha256_file(p)
        atomic_write_json(record, {**stamp, "sha256": digest})
        return digest


@contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if absent) for the ``with`` block.

    Without ``flock`` support (some network file systems) it logs a warning and goes on unlocked.
    """
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("no file lock on %s (%s): concurrent callers each do the work", lock_path, e)
        yield


def sha256_bytes(data: bytes | str) -> str:
    """SHA-256 hex digest of ``data`` (``str`` is UTF-8 encoded)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int | None = 0o644) -> Iterator[Path]:
    """A temporary file in ``path``'s directory for the ``with`` block to write, renamed onto ``path`` when the
    block ends without an error and removed when it raises (for writers that fill a file in steps, or from
    other processes: the frozen-FM table's shards).

    Parameters
    ----------
    path
        Destination; it either keeps its old content or gets the complete new one.
    mode
        Permission bits of the result (``mkstemp`` creates 0600 files; outputs are meant to be shared).
        ``None`` keeps what the block left.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if mode is not None:
            os.chmod(tmp_path, mode & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int | None = 0o644) -> None:
    """Write ``path`` via a temporary file in the same directory and an atomic rename (:func:`atomic_file`).

    Parameters
    ----------
    path
        Destination; it either keeps its old content or gets the complete new one.
    write
        Called with the temporary path; it must create the file there. If it raises, the temporary
        file is removed and the exception propagates.
    mode
        Permission bits of the result (``mkstemp`` creates 0600 files; outputs are meant to be shared).
        ``None`` keeps what ``write`` left.
    """
    with atomic_file(path, mode=mode) as tmp:
        write(tmp)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], obj: object, *, indent: int | None = 2,
                      sort_keys: bool = False) -> None:
    """Write ``obj`` as JSON atomically; values JSON cannot hold are written as their ``str``."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def package_data(*parts: str) -> Traversable:
    """A file or folder shipped inside the package (``pertadapt/resources/...``), wheel or checkout alike.

    Parameters
    ----------
    parts
        Path components below ``pertadapt/resources``, e.g. ``("configs", "demo.yaml")``.

    Returns
    -------
    importlib.resources.abc.Traversable
        Use ``.is_file()``, ``.read_text()``, ``.iterdir()``; ``Path(str(t))`` for an installed package.
    """
    node = resources.files("pertadapt").joinpath("resources")
    for part in parts:
        node = node.joinpath(part)
    return node


#: The 19,264-gene input vocabulary of AIDO.Cell and scFoundation, shipped as package data (one symbol a line).
FM_GENE_VOCAB_FILE = "fm_gene_vocab_19264.txt"


@cache
def fm_gene_vocabulary() -> tuple[str, ...]:
    """The 19,264-gene input vocabulary of AIDO.Cell and scFoundation in model order (read once per process)."""
    return tuple(line.strip() for line in package_data(FM_GENE_VOCAB_FILE).read_text().splitlines() if line.strip())
