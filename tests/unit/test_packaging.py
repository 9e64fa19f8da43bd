"""The package lives in platform/pertadapt without shadowing the stdlib ``platform`` module."""

from __future__ import annotations

import ast
import re
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


#: Documents a user of the package never has (the project's private notes): no file may cite them.
_PRIVATE_DOCS = re.compile(r"method\.md|platform-notes|seed-slides|shared/docs|\.\./shared")


def test_nothing_cites_documents_users_do_not_have() -> None:
    """Comments state the fact they rely on, or point to ``docs/`` in this repository."""
    files = [p for p in (REPO / "platform").rglob("*") if p.is_file() and p.suffix not in {".gz", ".pyc", ".png"}]
    files += [*(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "requirements.txt"]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if _PRIVATE_DOCS.search(line)]
    assert hits == []


def test_no_test_fixture_under_platform() -> None:
    """Test helpers live under ``tests/``: no pytest, no conftest or test module in the package, and every
    ``pertadapt`` name a test imports is also used by the package itself (not a fixture shipped with it)."""
    package = {p: p.read_text() for p in (REPO / "platform").rglob("*.py")}
    assert [p.name for p in package if p.name == "conftest.py" or p.name.startswith("test_")] == []
    assert [str(p) for p, src in package.items() if re.search(r"^\s*(import|from) (pytest|unittest)\b", src, re.M)] == []
    imported = set()
    for test in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pertadapt."):
                imported |= {(node.module, alias.name) for alias in node.names}
    test_only = []
    for module, name in sorted(imported):
        path = REPO / "platform" / (module.replace(".", "/") + ".py")
        if not path.is_file():  # a package's __init__ re-exports what its modules use
            continue
        word = re.compile(rf"\b{re.escape(name)}\b")
        rest = re.sub(rf"(def|class) {re.escape(name)}\b|[\"']{re.escape(name)}[\"']", "", package[path])
        if not word.search(rest) and not any(word.search(src) for p, src in package.items()
                                             if p != path and p.name != "__init__.py"):
            test_only.append(f"{module}.{name}")
    assert test_only == [], "used only by tests: move to tests/fixtures/"
