"""Sweep storage on an object store (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``): files in and out through
:mod:`pyarrow.fs`, the filesystem layer Ray's own storage uses.

An object store is not a filesystem the workers can write into, so a run directory whose home is a URI is
worked on in a node-local copy (:class:`pertadapt.rundir.RunDir`: pulled before a process writes into it,
committed after); a dataset on a URI is read from a node-local copy (:func:`localize`), a checkpoint directory
from one checked before it is kept (:func:`localize_tree`), each fetched once per node. Credentials and endpoints
come from each process's environment, as pyarrow reads them
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
...); nothing here writes them anywhere.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pertadapt.files import atomic_write, cache_dir, exclusive_lock, sha256_bytes

__all__ = ["StorageError", "delete", "download_file", "exists", "is_uri", "join", "list_dir", "list_files",
           "localize", "localize_tree", "pull_tree", "push_tree", "size", "under", "upload_file", "upload_once",
           "write_bytes"]

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(OSError):
    """An object-store operation failed (names the URI and what pyarrow said)."""


def is_uri(location: str | os.PathLike[str] | None) -> bool:
    """Whether ``location`` names an object store (``scheme://...``; ``file://`` is a plain path)."""
    return isinstance(location, str) and bool(_SCHEME.match(location)) and not location.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, ``/``-separated (any ``?query`` stays at the end)."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + (sep + query)


def under(root: str, *parts: str) -> str:
    """``parts`` below ``root``, a URI (:func:`join`) or a filesystem path."""
    return join(root, *parts) if is_uri(root) else str(Path(root, *parts))


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # unknown scheme, no credentials, unreachable endpoint
        raise StorageError(f"{uri}: {e}") from e


def _call(uri: str, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as e:
        raise StorageError(f"{uri}: {what} failed: {str(e).splitlines()[0]}") from e


def exists(uri: str) -> bool:
    """Whether ``uri`` names a file or a directory (prefix) on its store."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return _call(uri, "stat", fs.get_file_info, path).type != pafs.FileType.NotFound


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under the directory ``uri``, sorted (``[]`` when there is none)."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    infos = _call(uri, "listing", fs.get_file_info, pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def list_dir(uri: str) -> list[str]:
    """Names of the entries (files and directories) directly under ``uri``, sorted; ``[]`` when there is none."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    infos = _call(uri, "listing", fs.get_file_info, pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def upload_file(local: Path, uri: str) -> None:
    """Copy the file ``local`` to ``uri`` (an object appears only once it is complete)."""
    fs, path = _fs(uri)

    def put() -> None:
        with local.open("rb") as src, fs.open_output_stream(path) as dst:
            while block := src.read(1 << 22):
                dst.write(block)

    _call(uri, "upload", put)


def upload_once(local: Path, uri: str) -> bool:
    """Upload the file ``local`` to ``uri`` unless the store holds an object of its size there.

    Returns
    -------
    bool
        Whether it was uploaded.
    """
    if size(uri) == local.stat().st_size:
        return False
    upload_file(local, uri)
    return True


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` as the object ``uri``."""
    fs, path = _fs(uri)

    def put() -> None:
        with fs.open_output_stream(path) as dst:
            dst.write(data)

    _call(uri, "write", put)


def download_file(uri: str, local: Path) -> None:
    """Copy ``uri`` to the file ``local`` (temporary file, then rename: never half-written)."""
    fs, path = _fs(uri)

    def get(tmp: Path) -> None:
        with fs.open_input_stream(path) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)

    _call(uri, "download", atomic_write, local, get)


def delete(uri: str) -> None:
    """Remove the file or directory ``uri`` (nothing when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    kind = _call(uri, "stat", fs.get_file_info, path).type
    if kind == pafs.FileType.File:
        _call(uri, "delete", fs.delete_file, path)
    elif kind == pafs.FileType.Directory:
        _call(uri, "delete", fs.delete_dir, path)


def push_tree(local: Path, uri: str, *, since: dict[str, tuple[int, int]] | None = None) -> int:
    """Upload every file under ``local`` to the same relative path under ``uri``.

    Parameters
    ----------
    local, uri
        Source directory and destination prefix.
    since
        relative path → (size, mtime_ns) of what was pushed last; files unchanged since are skipped, and the
        dict is updated.

    Returns
    -------
    int
        Files uploaded.
    """
    n = 0
    for p in sorted(q for q in local.rglob("*") if q.is_file() and not q.name.endswith(".tmp")):
        rel = p.relative_to(local).as_posix()
        st = p.stat()
        if since is not None and since.get(rel) == (st.st_size, st.st_mtime_ns):
            continue
        upload_file(p, join(uri, rel))
        if since is not None:
            since[rel] = (st.st_size, st.st_mtime_ns)
        n += 1
    return n


def pull_tree(uri: str, local: Path, *, skip: Iterable[str] = ()) -> int:
    """Download every file under ``uri`` into ``local`` (same relative paths; local files not on the store stay).

    Parameters
    ----------
    skip
        Folder names whose files are not downloaded, at any depth (e.g. ``ckpt``).

    Returns
    -------
    int
        Files downloaded.
    """
    skip = set(skip)
    n = 0
    for rel in list_files(uri):
        if skip & set(rel.split("/")[:-1]):
            continue
        download_file(join(uri, rel), local / rel)
        n += 1
    return n


def localize(uri: str, local: Path | None = None) -> Path:
    """A node-local copy of the file ``uri``, downloaded when missing or when the store's size differs.

    Concurrent callers on one node (ranks, trials) serialise on an exclusive lock next to the copy: the
    first downloads it, the others wait and reuse it, so the object is fetched once per node.

    Parameters
    ----------
    uri
        The file on its store.
    local
        Where the copy goes (default: under ``$PERTADAPT_CACHE/remote/``, named by the URI's hash).

    Raises
    ------
    FileNotFoundError
        When ``uri`` is no file on its store.
    """
    info = _stat_file(uri)
    local = local or cache_dir() / "remote" / sha256_bytes(uri)[:16] / Path(info.path).name

    def fetch() -> None:
        log.info("fetching %s → %s", uri, local)
        download_file(uri, local)

    _once_per_node(local, lambda: local.is_file() and local.stat().st_size == info.size, fetch)
    return local


def localize_tree(uri: str, local: Path, *, check: Callable[[Path], None] | None = None) -> Path:
    """A node-local copy of the directory ``uri`` at ``local``, fetched once per node (as :func:`localize`).

    The files are downloaded into a temporary sibling of ``local``, handed to ``check`` and only then renamed
    to ``local``; a directory already at ``local`` is used as it is, so ``local`` must be named by what it
    holds (a content digest).

    Parameters
    ----------
    uri
        The directory (prefix) on its store.
    local
        Where the copy goes.
    check
        Called with the downloaded directory before it is put in place; what it raises refuses the copy
        (nothing is left on the node, and the next call downloads again).

    Raises
    ------
    FileNotFoundError
        When ``uri`` holds no file on its store.
    """

    def fetch() -> None:
        for stale in local.parent.glob(f".{local.name}.tmp-*"):  # left by a killed fetch (fetches hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        log.info("fetching %s → %s", uri, local)
        try:
            if pull_tree(uri, tmp) == 0:
                raise FileNotFoundError(f"{uri}: no such directory on its store")
            if check is not None:
                check(tmp)
            tmp.rename(local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    _once_per_node(local, local.is_dir, fetch)
    return local


def _once_per_node(local: Path, present: Callable[[], bool], fetch: Callable[[], None]) -> None:
    """``fetch()`` unless ``present()``, once per node: concurrent callers (ranks, trials) serialise on an
    exclusive lock next to ``local``; the first fetches, the others wait and find it present."""
    if present():
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(local.with_name(local.name + ".lock")):
        if not present():
            fetch()


def size(uri: str) -> int | None:
    """The size in bytes of the file ``uri``; ``None`` when it is no file on its store."""
    try:
        return int(_stat_file(uri).size)
    except FileNotFoundError:
        return None


def _stat_file(uri: str) -> Any:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    info = _call(uri, "stat", fs.get_file_info, path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file on its store")
    return info
