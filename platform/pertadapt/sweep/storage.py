"""Where a sweep keeps what every node must read: Ray storage, the datasets, the caches, the run directories.

The storage root is ``--storage``: a filesystem path every node mounts at the same place (NFS, Lustre, EFS,
Filestore), an object-store URI (``s3://bucket/prefix``, ``gs://...``, any URI :mod:`pyarrow.fs` opens), or,
by default, the sweep directory itself. Under it: ``ray/`` (Tune experiment state and Ray Train
checkpoints), ``data/`` (every dataset the trials read, placed there once by the driver) and, on a shared
path when ``PERTADAPT_CACHE`` is not set, ``cache/`` (simulated data, GO masks). On an object store the run
directories live there too (``runs/``, ``hpo/``; worked on in node-local copies, see
:class:`pertadapt.rundir.RunDir`) and the driver copies them, checkpoints aside, into the sweep directory
when the trials end; caches stay node-local, except the frozen-FM embedding tables, uploaded once under
``cache/fm_embeddings/`` (:mod:`pertadapt.sweep.tables`), and the FM checkpoints the driver pretrained
(``backbone.pretrain``), uploaded once under ``cache/checkpoints/<weights SHA-256>/`` (:func:`stage_checkpoint`),
each fetched by each node that needs it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pertadapt import remote
from pertadapt.config.errors import ConfigError
from pertadapt.files import sha256_bytes

__all__ = ["RUN_TREES", "check_storage", "check_storage_on_worker", "clear_storage", "shared_data_path",
           "stage_checkpoint", "stage_data", "storage_root"]

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


def _write_probe(root: str) -> None:
    """Write and delete a probe object under ``root`` (raises :class:`pertadapt.remote.StorageError`)."""
    target = remote.join(root, f".pertadapt-probe-{os.getpid()}")
    remote.write_bytes(target, b"pertadapt storage check\n")
    remote.delete(target)


def check_storage(root: str) -> None:
    """Refuse an object store this process cannot write (before anything expensive starts).

    Raises
    ------
    ConfigError
        Naming ``--storage``, the URI and what the store answered (no bucket, no credentials, no endpoint).
    """
    if not remote.is_uri(root):
        return
    try:
        _write_probe(root)
    except remote.StorageError as e:
        raise ConfigError(f"--storage: cannot write to {root}: {e} (credentials and endpoint come from this "
                          "shell's environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL "
                          "or GOOGLE_APPLICATION_CREDENTIALS)") from e


def _probe_on_node(root: str) -> str:
    """The Ray task of :func:`check_storage_on_worker`: :func:`_write_probe` there; that node's IP address."""
    import ray

    _write_probe(root)
    return ray.util.get_node_ip_address()


def check_storage_on_worker(root: str) -> str | None:
    """Refuse an object store that a worker node cannot write (Ray must be up: call after ``ray.init``).

    The probe of :func:`check_storage` runs again as a Ray task on an alive node other than the driver's
    (the head, on a cluster), with that node's own credentials (instance profile, service account,
    environment), since trials write their run directories and checkpoints from there.

    Returns
    -------
    str or None
        The IP address of the node that was checked; ``None`` when ``root`` is a path or there is no other node.

    Raises
    ------
    ConfigError
        Naming ``--storage``, the URI, the node and what the store answered.
    """
    if not remote.is_uri(root):
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        log.info("--storage: no node besides the driver's; the driver's check stands for the workers")
        return None
    node = max(others, key=lambda n: n["Resources"].get("GPU", 0.0) + n["Resources"].get("CPU", 0.0))
    task = ray.remote(num_cpus=0, max_retries=0)(_probe_on_node).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
    try:
        return ray.get(task.remote(root))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, remote.StorageError) else e
        raise ConfigError(f"--storage: worker node {node['NodeManagerAddress']} cannot write to {root}: {cause} "
                          "(every node needs its own credentials: the workers' IAM instance profile on AWS, their "
                          "service account on GCP, or the keys in each node's environment)") from None


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
        if remote.upload_once(source, target):
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


def stage_checkpoint(directory: Path, sha256: str, root: str) -> str:
    """Where every node loads the checkpoint ``directory`` (weights SHA-256 ``sha256``) from.

    On an object store, its files (``config.json``, the weights, ``genes.txt``, the model card; folders
    such as a pretraining's ``resume/`` are not) are uploaded once to ``<root>/cache/checkpoints/<sha256>/``,
    a key named by the weights' digest: a file the store holds at its size is kept. A trial loads it from a
    node-local copy fetched once per node and checked against ``sha256``
    (:func:`pertadapt.train.fm_weights.local_checkpoint`). On a path, the directory itself (every node
    sees it where the driver's cache is shared).

    Returns
    -------
    str
        The checkpoint's URI on the store, or ``directory`` as it is.
    """
    if not remote.is_uri(root):
        return str(directory)
    target = remote.under(root, "cache", "checkpoints", sha256)
    for f in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        if remote.upload_once(f, remote.join(target, f.name)):
            log.info("FM checkpoint %s → %s", f, remote.join(target, f.name))
    return target
