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
import io
import json
import logging
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

import pandas as pd

from pertadapt.files import atomic_write, atomic_write_json, package_data, sha256_file
from pertadapt.files import cache_dir as cache_root
from pertadapt.go.errors import GOError, GOSourceUnavailable

__all__ = [
    "BUNDLED_DIR",
    "DEBIAN_PACKAGES",
    "ALIAS_COLUMNS",
    "TERM_COLUMNS",
    "Annotation",
    "GOTables",
    "export_bundled_table",
    "fetch_debian",
    "read_bundled",
    "read_debian",
    "rows_frame",
    "write_obo",
]

log = logging.getLogger(__name__)

#: Directory of the bundled, derived GO tables (package data, read through importlib.resources).
BUNDLED_DIR: Traversable = package_data("go")
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


#: Columns of the terms table; ``is_a`` and ``part_of`` hold ``|``-joined parent GO ids.
TERM_COLUMNS = ("go_id", "aspect", "name", "is_a", "part_of")
ALIAS_COLUMNS = ("symbol", "alias")


class GOTables(NamedTuple):
    """The raw tables of a GO source, as DataFrames of strings.

    Attributes
    ----------
    annotations
        Columns ``symbol, go_id, aspect, evidence`` (:class:`Annotation`): direct annotations.
    terms
        Columns :data:`TERM_COLUMNS`: every current GO term with its parents.
    aliases
        Columns ``symbol, alias``, identity rows included (the symbol column is the symbol universe).
    version
        Release dates and package versions.
    """

    annotations: pd.DataFrame
    terms: pd.DataFrame
    aliases: pd.DataFrame
    version: dict[str, str]


def rows_frame(rows: Iterable[tuple[str, ...]], columns: tuple[str, ...]) -> pd.DataFrame:
    """A DataFrame of string columns ``columns`` from row tuples (the form every source returns)."""
    return pd.DataFrame(list(rows), columns=list(columns), dtype=object)


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


def _sqlite_terms(go_sqlite: Path) -> list[tuple[str, str, str, str, str]]:
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
        out.append((go_id, aspect, name, "|".join(sorted(par["isa"])), "|".join(sorted(par["part of"]))))
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


def _member_target(dest: Path, name: str, origin: str) -> Path:
    """Where archive member ``name`` lands below ``dest``; refuse absolute paths and ``..`` components."""
    member = PurePosixPath(name)
    if member.is_absolute() or ".." in member.parts:
        raise GOSourceUnavailable(f"{origin}: refusing archive member {name!r} (absolute path or '..' component)")
    return dest.joinpath(*(part for part in member.parts if part != "."))


def _extract_tar(stream: IO[bytes], dest: Path, origin: str) -> list[Path]:
    """Extract the SQLite, DESCRIPTION and copyright files of a streamed tar archive into ``dest``.

    Every file is written atomically; a wanted member whose path is absolute or contains ``..`` is
    refused before it is written.

    Parameters
    ----------
    stream
        The uncompressed or compressed tar stream (read sequentially, ``r|*``).
    dest
        Extraction root.
    origin
        Name of the archive for messages (e.g. the ``.deb`` path).

    Returns
    -------
    list of Path
        The files written, in archive order.

    Raises
    ------
    GOSourceUnavailable
        A member path escapes ``dest``.
    """
    written = []
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            name = member.name
            wanted = name.endswith(".sqlite") or name.endswith("/DESCRIPTION") or (
                "/usr/share/doc/" in name and name.endswith("/copyright"))
            if not (member.isfile() and wanted):
                continue
            target = _member_target(dest, name, origin)
            src = tar.extractfile(member)
            assert src is not None  # a regular file member always has content

            def copy(tmp: Path, src: IO[bytes] = src) -> None:
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)

            atomic_write(target, copy)
            written.append(target)
    return written


def _extract_deb(deb: Path, dest: Path) -> None:
    """Extract the SQLite, DESCRIPTION and copyright files of one .deb into ``dest``."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        _extract_tar(proc.stdout, dest, str(deb))
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
        Cache root; defaults to :func:`pertadapt.files.cache_dir`. Files land in ``<cache_dir>/go/debian``.

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
    final = (cache_dir or cache_root()) / "go" / "debian"
    marker = final / "debs.json"
    if marker.is_file():
        return final
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise _unavailable(f"{tool} is not available on this machine")
    final.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".debs-", dir=final.parent) as download:
        cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", *DEBIAN_PACKAGES]
        log.info("downloading %s with apt-get", ", ".join(DEBIAN_PACKAGES))
        res = subprocess.run(cmd, cwd=download, capture_output=True, text=True)
        if res.returncode != 0:
            raise _unavailable(f"'{' '.join(cmd)}' failed: {res.stderr.strip()[-500:]}")
        debs = {}
        for pkg in DEBIAN_PACKAGES:
            deb = next(Path(download).glob(f"{pkg}_*.deb"))
            _extract_deb(deb, final)
            debs[pkg] = {"file": deb.name, "version": _deb_field(deb, "Version"), "sha256": sha256_file(deb)}
    atomic_write_json(marker, debs, sort_keys=True)  # written last: its presence marks a complete set
    return final


def read_debian(directory: Path) -> GOTables:
    """Read annotations, terms, aliases and version info from extracted Debian SQLite files.

    Parameters
    ----------
    directory
        Any directory containing ``GO.sqlite`` and ``org.Hs.eg.sqlite`` somewhere below it.

    Returns
    -------
    GOTables
        Rows sorted; ``aliases`` includes each symbol's identity row.
    """
    go_sqlite, org_sqlite = _find(directory, _GO_SQLITE), _find(directory, _ORG_SQLITE)
    version = _sqlite_version(go_sqlite, org_sqlite)
    debs = directory / "debs.json"
    if debs.is_file():
        for pkg, info in json.loads(debs.read_text()).items():
            version[f"deb:{pkg}"] = info["version"]
    return GOTables(rows_frame(_sqlite_annotations(org_sqlite), Annotation._fields),
                    rows_frame(_sqlite_terms(go_sqlite), TERM_COLUMNS),
                    rows_frame(_sqlite_aliases(org_sqlite), ALIAS_COLUMNS), version)


# --------------------------------------------------------------------------- bundled table


def _write_tsv_gz(path: Path, table: pd.DataFrame) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                   compresslevel=9) as gz:
            text = io.TextIOWrapper(gz, encoding="utf-8", newline="")
            writer = csv.writer(text, delimiter="\t", lineterminator="\n")
            writer.writerow(table.columns)
            writer.writerows(table.itertuples(index=False, name=None))
            text.flush()
            text.detach()

    atomic_write(path, write)


def _read_tsv_gz(path: Traversable, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a table written by :func:`_write_tsv_gz` (pandas' C parser: csv quoting, empty strings kept)."""
    with path.open("rb") as raw:
        table = pd.read_csv(raw, sep="\t", compression="gzip", dtype=str, keep_default_na=False, na_filter=False)
    if tuple(table.columns) != columns:
        raise GOError(f"{path}: columns {list(table.columns)}, expected {list(columns)}")
    return table


def export_bundled_table(sqlite_dir: Path, out: Path | None = None) -> dict[str, str]:
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
        Output directory (default: the package's ``resources/go``, which must be a writable checkout).

    Returns
    -------
    dict
        The content of ``SOURCE.json``: source versions and sha256 of inputs and outputs.
    """
    tables = read_debian(sqlite_dir)
    out = Path(str(BUNDLED_DIR)) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(out / _FILES["gene2go"], tables.annotations)
    _write_tsv_gz(out / _FILES["terms"], tables.terms)
    _write_tsv_gz(out / _FILES["aliases"], tables.aliases)
    info: dict[str, str] = dict(tables.version)
    for name in (_GO_SQLITE, _ORG_SQLITE):
        info[f"sha256:{name}"] = sha256_file(_find(sqlite_dir, name))
    for name in _FILES.values():
        info[f"sha256:{name}"] = sha256_file(out / name)
    atomic_write_json(out / _SOURCE_JSON, info, sort_keys=True)
    log.info("bundled GO table written to %s (%d annotation rows, %d terms)", out, len(tables.annotations),
             len(tables.terms))
    return info


def read_bundled(directory: Traversable = BUNDLED_DIR) -> GOTables:
    """Read the bundled tables written by :func:`export_bundled_table`.

    Parameters
    ----------
    directory
        Folder holding the tables (default: the package data, through importlib.resources).

    Returns
    -------
    GOTables
        As :func:`read_debian`.
    """
    version = {k: v for k, v in json.loads(directory.joinpath(_SOURCE_JSON).read_text()).items()
               if not k.startswith("sha256:")}
    return GOTables(_read_tsv_gz(directory.joinpath(_FILES["gene2go"]), Annotation._fields),
                    _read_tsv_gz(directory.joinpath(_FILES["terms"]), TERM_COLUMNS),
                    _read_tsv_gz(directory.joinpath(_FILES["aliases"]), ALIAS_COLUMNS), version)


def write_obo(terms: pd.DataFrame, path: Path, data_version: str) -> None:
    """Write a minimal go-basic-style OBO (id, name, namespace, is_a, part_of) for goatools.

    Parameters
    ----------
    terms
        Current GO terms with their parents (columns :data:`TERM_COLUMNS`).
    path
        Output ``.obo`` file (written atomically).
    data_version
        Release date written as ``data-version: releases/<data_version>``.
    """
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"format-version: 1.2\ndata-version: releases/{data_version}\nontology: go\n\n")
            for go_id, aspect, name, is_a, part_of in terms.itertuples(index=False, name=None):
                f.write(f"[Term]\nid: {go_id}\nname: {name}\nnamespace: {_NAMESPACE[aspect]}\n")
                f.writelines(f"is_a: {p}\n" for p in is_a.split("|") if p)
                f.writelines(f"relationship: part_of {p}\n" for p in part_of.split("|") if p)
                f.write("\n")
            f.write("[Typedef]\nid: part_of\nname: part of\n")

    atomic_write(path, write)
