"""One sweep per directory (the lock), a graceful stop at any moment (SIGTERM), a local cluster on loopback.

The sweeps are tiny (one baseline arm: trials of about two seconds that still go through Ray Tune)."""

from __future__ import annotations

import csv
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
TINY = ("name: tiny\nbase: smoke.yaml\nseeds: [1, 2]\nbaselines: false\nmax_concurrent_trials: 1\n"
        "arms:\n  mean: {model.name: baseline_mean}\n")


@pytest.fixture
def tiny(tmp_path: Path, cache_dir: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _start(abl: Path, out: Path, *extra: str, log: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "pertadapt.cli", "sweep", str(abl), "--out", str(out),
                             "--no-report", *extra], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (code {proc.returncode}) before {what}")
        if time.time() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def _run(abl: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pertadapt.cli", "sweep", str(abl), "--out", str(out),
                           "--no-report", *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


def _listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listened on by ``pid`` and its descendants."""
    out = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            out += [(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _watch_listening(proc: subprocess.Popen, seen: set[tuple[str, int, str]]) -> None:
    while proc.poll() is None:
        try:
            seen.update(_listening(proc.pid))
        except psutil.NoSuchProcess:
            return
        time.sleep(0.5)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.usefixtures("no_leftover_ray")
def test_one_sweep_per_directory_and_a_local_cluster_on_loopback(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    first = _start(tiny, out, log=tmp_path / "first.log")
    try:
        second = _start(tiny, out, log=tmp_path / "second.log")  # the same command, started at once
        t0 = time.time()
        # exactly one of the two runs; the other is refused within seconds, naming the holder
        _wait_for(lambda: first.poll() is not None or second.poll() is not None, 60, "one sweep to be refused")
        assert time.time() - t0 < 10
        refused, refused_log, runner, runner_log = ((first, "first.log", second, "second.log")
                                                    if first.poll() is not None else
                                                    (second, "second.log", first, "first.log"))
        assert refused.returncode == 2, (tmp_path / refused_log).read_text()[-3000:]
        text = (tmp_path / refused_log).read_text()
        assert f"{out} is in use by another sweep (host {socket.gethostname()}, PID {runner.pid}, since" in text
        seen: set[tuple[str, int, str]] = set()
        watcher = threading.Thread(target=_watch_listening, args=(runner, seen), daemon=True)
        watcher.start()
        _wait_for(lambda: "Started a local Ray instance" in (tmp_path / runner_log).read_text(), 300, "Ray", runner)
        # while it runs, a --resume is refused too, and so are --overwrite and a dry run (it would write plan.json);
        # the driver is paused meanwhile (the lock stays held), so its two-second trials cannot end the sweep first
        driver = next(c for c in psutil.Process(runner.pid).children()
                      if "pertadapt.sweep.command" in " ".join(c.cmdline()))
        driver.suspend()
        try:
            t1 = time.time()
            others = [subprocess.Popen([sys.executable, "-m", "pertadapt.cli", "sweep", str(tiny), "--out",
                                        str(out), "--no-report", extra], cwd=REPO, stderr=subprocess.PIPE, text=True)
                      for extra in ("--resume", "--overwrite", "--dry-run")]
            for other in others:
                assert other.wait(timeout=60) == 2
                assert f"PID {runner.pid}" in other.stderr.read()
            assert time.time() - t1 < 10
        finally:
            driver.resume()
        assert runner.wait(timeout=300) == 0, (tmp_path / runner_log).read_text()[-3000:]
        watcher.join(timeout=10)
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    # the sweep's own cluster: every socket the driver and the Ray processes it started listened on was on
    # loopback, the HTTP servers among them: the dashboard, its metrics (DASHBOARD_METRIC_PORT), the agent's
    # metrics export and the autoscaler monitor's metrics (AUTOSCALER_METRIC_PORT)
    assert {8265, 44217, 44227} <= {port for _, port, _ in seen}, seen
    assert all(_loopback(ip) for ip, _, _ in seen), seen
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["mean/seed1", "mean/seed2"]
    assert all(r["status"] == "ok" and r["attempts"] == "1" for r in rows)
    assert all(float(r["wall_s"]) > 0.5 for r in rows)  # trials that ran, not the replays of another's


@pytest.mark.usefixtures("no_leftover_ray")
def test_a_sigkilled_sweep_leaves_no_lock_that_blocks_resume(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    log = tmp_path / "driver.log"
    driver = _start(tiny, out, log=log)
    try:
        _wait_for(lambda: "Started a local Ray instance" in log.read_text(), 300, "Ray", driver)
        driver.kill()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    res = _run(tiny, out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(r["status"] == "ok" for r in _rows(out))


def _sigterm_points(log: Path) -> dict[str, Callable[[], bool]]:
    """When to send SIGTERM, in the order of a sweep's life (read from the driver's log)."""
    return {
        "right after start": lambda: "sweep tiny: 2 trials" in log.read_text(),
        "after ray.init": lambda: "Started a local Ray instance" in log.read_text(),
        "between trials": lambda: "mean/seed1 finished" in log.read_text(),
        "mid-trial": lambda: "mean/seed2 running" in log.read_text(),
    }


@pytest.mark.usefixtures("no_leftover_ray")
def test_sigterm_at_any_moment_stops_gracefully_and_resume_finishes(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    log = tmp_path / "driver.log"
    for i, (point, ready) in enumerate(_sigterm_points(log).items()):
        driver = _start(tiny, out, *(["--resume"] if i else []), log=log)
        try:
            _wait_for(ready, 300, point, driver)
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
        text = log.read_text()
        assert driver.returncode == 128 + signal.SIGTERM, (point, text[-3000:])
        assert f"--out {out} --resume" in text, point
        assert (out / "sweep.json").is_file(), point  # resumable
        os.rename(log, tmp_path / f"driver-{i}.log")
    res = _run(tiny, out, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["mean/seed1", "mean/seed2"]
    assert all(r["status"] == "ok" for r in rows)
