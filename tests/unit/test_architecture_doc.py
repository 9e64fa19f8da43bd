"""docs/architecture.md names what the code has: every package, layer, run file and results column."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pertadapt import rundir
from pertadapt.report.results import HEAD, TAIL

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "architecture.md").read_text()


def test_every_package_and_bottom_module_is_described() -> None:
    root = REPO / "platform" / "pertadapt"
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    bottom = ("files.py", "types.py", "remote.py", "rundir.py")
    missing = [f"{p}/" for p in packages if f"| `{p}/` |" not in DOC] + [m for m in bottom if f"| `{m}` |" not in DOC]
    assert not missing, f"docs/architecture.md: no row for {missing}"


def test_every_import_linter_layer_is_listed() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in config if c["type"] == "layers")
    listed = [line.strip() for line in DOC.split("```\n", 2)[1].splitlines()]
    assert listed == [layer.replace("pertadapt.", "") for layer in layers]


@pytest.mark.parametrize("name", sorted(v for k, v in vars(rundir).items()
                                         if k.startswith("_") and k[1:].isupper() and isinstance(v, str)))
def test_every_run_file_is_described(name: str) -> None:
    assert f"`{name}" in DOC


def test_the_results_columns_are_the_result_rows() -> None:
    flat = " ".join(DOC.split())
    assert f"`{', '.join(HEAD)}` (`HEAD`)" in flat
    assert f"`{', '.join(TAIL)}` (`TAIL`)" in flat
