"""The package lives in platform/pertadapt without shadowing the stdlib ``platform`` module."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_no_init_in_platform_dir() -> None:
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_importable_from_repo_root() -> None:
    code = "import platform, pertadapt; print(platform.system()); print(platform.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    system, path = res.stdout.split()
    assert system == "Linux"
    assert Path(path).resolve().is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())


def test_package_import_is_light() -> None:
    code = "import sys, pertadapt.config, pertadapt.cli; print(sorted(m for m in ('torch','ray','deepspeed','wandb','anndata') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
