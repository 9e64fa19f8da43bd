"""HGNC names of the FM vocabulary on the NCBI-named bundled table: mitochondrial genes and suggestions."""

from __future__ import annotations

import pytest

from pertadapt.files import package_data
from pertadapt.go import (
    GOAnnotations,
    build_gene_graph,
    build_go_mask,
    load_annotations,
    resolve_symbols,
    suggest,
)

# HGNC symbol -> NCBI Gene symbol of the 13 mitochondrial protein-coding genes (NCBI Gene, HGNC).
MT_PROTEIN_CODING = {
    "MT-ATP6": "ATP6", "MT-ATP8": "ATP8", "MT-CO1": "COX1", "MT-CO2": "COX2", "MT-CO3": "COX3", "MT-CYB": "CYTB",
    "MT-ND1": "ND1", "MT-ND2": "ND2", "MT-ND3": "ND3", "MT-ND4": "ND4", "MT-ND4L": "ND4L", "MT-ND5": "ND5",
    "MT-ND6": "ND6",
}


@pytest.fixture(scope="module")
def bundled() -> GOAnnotations:
    return load_annotations("bundled")


def test_mt_protein_coding_genes_resolve_with_go(bundled: GOAnnotations) -> None:
    hgnc = list(MT_PROTEIN_CODING)
    res = resolve_symbols(bundled, [*hgnc, *(f"{g}__chrM" for g in hgnc)])
    assert res.unknown == ()
    assert res.symbols == tuple(MT_PROTEIN_CODING.values()) * 2
    assert all(bundled.gene2terms[s] for s in res.symbols)
    assert res.via_alias["MT-CO2"] == "COX2"  # not the pseudogene MTCO2P12, which lists MT-CO2 as an alias
    assert res.via_alias["MT-ND4L__chrM"] == "ND4L"


def test_mt_genes_in_mask_and_graph(bundled: GOAnnotations) -> None:
    genes = ["MT-CO1", "MT-CO2", "MT-CO3__chrM", "COX4I1", "MT-ND1", "NDUFS1", "TP53", "MT-TL1"]
    i = {g: k for k, g in enumerate(genes)}
    mask = build_go_mask(bundled, genes)
    assert mask.csr[i["MT-CO1"], i["MT-CO2"]]  # cytochrome c oxidase subunits share their GO terms
    assert mask.csr[i["MT-CO1"], i["MT-CO3__chrM"]]
    assert mask.degrees()[i["MT-CO1"]] >= 3
    assert mask.degrees()[i["MT-TL1"]] == 1  # a tRNA: known symbol (TRNL1), no GO, diagonal only
    graph = build_gene_graph(bundled, genes, top_k=3)
    into_co1 = set(graph.src[graph.dst == i["MT-CO1"]].tolist())
    assert {i["MT-CO2"], i["MT-CO3__chrM"]} <= into_co1


def test_fm_vocabulary_unknowns(bundled: GOAnnotations) -> None:
    vocab = package_data("fm_gene_vocab_19264.txt").read_text().split()
    assert len(vocab) == 19_264
    res = resolve_symbols(bundled, vocab)
    # 58 unknown before the HGNC mitochondrial names and the __chrM suffix were mapped
    assert res.unknown == ("CYP20", "NBArS")
    assert sorted(res.ambiguous) == ["CBWD3", "GBA", "H4-16"]
    with_go = sum(1 for s in res.symbols if s is not None and s in bundled.gene2terms)
    # before: 18,693 (MT-CO2 only, through the pseudogene MTCO2P12); now the other 12 and all 13 __chrM copies
    assert with_go == 18_693 + 12 + 13


@pytest.mark.parametrize(("name", "expected"), [
    ("tp53", ["TP53"]),  # case
    ("Mt-co3", ["COX3"]),  # case + punctuation, via the alias MTCO3
    ("GBA", ["GBA1", "GBAP1"]),  # ambiguous alias: both candidates
    ("NBArS", ["NBAS"]),  # spelling
    ("TP53XQ", []),  # nothing close enough
])
def test_suggest(bundled: GOAnnotations, name: str, expected: list[str]) -> None:
    assert suggest(bundled, name) == expected
