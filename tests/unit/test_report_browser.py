"""report.html in a real browser: headless Chromium (Debian package) with the network blocked.

A copy of the page gets a script that, on ``load``, writes into the DOM the row count of every table
and the decoded width of every image; ``--dump-dom`` returns the DOM after it ran. A screenshot proves
the page paints. Chromium comes from ``scripts/ensure-chromium.sh`` (``make test`` runs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from fixtures.synthetic_sweep import write_synthetic_sweep
from pertadapt.report.html import write_sweep_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed and scripts/ensure-chromium.sh "
                                "could not install it here (no apt-get, root or network)")

_CHECK = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre"); out.id = "dom-check";
  out.textContent = JSON.stringify({
    tables: [...document.querySelectorAll("table")].map(t => t.querySelectorAll("tbody tr").length),
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
  });
  document.body.appendChild(out);
});</script>"""
#: Route every request to a closed local port: the page must not need the network.
_OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>", "--no-first-run", "--disable-background-networking"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *_OFFLINE, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=True)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_synthetic_sweep(tmp_path_factory.mktemp("b") / "demo", arms={"full": 0.0, "no_fm": 0.15,
                                                                              "no_pa": None},
                                 seeds=(1, 2), n_conditions=12, failed={"sim/no_pa/seed2": "RuntimeError: boom"})
    return write_sweep_report(root).html


def test_html_references_nothing_outside_the_file(report_html: Path) -> None:
    html = report_html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html)
    assert "<link" not in html
    assert "@import" not in html


def test_every_table_has_rows_and_every_image_decodes_in_chromium(report_html: Path, tmp_path: Path) -> None:
    page = tmp_path / "check.html"
    page.write_text(report_html.read_text().replace("</body>", _CHECK + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri()).stdout
    found = re.search(r'<pre id="dom-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    check = json.loads(found.group(1))
    n_tables = report_html.read_text().count("<table")
    assert len(check["tables"]) == n_tables >= 7  # 5 scopes + paired tests + failed trials
    assert all(n > 0 for n in check["tables"]), check["tables"]
    assert len(check["images"]) == 3
    assert all(i["complete"] and i["width"] > 0 for i in check["images"]), check["images"]


def test_screenshot_paints_the_page(report_html: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    _chromium("--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}", report_html.as_uri())
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        colours = im.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is not None
    assert len(colours) > 20
