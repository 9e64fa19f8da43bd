"""GO sources: the bundled real table, OBO + GAF through goatools (with line-numbered errors), apt."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pertadapt.go import (
    GOAnnotations,
    GOError,
    GOFormatError,
    build_go_mask,
    coverage,
    load_annotations,
    resolve_symbols,
)

OBO = """format-version: 1.2
data-version: releases/2099-01-01

[Term]
id: GO:0000001
name: root process
namespace: biological_process

[Term]
id: GO:0000002
name: child process
namespace: biological_process
is_a: GO:0000001 ! root process

[Term]
id: GO:0000003
name: part of child
namespace: biological_process
alt_id: GO:0000033
relationship: part_of GO:0000002 ! child process

[Term]
id: GO:0000004
name: some function
namespace: molecular_function
"""


def _gaf_line(symbol: str, go: str, aspect: str = "P", qualifier: str = "", syn: str = "") -> str:
    cols = ["UniProtKB", f"P{symbol}", symbol, qualifier, go, "PMID:1", "IDA", "", aspect, "", syn,
            "protein", "taxon:9606", "20200101", "UniProt", "", ""]
    return "\t".join(cols) + "\n"


@pytest.fixture
def obo_gaf(tmp_path: Path) -> tuple[Path, Path]:
    obo, gaf = tmp_path / "go.obo", tmp_path / "a.gaf"
    obo.write_text(OBO)
    gaf.write_text("!gaf-version: 2.2\n" + _gaf_line("AAA", "GO:0000003", syn="OLDA")
                   + _gaf_line("BBB", "GO:0000002") + _gaf_line("BBB", "GO:0000004", "F")
                   + _gaf_line("CCC", "GO:0000033") + _gaf_line("CCC", "GO:0000004", "F", "NOT|enables"))
    return obo, gaf


def test_obo_gaf_direct_and_propagated(obo_gaf: tuple[Path, Path], tmp_path: Path) -> None:
    obo, gaf = obo_gaf
    ann = load_annotations("obo", obo=obo, gaf=gaf, cache_dir=tmp_path)
    assert ann.gene2terms["AAA"] == {"GO:0000003"}
    assert ann.gene2terms["BBB"] == {"GO:0000002", "GO:0000004"}
    assert ann.gene2terms["CCC"] == {"GO:0000003"}  # alt id mapped, NOT annotation dropped
    assert ann.version["go_release"] == "releases/2099-01-01"
    assert resolve_symbols(ann, ["OLDA"]).symbols == ("AAA",)
    bp = load_annotations("obo", obo=obo, gaf=gaf, aspects=("BP",))
    assert bp.gene2terms["BBB"] == {"GO:0000002"}
    isa = load_annotations("obo", obo=obo, gaf=gaf, propagate=True)
    assert isa.gene2terms["BBB"] == {"GO:0000001", "GO:0000002", "GO:0000004"}
    assert isa.gene2terms["AAA"] == {"GO:0000003"}  # part_of is not climbed by default
    part = load_annotations("obo", obo=obo, gaf=gaf, propagate=True, part_of=True)
    assert part.gene2terms["AAA"] == {"GO:0000001", "GO:0000002", "GO:0000003"}
    assert part.sha256() != isa.sha256() != ann.sha256()


@pytest.mark.parametrize(("text", "line", "match"), [
    (OBO.replace("id: GO:0000002", "id GO:0000002"), 10, "tag: value"),
    (OBO.replace("is_a: GO:0000001", "is_a: GO:0000099"), 13, "not a term defined"),
    (OBO.replace("id: GO:0000004", "id: nonsense"), 23, "not an identifier"),
    (OBO.replace("[Term]\nid: GO:0000004\n", "[Term]\n"), 22, "0 'id:' lines"),
])
def test_malformed_obo_line_number(obo_gaf: tuple[Path, Path], text: str, line: int, match: str) -> None:
    obo, gaf = obo_gaf
    obo.write_text(text)
    with pytest.raises(GOFormatError, match=match) as err:
        load_annotations("obo", obo=obo, gaf=gaf)
    assert err.value.line == line
    assert str(obo) in str(err.value)


@pytest.mark.parametrize(("bad", "match"), [
    ("UniProtKB\tP1\tX\t\tGO:0000001\n", "at least 15"),
    (_gaf_line("X", "GO:1"), "column 5"),
    (_gaf_line("X", "GO:0000001", aspect="Q"), "aspect"),
    (_gaf_line("", "GO:0000001"), "Symbol"),
])
def test_malformed_gaf_line_number(obo_gaf: tuple[Path, Path], bad: str, match: str) -> None:
    obo, gaf = obo_gaf
    gaf.write_text("!gaf-version: 2.2\n!comment\n" + _gaf_line("AAA", "GO:0000003") + bad)
    with pytest.raises(GOFormatError, match=match) as err:
        load_annotations("obo", obo=obo, gaf=gaf)
    assert err.value.line == 4
    assert f"{gaf}:4" in str(err.value)


def test_bad_source_arguments(obo_gaf: tuple[Path, Path]) -> None:
    with pytest.raises(GOError, match="obo"):
        load_annotations("obo", obo=obo_gaf[0])
    with pytest.raises(GOError, match="aspects"):
        load_annotations("bundled", aspects=("XX",))
    with pytest.raises(GOError, match="unknown GO source"):
        load_annotations("internet")


@pytest.fixture(scope="module")
def bundled() -> GOAnnotations:
    return load_annotations("bundled")


def test_bundled_table_sanity(bundled: GOAnnotations) -> None:
    assert len(bundled.gene2terms) >= 18_000
    assert len(bundled.gene2terms["TP53"]) >= 100
    assert {"GO:0006915", "GO:0003700"} & bundled.gene2terms["TP53"]  # apoptotic process / DNA-binding TF
    assert bundled.version["go_release"] >= "2022-07-01"
    assert bundled.term_name["GO:0006915"] == "apoptotic process"
    assert bundled.term_aspect["GO:0006915"] == "BP"
    assert len(bundled.symbols) > 60_000
    res = resolve_symbols(bundled, ["TP53", "ARNTL", "GBA", "NOT_A_GENE_1"])
    assert res.symbols[:2] == ("TP53", "BMAL1")
    assert "GBA" in res.ambiguous
    assert res.unknown == ("NOT_A_GENE_1",)
    assert len(bundled.sha256()) == 64


def test_bundled_neighbours_and_coverage(bundled: GOAnnotations) -> None:
    genes = ["TP53", "MDM2", "MDM4", "KRAS", "NRAS", "HRAS", "HK1", "HK2", "HK3", "GCK", "OR2A4", "MT-TL1"]
    m = build_go_mask(bundled, genes)
    i = {g: k for k, g in enumerate(genes)}
    assert m.csr[i["KRAS"], i["NRAS"]]
    assert m.csr[i["HK1"], i["HK3"]]
    assert m.csr[i["MDM2"], i["MDM4"]]
    assert not m.csr[i["TP53"], i["OR2A4"]]
    rep = coverage(bundled, genes, ["TP53", "MT-TL1", "ZZZ9"], mask=m)
    assert rep["n_vocab"] == 12
    assert rep["n_vocab_with_go"] == 11
    assert rep["targets_without_go"] == ["MT-TL1", "ZZZ9"]
    assert rep["targets_not_in_vocab"] == ["ZZZ9"]
    assert rep["mask_density"] == pytest.approx(m.density)
    assert np.isfinite(rep["mask_mean_degree"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="apt-get/dpkg-deb unavailable")
def test_debian_download_matches_bundled(tmp_path: Path, bundled: GOAnnotations) -> None:
    probe = subprocess.run(["apt-cache", "show", "r-bioc-go.db"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("apt does not know r-bioc-go.db here (run apt-get update)")
    deb = load_annotations("debian", cache_dir=tmp_path)
    assert len(deb.gene2terms) >= 18_000
    assert deb.version["go_release"]
    assert "deb:r-bioc-go.db" in deb.version
    assert "deb:r-bioc-org.hs.eg.db" in deb.version
    if deb.version["go_release"] == bundled.version["go_release"]:
        assert deb.sha256() == bundled.sha256()


def test_write_obo_from_terms_table(tmp_path: Path) -> None:
    from pertadapt.go.obo import ancestors, load_dag
    from pertadapt.go.sources import TERM_COLUMNS, rows_frame, write_obo

    terms = rows_frame([("GO:0000001", "BP", "root", "", ""), ("GO:0000002", "BP", "child", "GO:0000001", ""),
                        ("GO:0000003", "BP", "part", "", "GO:0000002"),
                        ("GO:0000004", "BP", "two parents", "GO:0000001|GO:0000002", "")], TERM_COLUMNS)
    write_obo(terms, tmp_path / "t.obo", "2099-01-01")
    dag = load_dag(tmp_path / "t.obo")
    assert dag.data_version == "releases/2099-01-01"
    assert ancestors(dag, ["GO:0000004"], part_of=False)["GO:0000004"] == {"GO:0000001", "GO:0000002"}
    assert ancestors(dag, ["GO:0000003"], part_of=False)["GO:0000003"] == frozenset()
    assert ancestors(dag, ["GO:0000003"], part_of=True)["GO:0000003"] == {"GO:0000001", "GO:0000002"}
    assert [p.name for p in tmp_path.iterdir()] == ["t.obo"]  # written atomically, no temporary left
