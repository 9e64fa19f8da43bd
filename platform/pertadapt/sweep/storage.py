"""Where a sweep keeps what every node must read: Ray storage, the datasets, the caches, the run directories.

The storage root is ``--storage``: a filesystem path every node mounts at the same place (NFS, Lustre, EFS,
Filestore), an object-store URI (``s3://bucket/prefix``, ``gs://...``, any URI :mod:`pyarrow.fs` opens), or,
by default, the sweep directory itself. Under it: ``ray/`` (Tune experiment state and Ray Train
checkpoints), ``data/`` (every dataset the trials read, placed there once by the driver) and, on a shared
path when ``PERTADAPT_CACHE`` is not set, ``cache/`` (simulated data, GO masks). On an object store the run
directories live there too (``runs/``, ``hpo/``; worked on in node-local copies, see
:class:`pertadapt.rundir.RunDir`) and the driver copies them, checkpoints aside, into the sweep directory
when the trials end; caches stay node-local.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pertadapt import remote
from pertadapt.config.errors import ConfigError
from pertadapt.files import sha256_bytes

__all__ = ["RUN_TREES", "check_storage", "clear_storage", "shared_data_path", "stage_data", "storage_root"]

log = logging.getLogger(__name__)

#: Folders of run directories under the storage root (object stores only): grid/final trials, HPO trials.
RUN_TREES = ("runs", "hpo")


def storage_root(storage: str | None, sweep_dir: Path) -> str:
    """The storage root for ``--storage`` (``None``: the sweep directory): an absolute path or a URI."""
    if storage is None:
        return str(sweep_dir.resolve())
    if remote.is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())


def check_storage(root: str) -> None:
    """Refuse an object store this process cannot write (before anything expensive starts).

    Raises
    ------
    ConfigError
        Naming ``--storage``, the URI and what the store answered (no bucket, no credentials, no endpoint).
    """
    if not remote.is_uri(root):
        return
    target = remote.join(root, f".pertadapt-probe-{os.getpid()}")
    try:
        remote.write_bytes(target, b"pertadapt storage check\n")
        remote.delete(target)
    except remote.StorageError as e:
        raise ConfigError(f"--storage: cannot write to {root}: {e} (credentials and endpoint come from this "
                          "shell's environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL "
                          "or GOOGLE_APPLICATION_CREDENTIALS)") from e


def clear_storage(root: str, sweep_dir: Path) -> None:
    """``--overwrite``: remove a sweep's Ray state and (object store) run directories from its storage root."""
    if remote.is_uri(root):
        for name in ("ray", *RUN_TREES):
            remote.delete(remote.join(root, name))
    elif Path(root) != sweep_dir.resolve():
        shutil.rmtree(Path(root) / "ray", ignore_errors=True)


def shared_data_path(source: Path, root: str) -> str:
    """Where the dataset ``source`` is placed under ``root/data`` (named by its file name and full path)."""
    source = source.resolve()
    return remote.under(root, "data", f"{source.stem}-{sha256_bytes(str(source))[:8]}{source.suffix}")


def stage_data(source: Path, target: str) -> None:
    """Place ``source`` at ``target`` once: on a path, a hard link on the same filesystem, else a copy (temp,
    rename); on an object store, an upload.

    A target of the source's size (object store) or size and modification time (path) is kept as it is.
    """
    src = source.stat()
    if remote.is_uri(target):
        if remote.size(target) != src.st_size:
            remote.upload_file(source, target)
            log.info("dataset %s → %s", source, target)
        return
    dest = Path(target)
    if dest.is_file():
        dst = dest.stat()
        if (dst.st_size, dst.st_mtime_ns) == (src.st_size, src.st_mtime_ns):
            return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, dest)
    log.info("dataset %s → %s", source, dest)
