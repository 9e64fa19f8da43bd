"""Extraction of the Debian GO packages: only wanted files, and no member path may leave the target."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from pertadapt.go import GOSourceUnavailable
from pertadapt.go.sources import _extract_deb, _extract_tar

GOOD = "./usr/lib/R/site-library/GO.db/extdata/GO.sqlite"


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _deb(path: Path, members: dict[str, bytes]) -> Path:
    """A minimal binary package: ``debian-binary``, a control tarball, an uncompressed ``data.tar``."""
    control = _tar({"./control": b"Package: crafted\nVersion: 1.0\nArchitecture: all\n"
                                 b"Maintainer: t <t@example.org>\nDescription: crafted\n"})
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar", control)
                     + _ar_member("data.tar", _tar(members)))
    return path


def test_extracts_only_wanted_files(tmp_path: Path) -> None:
    members = {GOOD: b"sqlite bytes", "./usr/lib/R/site-library/GO.db/DESCRIPTION": b"Version: 3.16.0\n",
               "./usr/lib/R/site-library/GO.db/R/GO": b"not wanted"}
    written = _extract_tar(io.BytesIO(_tar(members)), tmp_path, "test.deb")
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "usr/lib/R/site-library/GO.db/extdata/GO.sqlite", "usr/lib/R/site-library/GO.db/DESCRIPTION"]
    assert written[0].read_bytes() == b"sqlite bytes"
    assert not (tmp_path / "usr/lib/R/site-library/GO.db/R/GO").exists()


@pytest.mark.parametrize("bad", ["../evil.sqlite", "./usr/share/../../../evil.sqlite", "/tmp/evil.sqlite",
                                 "./usr/share/doc/x/../../../../../copyright"])
def test_refuses_escaping_member(tmp_path: Path, bad: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(GOSourceUnavailable, match="refusing archive member") as err:
        _extract_tar(io.BytesIO(_tar({bad: b"payload"})), dest, "crafted.deb")
    assert "crafted.deb" in str(err.value)
    assert bad in str(err.value)
    assert not (tmp_path / "evil.sqlite").exists()
    assert list(dest.rglob("*")) == []


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb unavailable")
def test_crafted_deb_through_dpkg_deb(tmp_path: Path) -> None:
    good = _deb(tmp_path / "good.deb", {GOOD: b"ok"})
    _extract_deb(good, tmp_path / "g")
    assert (tmp_path / "g" / GOOD).read_bytes() == b"ok"
    evil = _deb(tmp_path / "evil.deb", {"./usr/../../evil.sqlite": b"payload"})
    with pytest.raises(GOSourceUnavailable, match="refusing archive member"):
        _extract_deb(evil, tmp_path / "e")
    assert not (tmp_path / "evil.sqlite").exists()
    assert not (tmp_path.parent / "evil.sqlite").exists()
