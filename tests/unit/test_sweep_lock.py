"""The sweep directory's lock: exclusive, named holder, gone with its process; overrides parsed once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
