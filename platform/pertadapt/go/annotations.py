"""The in-memory GO annotation table (gene symbol -> GO term set) and its three sources."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pertadapt.files import cache_dir as cache_root
from pertadapt.go.errors import GeneListError, GOOptionError
from pertadapt.go.sources import (
    ALIAS_COLUMNS,
    Annotation,
    GOTables,
    fetch_debian,
    read_bundled,
    read_debian,
    rows_frame,
    write_obo,
)

if TYPE_CHECKING:
    from goatools.obo_parser import GODag

__all__ = ["ASPECTS", "HGNC_MITOCHONDRIAL", "SOURCES", "GOAnnotations", "SymbolResolution", "check_source",
           "load_annotations", "resolve_symbols", "suggest"]

log = logging.getLogger(__name__)

ASPECTS = ("BP", "MF", "CC")
SOURCES = ("bundled", "debian", "obo")

#: HGNC symbol -> NCBI Gene symbol of the 37 mitochondrially encoded genes: the 13 protein-coding
#: ones (NCBI Gene ids 4508, 4509, 4512-4514, 4519, 4535-4541), the two rRNAs and the 22 tRNAs
#: (``MT-TL1`` -> ``TRNL1``). FM vocabularies use the HGNC names; NCBI's gene_info (hence
#: org.Hs.eg.db and the bundled table) uses the short ones and does not list the HGNC names as
#: aliases (``MT-CO2`` is even an alias of the pseudogene ``MTCO2P12`` there).
HGNC_MITOCHONDRIAL = MappingProxyType({
    "MT-ATP6": "ATP6", "MT-ATP8": "ATP8", "MT-CO1": "COX1", "MT-CO2": "COX2", "MT-CO3": "COX3",
    "MT-CYB": "CYTB", "MT-ND1": "ND1", "MT-ND2": "ND2", "MT-ND3": "ND3", "MT-ND4": "ND4", "MT-ND4L": "ND4L",
    "MT-ND5": "ND5", "MT-ND6": "ND6", "MT-RNR1": "RNR1", "MT-RNR2": "RNR2",
    **{f"MT-T{aa}": f"TRN{aa}" for aa in ("A", "C", "D", "E", "F", "G", "H", "I", "K", "L1", "L2", "M", "N", "P",
                                         "Q", "R", "S1", "S2", "T", "V", "W", "Y")},
})
#: Suffix some FM vocabularies append to a duplicated symbol to name its chromosome (``MT-ND1__chrM``).
_CHROM_SUFFIX = re.compile(r"^(?P<base>.+)__chr[0-9A-Za-z]+$")
_NOT_ALNUM = re.compile(r"[^0-9A-Z]")
_FUZZY_CUTOFF = 85.0


@dataclass(frozen=True)
class GOAnnotations:
    """Gene symbol -> GO term set, with provenance.

    Attributes
    ----------
    gene2terms
        Annotated symbol -> frozenset of GO ids (only genes with at least one term).
    source
        ``bundled``, ``debian`` or ``obo``.
    version
        Release dates and package versions (e.g. ``go_release``, ``gene2go_date``, ``GO.db``).
    aspects
        Aspects kept (subset of BP, MF, CC).
    propagate
        Whether term sets include all ``is_a`` (and optionally ``part_of``) ancestors.
    term_aspect
        GO id -> aspect, for every term of the ontology.
    term_name
        GO id -> term name, for reports.
    symbols
        Every known gene symbol, annotated or not (the NCBI symbol universe for the human
        sources; the GAF's symbols for ``obo``).
    aliases
        Alias -> candidate official symbols (sorted); one candidate = unambiguous.
    """

    gene2terms: Mapping[str, frozenset[str]]
    source: str
    version: Mapping[str, str]
    aspects: tuple[str, ...]
    propagate: bool
    term_aspect: Mapping[str, str] = field(default_factory=dict, repr=False)
    term_name: Mapping[str, str] = field(default_factory=dict, repr=False)
    symbols: frozenset[str] = field(default_factory=frozenset, repr=False)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def sha256(self) -> str:
        """Hex sha256 of the content: aspects, propagation flag and every gene's sorted term set."""
        h = hashlib.sha256(f"{','.join(self.aspects)}|{int(self.propagate)}\n".encode())
        for gene in sorted(self.gene2terms):
            h.update(f"{gene}\t{','.join(sorted(self.gene2terms[gene]))}\n".encode())
        return h.hexdigest()

    @property
    def n_terms(self) -> int:
        """Number of distinct GO terms used by the annotations."""
        return len(frozenset().union(*self.gene2terms.values()))

    @cached_property
    def sorted_symbols(self) -> tuple[str, ...]:
        """Every known symbol (annotated or not), sorted: the candidates of spelling suggestions."""
        return tuple(sorted(self.symbols | self.gene2terms.keys()))


@dataclass(frozen=True)
class SymbolResolution:
    """How each requested gene name maps onto the annotation table.

    Attributes
    ----------
    genes
        The requested names, in order.
    symbols
        Official symbol for each requested name (``None`` when unknown or ambiguous).
    via_alias
        Name -> symbol for names resolved through an unambiguous alias (HGNC mitochondrial names
        included) or by dropping a chromosome suffix.
    ambiguous
        Name -> candidate symbols for aliases shared by several genes (left unresolved).
    unknown
        Names that are neither a symbol nor an alias.
    """

    genes: tuple[str, ...]
    symbols: tuple[str | None, ...]
    via_alias: Mapping[str, str]
    ambiguous: Mapping[str, tuple[str, ...]]
    unknown: tuple[str, ...]


def _check_unique(genes: Sequence[str]) -> None:
    dups = sorted(g for g, n in Counter(genes).items() if n > 1)
    if dups:
        shown = ", ".join(dups[:20]) + (" …" if len(dups) > 20 else "")
        raise GeneListError(f"gene list has {len(dups)} duplicated name(s): {shown}")


def resolve_symbols(ann: GOAnnotations, genes: Sequence[str]) -> SymbolResolution:
    """Map gene names to official symbols: exact symbol first, then an unambiguous alias.

    A name ending in a chromosome suffix (``MT-ND1__chrM``, used by FM vocabularies for duplicated
    symbols) that is not itself known resolves as the name without the suffix.

    Parameters
    ----------
    ann
        Annotation table.
    genes
        Names to resolve, shape (N,); must be unique.

    Returns
    -------
    SymbolResolution

    Raises
    ------
    GeneListError
        The list contains duplicates (they are named).
    """
    _check_unique(genes)
    symbols: list[str | None] = []
    via_alias: dict[str, str] = {}
    ambiguous: dict[str, tuple[str, ...]] = {}
    unknown: list[str] = []
    for g in genes:
        name = g
        suffixed = _CHROM_SUFFIX.match(g)
        if suffixed and g not in ann.symbols and g not in ann.aliases:
            name = suffixed["base"]
        if name in ann.gene2terms or name in ann.symbols:
            symbols.append(name)
            if name != g:
                via_alias[g] = name
            continue
        cands = ann.aliases.get(name, ())
        if len(cands) == 1:
            symbols.append(cands[0])
            via_alias[g] = cands[0]
        else:
            symbols.append(None)
            if cands:
                ambiguous[g] = cands
            else:
                unknown.append(g)
    if via_alias or ambiguous:
        log.debug("resolved %d names via aliases; %d ambiguous aliases left unresolved: %s", len(via_alias),
                  len(ambiguous), ", ".join(sorted(ambiguous)[:20]))
    return SymbolResolution(tuple(genes), tuple(symbols), MappingProxyType(via_alias),
                            MappingProxyType(ambiguous), tuple(unknown))


def suggest(ann: GOAnnotations, name: str, n: int = 3) -> list[str]:
    """Suggest official symbols for an unknown or ambiguous name.

    Candidates, best first: the symbols that the name, its upper-case form and that form without
    punctuation name as a symbol or alias (``tp53`` -> TP53, ``Mt-co3`` -> COX3 via the alias
    ``MTCO3``); else the closest spellings among all symbols (rapidfuzz ratio >= 85, about 10 ms).

    Parameters
    ----------
    ann
        Annotation table.
    name
        The unknown gene name.
    n
        Most spelling suggestions returned.

    Returns
    -------
    list of str
        Candidate symbols, best first.
    """
    from rapidfuzz import fuzz, process

    upper = name.upper()
    out: list[str] = []
    for variant in dict.fromkeys((name, upper, _NOT_ALNUM.sub("", upper))):
        if variant != name and (variant in ann.symbols or variant in ann.gene2terms):
            out.append(variant)
        out += ann.aliases.get(variant, ())
    if not out:
        hits = process.extract(name.upper(), ann.sorted_symbols, scorer=fuzz.ratio, limit=n, score_cutoff=_FUZZY_CUTOFF)
        out = [symbol for symbol, _, _ in hits]
    return list(dict.fromkeys(out))


def _with_hgnc_mitochondrial(aliases: dict[str, tuple[str, ...]], symbols: frozenset[str]) -> None:
    """Let each HGNC ``MT-`` name resolve to its NCBI symbol where only the latter is a symbol here."""
    for hgnc, ncbi in HGNC_MITOCHONDRIAL.items():
        if hgnc not in symbols and ncbi in symbols:
            aliases[hgnc] = (ncbi,)


def _alias_map(pairs: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Alias -> sorted candidate symbols, from ``(symbol, alias)`` rows (identity rows ignored)."""
    real = pairs.loc[pairs["alias"] != pairs["symbol"]]
    return {a: tuple(sorted(set(s))) for a, s in _grouped(real["alias"], real["symbol"])}


def check_source(source: str, aspects: Sequence[str] = ASPECTS, *, obo: object = None, gaf: object = None) -> None:
    """Check the options of :func:`load_annotations` without reading anything.

    Raises
    ------
    GOOptionError
        Unknown source, aspects outside BP/MF/CC, or ``obo`` source without both files.
    """
    if source not in SOURCES:
        raise GOOptionError(f"unknown GO source {source!r}; expected one of {', '.join(SOURCES)}")
    bad = [a for a in aspects if a not in ASPECTS]
    if bad or not aspects:
        raise GOOptionError(f"aspects must be a non-empty subset of BP, MF, CC; got {list(aspects)}")
    if source == "obo" and (obo is None or gaf is None):
        raise GOOptionError("source='obo' needs both an OBO file (obo=) and a GAF file (gaf=)")


def _dag_for_terms(terms: pd.DataFrame, version: Mapping[str, str], cache_dir: Path) -> GODag:
    from pertadapt.go.obo import load_dag

    path = cache_dir / "go" / "obo" / f"go-{version.get('go_release', 'unknown')}-{len(terms)}.obo"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_obo(terms, path, version.get("go_release", "unknown"))
    return load_dag(path)


def load_annotations(source: str = "bundled", *, obo: str | os.PathLike[str] | None = None,
                     gaf: str | os.PathLike[str] | None = None, aspects: Sequence[str] = ASPECTS,
                     propagate: bool = False, part_of: bool = False, exclude_evidence: Sequence[str] = (),
                     cache_dir: str | os.PathLike[str] | None = None) -> GOAnnotations:
    """Load a GO annotation table.

    Parameters
    ----------
    source
        ``bundled`` (package data: GO 2022-07-01 / NCBI gene2go 2022-09-12, human), ``debian``
        (download ``r-bioc-go.db`` + ``r-bioc-org.hs.eg.db`` with apt-get into the cache, once) or
        ``obo`` (your ``obo`` + ``gaf`` files, read with goatools).
    obo, gaf
        Ontology and annotation files for ``source="obo"``.
    aspects
        Aspects to keep (BP, MF, CC).
    propagate
        Add all ancestors up ``is_a`` (goatools) to every gene's term set; the default is direct
        annotations, as GEARS.
    part_of
        With ``propagate``, also climb ``part_of`` edges.
    exclude_evidence
        Evidence codes to drop (e.g. ``("ND", "IEA")``); GEARS keeps all.
    cache_dir
        Cache root (default ``$PERTADAPT_CACHE`` or ``~/.cache/pertadapt``).

    Returns
    -------
    GOAnnotations
        Its ``aliases`` also map the HGNC names of the 37 mitochondrial genes
        (:data:`HGNC_MITOCHONDRIAL`, ``MT-ATP6`` ...) to their NCBI symbols where the source uses those.

    Raises
    ------
    GOError
        :class:`GOOptionError` for bad arguments; :class:`GOFormatError` for malformed files (with line number);
        :class:`GOSourceUnavailable` when apt is unavailable for ``debian``.
    """
    check_source(source, aspects, obo=obo, gaf=gaf)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    dag = None
    if source == "obo":
        assert obo is not None, "checked by check_source"
        assert gaf is not None, "checked by check_source"
        from pertadapt.go.obo import load_dag, read_gaf

        dag = load_dag(Path(obo))
        rows, alias_pairs, dropped = read_gaf(Path(gaf), dag)
        if dropped:
            log.warning("%s: %d annotation rows use terms absent from %s (obsolete?); dropped", gaf, dropped, obo)
        rows_table, alias_table = rows_frame(rows, Annotation._fields), rows_frame(alias_pairs, ALIAS_COLUMNS)
        version = {"obo": str(obo), "gaf": str(gaf), "go_release": str(dag.data_version)}
        uniq = {o.item_id: o for o in dag.values()}.values()
        term_aspect = {o.item_id: {"biological_process": "BP", "molecular_function": "MF",
                                   "cellular_component": "CC"}.get(o.namespace, "") for o in uniq}
        term_name = {o.item_id: o.name for o in uniq}
    else:
        tables: GOTables = read_bundled() if source == "bundled" else read_debian(fetch_debian(cache))
        rows_table, alias_table, version = tables.annotations, tables.aliases, tables.version
        term_aspect = dict(zip(tables.terms["go_id"], tables.terms["aspect"], strict=True))
        term_name = dict(zip(tables.terms["go_id"], tables.terms["name"], strict=True))
        if propagate:
            dag = _dag_for_terms(tables.terms, version, cache)
    gene2terms = _direct(rows_table, aspects, exclude_evidence)
    if propagate:
        assert dag is not None
        up = _ancestors_of(dag, gene2terms, part_of)
        keep = set(aspects)
        gene2terms = {g: frozenset(t for t in ts.union(*(up[x] for x in ts)) if term_aspect.get(t) in keep)
                      for g, ts in gene2terms.items()}
    symbols = frozenset(alias_table["symbol"]) | frozenset(gene2terms)
    version = dict(version)
    if exclude_evidence:
        version["exclude_evidence"] = ",".join(sorted(exclude_evidence))
    if part_of and propagate:
        version["propagate_relationships"] = "is_a,part_of"
    aliases = _alias_map(alias_table)
    _with_hgnc_mitochondrial(aliases, symbols)
    ann = GOAnnotations(MappingProxyType(gene2terms), source, MappingProxyType(version), tuple(aspects), propagate,
                        MappingProxyType(term_aspect), MappingProxyType(term_name), symbols,
                        MappingProxyType(aliases))
    log.info("GO annotations (%s, GO %s): %d genes, %d terms, aspects %s, %s", source,
             version.get("go_release", "?"), len(gene2terms), ann.n_terms, "+".join(aspects),
             "propagated" if propagate else "direct")
    return ann


def _grouped(keys: pd.Series, values: pd.Series) -> Iterator[tuple[str, list[str]]]:
    """``(key, values of that key)`` for each distinct key, keys in first-seen order (one stable sort)."""
    codes, uniques = pd.factorize(keys)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    vals = values.to_numpy()[order]
    for k, key in enumerate(uniques):
        yield key, vals[bounds[k]:bounds[k + 1]].tolist()


def _direct(rows: pd.DataFrame, aspects: Sequence[str], exclude: Sequence[str]) -> dict[str, frozenset[str]]:
    keep = rows["aspect"].isin(list(aspects)) & ~rows["evidence"].isin(list(exclude))
    kept = rows.loc[keep]
    return {g: frozenset(ts) for g, ts in _grouped(kept["symbol"], kept["go_id"])}


def _ancestors_of(dag: GODag, gene2terms: Mapping[str, frozenset[str]], part_of: bool) -> dict[str, frozenset[str]]:
    from pertadapt.go.obo import ancestors

    used = frozenset().union(*gene2terms.values()) if gene2terms else frozenset()
    return ancestors(dag, used, part_of)
