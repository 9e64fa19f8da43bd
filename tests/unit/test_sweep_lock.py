"""The sweep directory's lock: exclusive, named holder, gone with its process; overrides parsed once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pertadapt.config.load import parse_overrides
from pertadapt.sweep.lock import LOCK_FILE, SweepLock, SweepLocked, check_not_running, running_sweep

HOLD = "import sys, time; from pertadapt.sweep.lock import SweepLock; SweepLock(__import__('pathlib').Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)"


def _holder(tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_lock_is_refused_naming_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        t0 = time.time()
        with pytest.raises(SweepLocked, match=rf"{tmp_path} is in use by another sweep \(host "
                                              rf"{socket.gethostname()}, PID {proc.pid}, since \d{{4}}-"):
            SweepLock(tmp_path).acquire()
        assert time.time() - t0 < 5
        assert running_sweep(tmp_path).pid == proc.pid
        with pytest.raises(SweepLocked):
            check_not_running(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL: the kernel released the lock; the file stays and names its last holder
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
    assert running_sweep(tmp_path) is None
    lock = SweepLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_status_probe_does_not_refuse_a_starting_sweep(tmp_path: Path) -> None:
    assert running_sweep(tmp_path / "none") is None  # no lock file: nothing created
    assert not (tmp_path / "none").exists()
    lock = SweepLock(tmp_path).acquire()
    lock.release()
    for _ in range(50):  # probes between two sweeps never make the next one fail
        assert running_sweep(tmp_path) is None
        SweepLock(tmp_path).acquire().release()


def test_overrides_are_parsed_by_the_config_parser() -> None:
    assert parse_overrides(["optim.lr=1e-3", "seeds=[1,2]", "datasets.a.data.path=x.h5ad", "adapter.enabled=false",
                            "optim.lr=0.5"]) == {"optim.lr": 0.5, "seeds": [1, 2], "datasets.a.data.path": "x.h5ad",
                                                 "adapter.enabled": False}
    from pertadapt.config import ConfigError

    with pytest.raises(ConfigError, match="override 'optim.lr': expected key=value"):
        parse_overrides(["optim.lr"])


def test_a_sweep_refused_before_it_started_leaves_no_directory_and_a_waiter_locks_the_new_file(
        tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = SweepLock(out).acquire()
    waiter: dict[str, SweepLock] = {}
    thread = threading.Thread(target=lambda: waiter.setdefault("lock", SweepLock(out).acquire()))
    thread.start()
    time.sleep(0.3)  # the waiter has opened the first lock file and retries its flock
    first.abandon()  # the directory it created held only the lock file: both go
    thread.join(timeout=10)
    # the waiter noticed its file was removed and locked a new one at the same path, which a third one sees
    assert (out / LOCK_FILE).is_file()
    assert running_sweep(out).pid == os.getpid()
    with pytest.raises(SweepLocked):
        SweepLock(out).acquire()
    waiter["lock"].abandon()
    assert not out.exists()
    # a directory that existed before the lock stays, with its lock file
    out.mkdir()
    SweepLock(out).acquire().abandon()
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
