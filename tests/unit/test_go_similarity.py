"""Jaccard, GEARS graph and GO mask on a tiny hand-checkable annotation table."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import scipy.sparse as sp

from pertadapt.go import (
    GeneGraph,
    GeneListError,
    GOAnnotations,
    GOError,
    build_gene_graph,
    build_go_mask,
    build_graph_and_mask,
    cached_go_mask,
    jaccard_matrix,
    load_gene_graph,
    load_go_mask,
    save_gene_graph,
    save_go_mask,
)


def _ann(table: dict[str, set[str]], aliases: dict[str, tuple[str, ...]] | None = None) -> GOAnnotations:
    g2t = {g: frozenset(t) for g, t in table.items()}
    return GOAnnotations(MappingProxyType(g2t), "test", MappingProxyType({"go_release": "test"}),
                         ("BP", "MF", "CC"), False, symbols=frozenset(g2t) | {"NOGO"},
                         aliases=MappingProxyType(aliases or {}))


@pytest.fixture
def tiny() -> GOAnnotations:
    # A={1,2,3}  B={2,3,4}  C={5}  D={1,2,3,4,5,6}  NOGO: known, no terms
    return _ann({"A": {"GO:1", "GO:2", "GO:3"}, "B": {"GO:2", "GO:3", "GO:4"}, "C": {"GO:5"},
                 "D": {"GO:1", "GO:2", "GO:3", "GO:4", "GO:5", "GO:6"}}, {"OLD_A": ("A",), "AMB": ("A", "B")})


def test_jaccard_hand_checked(tiny: GOAnnotations) -> None:
    genes = ["A", "B", "C", "D", "NOGO"]
    j = jaccard_matrix(tiny, genes, block=2)
    assert sp.issparse(j)
    assert j.format == "csr"
    assert j.dtype == np.float32
    d = j.toarray()
    assert d[0, 1] == pytest.approx(2 / 4)  # |{2,3}| / |{1,2,3,4}|
    assert d[0, 3] == pytest.approx(3 / 6)
    assert d[2, 3] == pytest.approx(1 / 6)
    assert d[0, 2] == 0.0
    assert np.allclose(np.diag(d)[:4], 1.0)
    assert j[4].nnz == 0
    assert j[:, 4].nnz == 0
    np.testing.assert_array_equal(d, d.T)


def test_jaccard_threshold_and_alias(tiny: GOAnnotations) -> None:
    j = jaccard_matrix(tiny, ["OLD_A", "C", "B", "D", "AMB"], threshold=0.2).toarray()
    assert j.shape == (5, 5)
    assert j[0, 2] == pytest.approx(0.5)  # OLD_A resolves to A: |{2,3}| / |{1,2,3,4}|
    assert j[0, 3] == pytest.approx(0.5)
    assert j[1, 3] == 0.0  # 1/6 is below the 0.2 threshold
    assert not j[4].any()  # ambiguous alias is not resolved
    assert not j[:, 4].any()


def test_graph_topk_and_self_loops(tiny: GOAnnotations) -> None:
    genes = ["A", "B", "C", "D", "NOGO"]
    g = build_gene_graph(tiny, genes, threshold=0.1, top_k=1, block=2)
    assert isinstance(g, GeneGraph)
    assert g.src.dtype == np.int64
    assert g.weight.dtype == np.float32
    edges = {(int(s), int(d)): float(w) for s, d, w in zip(g.src, g.dst, g.weight, strict=True)}
    for i in range(5):
        assert edges[(i, i)] == 1.0
    assert sum(1 for _, d in edges if d == 4) == 1  # NOGO: only its self-loop
    # target A: B (0.5) and D (0.5) tie -> lower index B wins with top_k=1
    assert [s for s, d in edges if d == 0 and s != 0] == [1]
    # target C: only D has J = 1/6 > 0.1
    assert [s for s, d in edges if d == 2 and s != 2] == [3]
    big = build_gene_graph(tiny, genes, threshold=0.1, top_k=20)
    assert sorted(int(s) for s, d in zip(big.src, big.dst, strict=True) if d == 3) == [0, 1, 2, 3]
    assert np.all(np.diff(big.dst) >= 0)
    higher = build_gene_graph(tiny, genes, threshold=0.4, top_k=20)
    assert higher.n_edges < big.n_edges


def test_mask_properties(tiny: GOAnnotations) -> None:
    genes = ["A", "B", "C", "D", "NOGO"]
    m = build_go_mask(tiny, genes, threshold=0.1, block=2)
    assert isinstance(m.csr, sp.csr_matrix)
    assert m.csr.dtype == bool
    assert m.csr.has_sorted_indices
    assert (m.csr != m.csr.T).nnz == 0
    assert m.csr.diagonal().all()
    expected = {(0, 1), (0, 3), (1, 3), (2, 3)}
    got = {(int(i), int(j)) for i, j in zip(*sp.triu(m.csr, 1).nonzero(), strict=True)}
    assert got == expected
    assert m.density == pytest.approx((5 + 2 * 4) / 25)
    assert m.mean_degree == pytest.approx(13 / 5)
    dens = [build_go_mask(tiny, genes, threshold=t).density for t in (0.0, 0.1, 0.3, 0.5, 0.9)]
    assert dens == sorted(dens, reverse=True)
    assert dens[-1] == pytest.approx(5 / 25)
    graph, m2 = build_graph_and_mask(tiny, genes, graph_threshold=0.1, top_k=1, mask_threshold=0.1)
    assert m2.sha256 == m.sha256
    assert graph.n_edges == build_gene_graph(tiny, genes, top_k=1).n_edges


def test_mask_none_not_materialised(tiny: GOAnnotations) -> None:
    m = build_go_mask(tiny, ["A", "B", "C"], kind="none")
    assert m.csr is None
    assert m.density == 1.0
    assert m.mean_degree == 3.0
    assert m.sha256 != build_go_mask(tiny, ["A", "B", "C"]).sha256


def _random_table(n_genes: int, n_terms: int, seed: int) -> GOAnnotations:
    rng = np.random.default_rng(seed)
    table = {f"G{i}": {f"GO:{t}" for t in rng.choice(n_terms, size=rng.integers(1, 8), replace=False)}
             for i in range(n_genes)}
    return _ann(table)


def test_random_degree_matched_keeps_degrees_changes_partners() -> None:
    ann = _random_table(400, 60, 0)
    genes = [f"G{i}" for i in range(400)]
    go = build_go_mask(ann, genes, threshold=0.1)
    rnd = build_go_mask(ann, genes, threshold=0.1, kind="random_degree_matched", seed=1)
    assert (rnd.csr != rnd.csr.T).nnz == 0
    assert rnd.csr.diagonal().all()
    assert rnd.csr.dtype == bool
    d_go, d_rnd = go.degrees(), rnd.degrees()
    assert np.abs(d_go - d_rnd).sum() <= 0.01 * d_go.sum()
    assert np.mean(d_go == d_rnd) > 0.95
    off_go, off_rnd = sp.triu(go.csr, 1), sp.triu(rnd.csr, 1)
    shared = off_go.multiply(off_rnd).nnz / off_go.nnz
    assert shared < 3 * go.density  # about what random partners share by chance
    again = build_go_mask(ann, genes, threshold=0.1, kind="random_degree_matched", seed=1)
    assert again.sha256 == rnd.sha256
    assert build_go_mask(ann, genes, threshold=0.1, kind="random_degree_matched", seed=2).sha256 != rnd.sha256


def test_bad_inputs(tiny: GOAnnotations) -> None:
    with pytest.raises(GeneListError, match="duplicated.*A"):
        build_go_mask(tiny, ["A", "B", "A"])
    with pytest.raises(GeneListError, match="none of the 2 genes"):
        build_gene_graph(tiny, ["NOGO", "UNKNOWN"])
    with pytest.raises(GOError, match="threshold"):
        build_go_mask(tiny, ["A"], threshold=1.0)
    with pytest.raises(GOError, match="kind"):
        build_go_mask(tiny, ["A"], kind="dense")


def test_save_load_roundtrip_and_cache(tiny: GOAnnotations, tmp_path: Path) -> None:
    genes = ["A", "B", "C", "D", "NOGO"]
    g, m = build_graph_and_mask(tiny, genes)
    save_go_mask(m, tmp_path / "m")
    save_gene_graph(g, tmp_path / "g")
    m2, g2 = load_go_mask(tmp_path / "m"), load_gene_graph(tmp_path / "g.json")
    assert m2.genes == m.genes
    assert m2.sha256 == m.sha256
    assert (m2.csr != m.csr).nnz == 0
    assert g2.sha256 == g.sha256
    assert g2.genes == g.genes
    full = build_go_mask(tiny, genes, kind="none")
    save_go_mask(full, tmp_path / "full")
    assert load_go_mask(tmp_path / "full").csr is None
    # a corrupted structure is refused
    np.savez(tmp_path / "m.npz", indptr=m.csr.indptr, indices=np.zeros_like(m.csr.indices))
    with pytest.raises(GOError, match="sha256"):
        load_go_mask(tmp_path / "m")
    c1 = cached_go_mask(tiny, genes, cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "go" / "built").iterdir())
    assert len(files) == 2
    assert not any(n.endswith(".tmp") for n in files)
    c2 = cached_go_mask(tiny, genes, cache_dir=tmp_path)
    assert c1.sha256 == c2.sha256
    cached_go_mask(tiny, genes, threshold=0.3, cache_dir=tmp_path)
    assert len(list((tmp_path / "go" / "built").iterdir())) == 4
