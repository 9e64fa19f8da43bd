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


def test_wheel_runs_from_its_own_package_data(tmp_path: Path) -> None:
    """Built as a wheel and installed elsewhere, the package finds its configs, DeepSpeed JSONs and GO table."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("pertadapt-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "genes.txt").write_text("TP53\nMYC\nBRCA1\nEGFR\nKRAS\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path), "PERTADAPT_CACHE": str(tmp_path / "c")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pertadapt.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import pertadapt; print(pertadapt.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)
    assert cli("--help").returncode == 0
    shown = cli("config", "show", "configs/demo.yaml", "engine.deepspeed_config=zero3.json")
    assert shown.returncode == 0, shown.stderr
    assert "deepspeed_config: zero3.json" in shown.stdout
    assert "hidden_size: 32" in shown.stdout
    built = cli("go", "build", "--genes", "genes.txt", "--out", "go_out")
    assert built.returncode == 0, built.stderr
    assert any((work / "go_out").iterdir())
