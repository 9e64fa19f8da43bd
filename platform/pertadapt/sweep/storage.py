"""Where a sweep keeps what every node must read: Ray storage, the datasets, the caches.

The storage root is ``--storage`` (a filesystem path every node mounts at the same place: NFS, Lustre,
EFS, Filestore) or, by default, the sweep directory itself. Under it: ``ray/`` (Tune experiment state and
Ray Train checkpoints), ``data/`` (every dataset the trials read, placed there once by the driver) and,
when ``--storage`` is given and ``PERTADAPT_CACHE`` is not set, ``cache/`` (simulated data, GO masks).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pertadapt.config.errors import ConfigError
from pertadapt.files import sha256_bytes

__all__ = ["shared_data_path", "stage_data", "storage_root"]

log = logging.getLogger(__name__)


def storage_root(storage: str | None, sweep_dir: Path) -> Path:
    """The storage root for ``--storage`` (``None``: the sweep directory).

    Raises
    ------
    ConfigError
        For an object-store URI (``s3://``, ``gs://``, ...): run dirs are written by the workers as files,
        so the storage must be a mounted filesystem (mount the bucket, e.g. with s3fs or gcsfuse).
    """
    if storage is None:
        return sweep_dir.resolve()
    if "://" in storage:
        raise ConfigError(f"--storage: {storage!r}: object-store URIs are not supported; give a path that every node "
                          "mounts at the same place (NFS, EFS, Filestore, or the bucket mounted with s3fs/gcsfuse)")
    return Path(storage).expanduser().resolve()


def shared_data_path(source: Path, root: Path) -> Path:
    """Where the dataset ``source`` is placed under ``root/data`` (named by its file name and full path)."""
    source = source.resolve()
    return root / "data" / f"{source.stem}-{sha256_bytes(str(source))[:8]}{source.suffix}"


def stage_data(source: Path, target: Path) -> None:
    """Place ``source`` at ``target`` once: a hard link on the same filesystem, else a copy (temp, rename).

    A target with the source's size and modification time is kept as it is.
    """
    src = source.stat()
    if target.is_file():
        dst = target.stat()
        if (dst.st_size, dst.st_mtime_ns) == (src.st_size, src.st_mtime_ns):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)
    log.info("dataset %s → %s", source, target)
