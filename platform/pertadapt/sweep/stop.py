"""A graceful stop for a sweep, whatever Ray installs for SIGTERM.

Ray owns SIGTERM in a process that runs it: ``ray.init`` installs a Python handler (``sys.exit(15)``), the
core worker installs a C-level failure handler behind Python's back, and ``ray.shutdown`` resets the signal
to its default action (the process dies of it). So a sweep's driver never relies on SIGTERM: the process a
user or a scheduler signals (:mod:`pertadapt.sweep.command`) runs no Ray and forwards SIGTERM or SIGINT to
the driver process as :data:`STOP_SIGNAL`, which nothing in Ray or Tune handles. In the driver, a stop is

* deferred while Ray starts or stops (:func:`deferred`): honoured when that step is over;
* handed to Tune while Tune runs (:func:`deferred` plus a Tune callback that calls :func:`requested` at every
  step and then sends Tune its own graceful-stop signal, ``SIGUSR1``: Tune saves its state and returns);
* immediate anywhere else (staging data, writing results and the report): :class:`SweepStopped` is raised
  in the main thread.

Every path ends in :class:`SweepStopped`, which the command turns into exit code 143.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

__all__ = ["STOP_SIGNAL", "SweepStopped", "deferred", "install", "request", "requested"]

log = logging.getLogger(__name__)

#: The signal the supervising process sends the driver for a graceful stop (unused by Ray and Tune).
STOP_SIGNAL = signal.SIGUSR2


class SweepStopped(BaseException):
    """A stop was asked for (SIGTERM, SIGINT): the sweep ended early and ``--resume`` finishes it.

    Parameters
    ----------
    signum
        The signal the user or scheduler sent.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_state = {"requested": 0, "deferring": 0, "raised": False}


def requested() -> int:
    """The signal number of the stop asked for, or 0."""
    return _state["requested"]


def request(signum: int) -> None:
    """Ask for a stop: raise :class:`SweepStopped` now unless a :func:`deferred` step runs (then at its end)."""
    if _state["requested"]:
        log.info("already stopping")
        return
    _state["requested"] = signum
    log.warning("stop asked for: stopping the sweep (Tune's state is saved; --resume finishes it)")
    if not _state["deferring"]:
        _raise_once()


def _raise_once() -> None:
    if not _state["raised"]:
        _state["raised"] = True
        raise SweepStopped(_state["requested"])


def install(signals: tuple[int, ...] = (STOP_SIGNAL,)) -> None:
    """Make ``signals`` ask for a stop in this process (main thread only)."""

    def handler(signum: int, frame: object) -> None:
        request(signum)

    for s in signals:
        signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop asked for inside the block (Ray starting or stopping, Tune running) until the block ends;
    then raise :class:`SweepStopped`, unless an exception already leaves the block."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if _state["requested"] and not _state["deferring"]:
        _raise_once()
