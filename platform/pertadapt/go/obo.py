"""User OBO + GAF files through goatools, with strict line-numbered validation first.

goatools skips or silently mangles malformed lines (and exits the process on some GAF errors), so
both files are checked here before goatools parses them; the first problem raises
:class:`~pertadapt.go.errors.GOFormatError` with ``path:line``.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pertadapt.go.errors import GOError, GOFormatError
from pertadapt.go.sources import Annotation

if TYPE_CHECKING:
    from goatools.obo_parser import GODag

__all__ = ["ancestors", "load_dag", "read_gaf", "validate_gaf", "validate_obo"]

_CURIE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*:\S+$")
_GO_ID = re.compile(r"^GO:\d{7}$")
_TAG = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*):(\s.*|)$")
_GAF_ASPECT = {"P": "BP", "F": "MF", "C": "CC"}
_NAMESPACE_ASPECT = {"biological_process": "BP", "molecular_function": "MF", "cellular_component": "CC"}


def _open_text(path: Path) -> TextIO:
    if not path.is_file():
        raise GOError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line without newline)``; undecodable bytes raise :class:`GOFormatError`."""
    with _open_text(path) as f:
        lnum = 0
        try:
            for lnum, raw in enumerate(f, 1):
                yield lnum, raw.rstrip("\n\r")
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise GOFormatError(str(path), lnum + 1, f"not UTF-8 text ({e})") from e


def _first_token(value: str) -> str:
    parts = value.split("!", 1)[0].split()
    return parts[0] if parts else ""


def validate_obo(path: Path) -> None:
    """Check an OBO file's syntax and references; raise on the first problem.

    Checks: every non-blank, non-comment line is a ``[Stanza]`` header or ``tag: value``; every
    ``[Term]`` has exactly one ``id`` (a CURIE); ``is_a`` / ``relationship`` targets are CURIEs
    defined in the file (as ``id`` or ``alt_id``); at least one term exists.

    Raises
    ------
    GOFormatError
        With the file and 1-based line number of the problem.
    """
    name = str(path)
    defined: set[str] = set()
    refs: list[tuple[int, str]] = []
    stanza: str | None = None
    stanza_line = 0
    ids_in_stanza = 0

    def close(lnum: int) -> None:
        if stanza == "Term" and ids_in_stanza != 1:
            raise GOFormatError(name, stanza_line, f"[Term] stanza has {ids_in_stanza} 'id:' lines, expected 1")

    lnum = 0
    for lnum, line in _numbered_lines(path):
        if not line.strip() or line.lstrip().startswith("!"):
            continue
        if line.startswith("["):
            if not line.rstrip().endswith("]"):
                raise GOFormatError(name, lnum, f"bad stanza header {line!r}")
            close(lnum)
            stanza, stanza_line, ids_in_stanza = line.strip()[1:-1], lnum, 0
            continue
        m = _TAG.match(line)
        if m is None:
            raise GOFormatError(name, lnum, f"expected 'tag: value', got {line!r}")
        if stanza != "Term":
            continue
        tag, value = m.group(1), _first_token(m.group(2))
        if tag in ("id", "alt_id"):
            if not _CURIE.match(value):
                raise GOFormatError(name, lnum, f"{tag} {value!r} is not an identifier like GO:0008150")
            defined.add(value)
            ids_in_stanza += tag == "id"
        elif tag == "is_a":
            refs.append((lnum, value))
        elif tag == "relationship":
            parts = m.group(2).split("!", 1)[0].split()
            if len(parts) < 2:
                raise GOFormatError(name, lnum, "relationship needs '<type> <id>'")
            refs.append((lnum, parts[1]))
    close(lnum)
    for lnum, ref in refs:
        if not _CURIE.match(ref) or ref not in defined:
            raise GOFormatError(name, lnum, f"parent {ref!r} is not a term defined in this file")
    if not defined:
        raise GOFormatError(name, 1, "no [Term] stanzas")


def load_dag(path: Path) -> GODag:
    """Validate and load an OBO file with goatools (``relationship`` loaded, obsolete terms skipped).

    Returns
    -------
    goatools.obo_parser.GODag
        Mapping GO id (including ``alt_id``) -> GOTerm.
    """
    from goatools.obo_parser import GODag

    validate_obo(path)
    if path.suffix == ".gz":
        raise GOFormatError(str(path), 1, "goatools reads plain-text OBO; decompress the file first")
    return GODag(str(path), optional_attrs={"relationship"}, prt=None)


def _gaf_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    for lnum, line in _numbered_lines(path):
        if line and not line.startswith("!"):
            yield lnum, line.split("\t")


def validate_gaf(path: Path) -> None:
    """Check a GAF (1.0/2.x) file; raise on the first malformed data line.

    Checks: 15 or more tab-separated columns, a non-empty symbol (column 3), a GO id ``GO:nnnnnnn``
    (column 5), a non-empty evidence code (column 7), an aspect ``P``/``F``/``C`` (column 9), and at
    least one data line.

    Raises
    ------
    GOFormatError
        With the file and 1-based line number of the problem.
    """
    name, n = str(path), 0
    for lnum, cols in _gaf_lines(path):
        if len(cols) < 15:
            raise GOFormatError(name, lnum, f"expected at least 15 tab-separated GAF columns, found {len(cols)}")
        if not cols[2].strip():
            raise GOFormatError(name, lnum, "empty DB_Object_Symbol (column 3)")
        if not _GO_ID.match(cols[4]):
            raise GOFormatError(name, lnum, f"GO id {cols[4]!r} (column 5) is not like GO:0008150")
        if not cols[6].strip():
            raise GOFormatError(name, lnum, "empty evidence code (column 7)")
        if cols[8] not in _GAF_ASPECT:
            raise GOFormatError(name, lnum, f"aspect {cols[8]!r} (column 9) is not P, F or C")
        n += 1
    if n == 0:
        raise GOFormatError(name, 1, "no annotation lines")


def read_gaf(path: Path, dag: Mapping[str, object]) -> tuple[list[Annotation], list[tuple[str, str]], int]:
    """Validate a GAF and read it with goatools; drop ``NOT`` annotations and terms not in ``dag``.

    Parameters
    ----------
    path
        GAF file (plain text).
    dag
        The goatools DAG; alt ids are mapped to their main id.

    Returns
    -------
    tuple
        ``(annotations, aliases, n_dropped)``: rows with main GO ids and the DAG's aspect, the
        ``(symbol, synonym)`` pairs from column 11 (identity rows included), and how many rows were
        dropped because their term is obsolete or absent from the ontology.
    """
    from goatools.anno.gaf_reader import GafReader

    validate_gaf(path)
    reader = GafReader(str(path), prt=None)
    rows: set[Annotation] = set()
    aliases: set[tuple[str, str]] = set()
    dropped = 0
    for nt in reader.associations:
        aliases.add((nt.DB_Symbol, nt.DB_Symbol))
        aliases.update((nt.DB_Symbol, s) for s in nt.DB_Synonym if s)
        if "NOT" in nt.Qualifier:
            continue
        term = dag.get(nt.GO_ID)
        if term is None:
            dropped += 1
            continue
        rows.add(Annotation(nt.DB_Symbol, term.item_id, _NAMESPACE_ASPECT[term.namespace], nt.Evidence_Code))
    return sorted(rows), sorted(aliases), dropped


def ancestors(dag: GODag, terms: Iterable[str], part_of: bool) -> dict[str, frozenset[str]]:
    """Return each term's ancestors up ``is_a`` (and ``part_of`` when asked), computed by goatools.

    Parameters
    ----------
    dag
        The goatools DAG (loaded with ``relationship``).
    terms
        GO ids whose ancestor sets are needed; ids missing from ``dag`` map to an empty set.
    part_of
        Also climb ``part_of`` edges.

    Returns
    -------
    dict
        GO id -> frozenset of ancestor GO ids (the term itself excluded).
    """
    from goatools.godag.go_tasks import get_id2parents, get_id2upperselect

    objs = {o.item_id: o for o in dag.values()}.values()
    id2up = get_id2upperselect(objs, {"part_of"}) if part_of else get_id2parents(objs)
    return {t: frozenset(id2up.get(dag[t].item_id, ())) if t in dag else frozenset() for t in terms}
