"""One sweep per directory: an exclusive lock on ``<sweep dir>/sweep.lock`` for as long as a sweep runs.

The lock is a ``flock`` on the lock file, so the kernel (or, on NFS, the server's lock manager) releases it
when the process holding it ends, however it ends (a SIGKILL, an OOM kill): a lock never outlives its holder
on one host. On a shared file system (NFSv4) a lock held by a host that is lost is released by the server when
that client's lease expires (90 s by default), so ``--resume`` after a lost node may be refused for that long;
NFSv3 needs the client's lock daemon, and a lock held by a host that never comes back stays until the server
is told (``sm-notify``). The lock lives on ``--out``, always a path on the driver's file system; an object-store
``--storage`` holds no lock of its own. The holder writes its host, PID and start time into the file, which a
refused sweep and ``pertadapt report`` read back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pertadapt.config.errors import ConfigError

__all__ = ["LOCK_FILE", "Holder", "SweepLock", "SweepLocked", "check_not_running", "running_sweep"]

log = logging.getLogger(__name__)

#: The lock file inside a sweep directory.
LOCK_FILE = "sweep.lock"
#: How long a sweep retries a held lock before it is refused (a ``pertadapt report`` probing the lock holds
#: it for microseconds).
_RETRY_S = 2.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a sweep directory's lock."""

    host: str
    pid: int
    started_at: float

    def describe(self) -> str:
        """``host H, PID P, since <local time>``."""
        return f"host {self.host}, PID {self.pid}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}"


class SweepLocked(ConfigError):
    """Another sweep holds the directory."""


def _read_holder(path: Path) -> Holder | None:
    try:
        doc = json.loads(path.read_text())
        return Holder(str(doc["host"]), int(doc["pid"]), float(doc["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _held_message(sweep_dir: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "a process that has not written its name yet"
    return f"--out: {sweep_dir} is in use by another sweep ({who}); wait for it to end or stop it"


class SweepLock:
    """The exclusive lock of one sweep directory, held from :meth:`acquire` to :meth:`release` (or process end).

    Parameters
    ----------
    sweep_dir
        The sweep directory (created if missing).
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        self.path = sweep_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    @property
    def fd(self) -> int:
        """The open lock file (inherited by the sweep's driver process, which then holds the lock too)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: not locked")
        return self._fd

    def acquire(self) -> SweepLock:
        """Take the lock and write this process as its holder.

        Raises
        ------
        SweepLocked
            Another live process holds it (after retrying for about 2 s): the message names the directory
            and the holder's host, PID and start time.
        """
        deadline = time.monotonic() + _RETRY_S
        while True:
            if not self.sweep_dir.is_dir():
                self.sweep_dir.mkdir(parents=True, exist_ok=True)
                self._created_dir = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise SweepLocked(_held_message(self.sweep_dir, _read_holder(self.path))) from None
                time.sleep(0.1)
                continue
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it (see abandon) while this process waited: lock the new one
        # written in place (the lock is on this file, so it is never replaced): a reader retries an empty read
        doc = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, doc.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def abandon(self) -> None:
        """Give the lock up after a sweep failed before it started: if :meth:`acquire` created the directory and
        it holds nothing but the lock file, remove both (a waiting process sees its file gone and retries)."""
        if self._fd is not None and self._created_dir and [p.name for p in self.sweep_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.sweep_dir.rmdir()
        self.release()

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would let two processes lock two different files)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor ``fd`` is still the file at ``path`` (not removed or replaced since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def running_sweep(sweep_dir: Path) -> Holder | None:
    """The holder of ``sweep_dir``'s lock if a sweep runs there now, else ``None``; takes no lock a sweep
    could be refused by (a shared probe, released at once; a starting sweep retries for seconds).

    Parameters
    ----------
    sweep_dir
        A sweep directory.
    """
    path = sweep_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        for _ in range(20):
            holder = _read_holder(path)
            if holder is not None:
                return holder
            time.sleep(0.05)
        return Holder("?", 0, 0.0)
    finally:
        os.close(fd)  # closing the descriptor also drops the shared probe
    return None


def check_not_running(sweep_dir: Path) -> None:
    """Refuse to write into a directory where a sweep runs now (a dry run, which takes no lock)."""
    holder = running_sweep(sweep_dir)
    if holder is not None:
        raise SweepLocked(_held_message(sweep_dir, holder))
