"""Raw GO sources: the bundled table, Debian's Bioconductor SQLite files, and OBO writing.

The Debian packages ``r-bioc-go.db`` (the ontology, ``GO.sqlite``) and ``r-bioc-org.hs.eg.db``
(human gene annotations, ``org.Hs.eg.sqlite``) are downloaded with ``apt-get download`` (nothing
is installed, R is not needed) and their SQLite files are read with :mod:`sqlite3`. The bundled
package data under ``pertadapt/resources/go`` are derived from the same files by
:func:`export_bundled_table`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from pertadapt.go.errors import GOError, GOSourceUnavailable

__all__ = [
    "BUNDLED_DIR",
    "DEBIAN_PACKAGES",
    "Annotation",
    "TermRecord",
    "default_cache_dir",
    "export_bundled_table",
    "fetch_debian",
    "read_bundled",
    "read_debian",
    "write_obo",
]

log = logging.getLogger(__name__)

#: Directory of the bundled, derived GO tables (package data).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "resources" / "go"
#: The two Debian packages holding GO.db and org.Hs.eg.db.
DEBIAN_PACKAGES = ("r-bioc-go.db", "r-bioc-org.hs.eg.db")
_GO_SQLITE = "GO.sqlite"
_ORG_SQLITE = "org.Hs.eg.sqlite"
_NAMESPACE = {"BP": "biological_process", "MF": "molecular_function", "CC": "cellular_component"}
_FILES = {
    "gene2go": "gene2go_human_direct.tsv.gz",
    "terms": "go_terms.tsv.gz",
    "aliases": "gene_aliases_human.tsv.gz",
}
_SOURCE_JSON = "SOURCE.json"


class Annotation(NamedTuple):
    """One direct annotation row: gene symbol, GO id, aspect (BP/MF/CC), evidence code."""

    symbol: str
    go_id: str
    aspect: str
    evidence: str


class TermRecord(NamedTuple):
    """One current GO term with its ``is_a`` and ``part_of`` parents."""

    go_id: str
    aspect: str
    name: str
    is_a: tuple[str, ...]
    part_of: tuple[str, ...]


def default_cache_dir() -> Path:
    """Return the cache root: ``$PERTADAPT_CACHE`` or ``~/.cache/pertadapt``."""
    env = os.environ.get("PERTADAPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pertadapt"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- SQLite readers


def _metadata(con: sqlite3.Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in con.execute("SELECT name, value FROM metadata")}


def _sqlite_annotations(org_sqlite: Path) -> Iterator[Annotation]:
    con = sqlite3.connect(f"file:{org_sqlite}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT DISTINCT gi.symbol, g.go_id, g.ontology, g.evidence FROM go g "
            "JOIN gene_info gi ON gi._id = g._id ORDER BY gi.symbol, g.go_id, g.evidence"
        )
        for symbol, go_id, aspect, evidence in rows:
            yield Annotation(symbol, go_id, aspect, evidence)
    finally:
        con.close()


def _sqlite_aliases(org_sqlite: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(f"file:{org_sqlite}?mode=ro", uri=True)
    try:
        return sorted(set(con.execute(
            "SELECT gi.symbol, a.alias_symbol FROM alias a JOIN gene_info gi ON gi._id = a._id")))
    finally:
        con.close()


def _sqlite_terms(go_sqlite: Path) -> list[TermRecord]:
    con = sqlite3.connect(f"file:{go_sqlite}?mode=ro", uri=True)
    try:
        terms = {i: (g, o, n) for i, g, n, o in con.execute("SELECT _id, go_id, term, ontology FROM go_term")
                 if o in _NAMESPACE}
        parents: dict[int, dict[str, set[str]]] = {}
        for ont in ("bp", "mf", "cc"):
            for i, p, rel in con.execute(f"SELECT _id, _parent_id, relationship_type FROM go_{ont}_parents"):
                if i in terms and p in terms and rel in ("isa", "part of"):
                    parents.setdefault(i, {"isa": set(), "part of": set()})[rel].add(terms[p][0])
    finally:
        con.close()
    out = []
    for i, (go_id, aspect, name) in terms.items():
        par = parents.get(i, {"isa": set(), "part of": set()})
        out.append(TermRecord(go_id, aspect, name, tuple(sorted(par["isa"])), tuple(sorted(par["part of"]))))
    return sorted(out)


def _description_version(description: Path) -> str:
    for line in description.read_text().splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise GOError(f"{description}: no 'Version:' field")


def _sqlite_version(go_sqlite: Path, org_sqlite: Path) -> dict[str, str]:
    con = sqlite3.connect(f"file:{org_sqlite}?mode=ro", uri=True)
    try:
        org = _metadata(con)
    finally:
        con.close()
    version = {
        "go_release": org["GOSOURCEDATE"],
        "gene2go_date": org["GOEGSOURCEDATE"],
        "organism": org["ORGANISM"],
        "taxid": org["TAXID"],
    }
    for sqlite, key in ((go_sqlite, "GO.db"), (org_sqlite, "org.Hs.eg.db")):
        description = sqlite.parent.parent / "DESCRIPTION"
        if description.is_file():
            version[key] = _description_version(description)
    return version


def _find(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        raise GOError(f"{root}: no {name} below this directory")
    return hits[0]


# --------------------------------------------------------------------------- Debian download


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                          text=True).stdout.strip()


def _extract_deb(deb: Path, dest: Path) -> None:
    """Extract the SQLite, DESCRIPTION and copyright files of one .deb into ``dest``."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name
                wanted = name.endswith(".sqlite") or name.endswith("/DESCRIPTION") or (
                    "/usr/share/doc/" in name and name.endswith("/copyright"))
                if member.isfile() and wanted:
                    target = dest / name.lstrip("./")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, out, 1 << 20)
    if proc.returncode != 0:
        raise GOSourceUnavailable(f"dpkg-deb failed on {deb} (exit {proc.returncode})")


def _unavailable(reason: str) -> GOSourceUnavailable:
    return GOSourceUnavailable(
        f"{reason}. The 'debian' GO source needs apt-get and dpkg-deb to download the Debian packages "
        f"{' and '.join(DEBIAN_PACKAGES)} (run 'apt-get update' once on a fresh machine). "
        "Alternatives: source='bundled' (shipped with pertadapt), or source='obo' with your own "
        "OBO + GAF files (e.g. go-basic.obo and goa_human.gaf).")


def fetch_debian(cache_dir: Path | None = None) -> Path:
    """Download and extract the Debian GO packages into the cache (once); return that directory.

    Parameters
    ----------
    cache_dir
        Cache root; defaults to :func:`default_cache_dir`. Files land in ``<cache_dir>/go/debian``.

    Returns
    -------
    Path
        Directory holding ``**/GO.sqlite``, ``**/org.Hs.eg.sqlite``, DESCRIPTION and copyright
        files, plus ``debs.json`` with the .deb versions and sha256s.

    Raises
    ------
    GOSourceUnavailable
        ``apt-get``/``dpkg-deb`` is missing or the download fails; the message names both packages
        and the OBO + GAF alternative.
    """
    final = (cache_dir or default_cache_dir()) / "go" / "debian"
    if (final / "debs.json").is_file():
        return final
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _unavailable(f"{tool} is not available on this machine")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".debian-", dir=final.parent))
    try:
        cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", *DEBIAN_PACKAGES]
        log.info("downloading %s with apt-get", ", ".join(DEBIAN_PACKAGES))
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            raise _unavailable(f"'{' '.join(cmd)}' failed: {res.stderr.strip()[-500:]}")
        debs = {}
        for pkg in DEBIAN_PACKAGES:
            deb = next(tmp.glob(f"{pkg}_*.deb"))
            _extract_deb(deb, tmp)
            debs[pkg] = {"file": deb.name, "version": _deb_field(deb, "Version"), "sha256": sha256_file(deb)}
            deb.unlink()
        (tmp / "debs.json").write_text(json.dumps(debs, indent=2, sort_keys=True))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_debian(directory: Path) -> tuple[list[Annotation], list[TermRecord], list[tuple[str, str]], dict[str, str]]:
    """Read annotations, terms, aliases and version info from extracted Debian SQLite files.

    Parameters
    ----------
    directory
        Any directory containing ``GO.sqlite`` and ``org.Hs.eg.sqlite`` somewhere below it.

    Returns
    -------
    tuple
        ``(annotations, terms, aliases, version)``; ``aliases`` holds ``(symbol, alias)`` pairs
        including each symbol's identity row.
    """
    go_sqlite, org_sqlite = _find(directory, _GO_SQLITE), _find(directory, _ORG_SQLITE)
    version = _sqlite_version(go_sqlite, org_sqlite)
    debs = directory / "debs.json"
    if debs.is_file():
        for pkg, info in json.loads(debs.read_text()).items():
            version[f"deb:{pkg}"] = info["version"]
    return list(_sqlite_annotations(org_sqlite)), _sqlite_terms(go_sqlite), _sqlite_aliases(org_sqlite), version


# --------------------------------------------------------------------------- bundled table


def _write_tsv_gz(path: Path, header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=9) as gz:
        text = io.TextIOWrapper(gz, encoding="utf-8", newline="")
        writer = csv.writer(text, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()
    os.replace(tmp, path)


def _read_tsv_gz(path: Path) -> Iterator[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        yield from reader


def export_bundled_table(sqlite_dir: Path, out: Path = BUNDLED_DIR) -> dict[str, str]:
    """Derive the compact bundled GO tables from the Debian SQLite files (reproducible, byte-stable).

    Writes ``gene2go_human_direct.tsv.gz`` (symbol, go_id, aspect, evidence: direct annotations of
    all genes, the org.Hs.eg.db ``go`` view), ``go_terms.tsv.gz`` (go_id, aspect, name, is_a,
    part_of; parents ``|``-joined), ``gene_aliases_human.tsv.gz`` (symbol, alias; identity rows
    included, so the symbol column is the complete NCBI symbol universe) and ``SOURCE.json``.

    Parameters
    ----------
    sqlite_dir
        Directory with ``GO.sqlite`` and ``org.Hs.eg.sqlite`` below it (e.g. :func:`fetch_debian`).
    out
        Output directory (default: the package's ``resources/go``).

    Returns
    -------
    dict
        The content of ``SOURCE.json``: source versions and sha256 of inputs and outputs.
    """
    annotations, terms, aliases, version = read_debian(sqlite_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(out / _FILES["gene2go"], Annotation._fields, annotations)
    _write_tsv_gz(out / _FILES["terms"], TermRecord._fields,
                  ((t.go_id, t.aspect, t.name, "|".join(t.is_a), "|".join(t.part_of)) for t in terms))
    _write_tsv_gz(out / _FILES["aliases"], ("symbol", "alias"), aliases)
    info: dict[str, str] = dict(version)
    for name in (_GO_SQLITE, _ORG_SQLITE):
        info[f"sha256:{name}"] = sha256_file(_find(sqlite_dir, name))
    for name in _FILES.values():
        info[f"sha256:{name}"] = sha256_file(out / name)
    tmp = out / f".{_SOURCE_JSON}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / _SOURCE_JSON)
    log.info("bundled GO table written to %s (%d annotation rows, %d terms)", out, len(annotations), len(terms))
    return info


def read_bundled(directory: Path = BUNDLED_DIR) -> tuple[
        list[Annotation], list[TermRecord], list[tuple[str, str]], dict[str, str]]:
    """Read the bundled tables written by :func:`export_bundled_table`.

    Returns
    -------
    tuple
        ``(annotations, terms, aliases, version)`` as :func:`read_debian`.
    """
    version = {k: v for k, v in json.loads((directory / _SOURCE_JSON).read_text()).items()
               if not k.startswith("sha256:")}
    annotations = [Annotation(*row) for row in _read_tsv_gz(directory / _FILES["gene2go"])]
    terms = [TermRecord(g, a, n, tuple(i.split("|")) if i else (), tuple(p.split("|")) if p else ())
             for g, a, n, i, p in _read_tsv_gz(directory / _FILES["terms"])]
    aliases = [(s, a) for s, a in _read_tsv_gz(directory / _FILES["aliases"])]
    return annotations, terms, aliases, version


def write_obo(terms: Iterable[TermRecord], path: Path, data_version: str) -> None:
    """Write a minimal go-basic-style OBO (id, name, namespace, is_a, part_of) for goatools.

    Parameters
    ----------
    terms
        Current GO terms with their parents.
    path
        Output ``.obo`` file (written atomically).
    data_version
        Release date written as ``data-version: releases/<data_version>``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"format-version: 1.2\ndata-version: releases/{data_version}\nontology: go\n\n")
        for t in terms:
            f.write(f"[Term]\nid: {t.go_id}\nname: {t.name}\nnamespace: {_NAMESPACE[t.aspect]}\n")
            f.writelines(f"is_a: {p}\n" for p in t.is_a)
            f.writelines(f"relationship: part_of {p}\n" for p in t.part_of)
            f.write("\n")
        f.write("[Typedef]\nid: part_of\nname: part of\n")
    os.replace(tmp, path)
