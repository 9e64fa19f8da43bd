"""Ray tests start their own local clusters (through the code under test) and must leave none behind."""

from __future__ import annotations

import subprocess

import pytest


def _ray_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def ray_pids():
    """The PIDs of the Ray head processes (gcs_server/raylet) running now, as a function."""
    return _ray_pids


@pytest.fixture
def no_leftover_ray():
    """Fail if the test leaves Ray head processes (gcs_server/raylet) running that it started."""
    before = _ray_pids()
    yield
    import time

    for _ in range(30):
        left = _ray_pids() - before
        if not left:
            return
        time.sleep(1)
    pytest.fail(f"Ray processes left running: {sorted(left)}")
