"""GEARS's co-expression graph: a hand-worked example, np.corrcoef on random data, cell selection, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from pertadapt.data.coexpression import coexpression_conditions, coexpression_graph, training_coexpression
from pertadapt.data.dataset import PerturbData

# Five cells × five genes. Centred: g0 = (-2, -1, 0, 1, 2), g1 = -g0, g2 = (-2, -1, 0, 2, 1),
# g3 = (-.4, .6, -.4, .6, -.4), g4 constant. Sums of squares 10, 10, 10, 1.2, 0.
# r(g0, g1) = -1; r(g0, g2) = 9/10; r(g1, g2) = -9/10; r(g0, g3) = r(g1, g3) = 0;
# r(g2, g3) = (0.8 - 0.6 + 0 + 1.2 - 0.4) / sqrt(10 · 1.2) = 1 / sqrt(12) = 0.288675; g4: NaN → 0.
HAND = np.array([[1, 5, 1, 0, 3],
                 [2, 4, 2, 1, 3],
                 [3, 3, 3, 0, 3],
                 [4, 2, 5, 1, 3],
                 [5, 1, 4, 0, 3]], dtype=np.float32)


def _edges(graph) -> dict[tuple[int, int], float]:
    return {(int(s), int(d)): float(w) for s, d, w in zip(graph.src, graph.dst, graph.weight, strict=True)}


@pytest.mark.parametrize("as_sparse", [False, True])
def test_hand_worked_example(as_sparse: bool) -> None:
    x = sp.csr_matrix(HAND) if as_sparse else HAND
    # top_k = 2: each gene keeps its 3 largest |r| (itself included), then |r| > threshold.
    got = _edges(coexpression_graph(x, top_k=2, threshold=0.4, gene_chunk=2, cell_chunk=2))
    expected = {
        (0, 0): 1.0, (1, 0): 1.0, (2, 0): 0.9,   # gene 0: |r| = 1, 1, .9, 0, 0
        (0, 1): 1.0, (1, 1): 1.0, (2, 1): 0.9,   # gene 1: the same
        (2, 2): 1.0, (0, 2): 0.9, (1, 2): 0.9,   # gene 2: 1, .9, .9 (0.2887 is fourth)
        (3, 3): 1.0,                             # gene 3: 0.2887 ≤ 0.4; gene 4 (constant): nothing
    }
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    lower = _edges(coexpression_graph(x, top_k=2, threshold=0.2))
    assert lower.keys() == expected.keys() | {(2, 3)}
    assert lower[(2, 3)] == pytest.approx(1 / np.sqrt(12), abs=1e-6)
    only_self = coexpression_graph(x, top_k=2, threshold=0.95)
    assert _edges(only_self).keys() == {(0, 0), (1, 0), (0, 1), (1, 1), (2, 2), (3, 3)}


def test_edges_are_grouped_by_target_then_descending_weight() -> None:
    g = coexpression_graph(HAND, top_k=2, threshold=0.4)
    assert list(g.dst) == sorted(g.dst)
    for d in np.unique(g.dst):
        w = g.weight[g.dst == d]
        assert list(w) == sorted(w, reverse=True)
    assert g.src.dtype == np.int64
    assert g.weight.dtype == np.float32
    assert g.n_genes == 5
    assert g.sha256 != coexpression_graph(HAND, top_k=2, threshold=0.2).sha256


@pytest.mark.parametrize(("top_k", "threshold"), [(3, 0.1), (6, 0.0), (60, 0.2)])
def test_matches_np_corrcoef_on_random_data(top_k: int, threshold: float) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((80, 40)) * (rng.random((80, 40)) > 0.4)).astype(np.float32)
    x[:, 10] += 3 * x[:, 3]  # some strong pairs
    x[:, 20] = 0.0           # a gene never expressed
    cells = np.sort(rng.choice(80, 70, replace=False))
    with np.errstate(invalid="ignore", divide="ignore"):  # the unexpressed gene's row is NaN, as in GEARS
        r = np.abs(np.nan_to_num(np.corrcoef(x[cells].T.astype(np.float64))))
    expected = {}
    for i in range(40):
        for j in np.argsort(-r[i], kind="stable")[: top_k + 1]:
            if r[i, j] > threshold:
                expected[(int(j), i)] = r[i, j]
    got = _edges(coexpression_graph(sp.csr_matrix(x), cells=cells, top_k=top_k, threshold=threshold,
                                    gene_chunk=7, cell_chunk=16))
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - v) for k, v in expected.items()) < 1e-5
    assert not any(20 in k for k in got)


def test_training_cells_are_control_and_singles(tmp_path: Path) -> None:
    """GEARS correlates the training cells whose condition contains 'ctrl': no doubles, nothing held out."""
    assert coexpression_conditions(["A+B", "A+ctrl", "ctrl", "ctrl+B"]) == ["A+ctrl", "ctrl", "ctrl+B"]
    rng = np.random.default_rng(1)
    n_genes = 6
    x = rng.random((40, n_genes)).astype(np.float32)
    conditions = ("A+B", "A+ctrl", "B+ctrl", "ctrl")
    cell_condition = np.repeat(np.arange(4), 10)
    x[:10, 0] += 10.0
    x[:10, 1] += 10.0  # only the double's cells make genes 0 and 1 co-expressed
    data = PerturbData(tuple(f"G{i}" for i in range(n_genes)), sp.csr_matrix(x), None, cell_condition,
                       np.zeros(40, np.int64), conditions, {}, {})
    graph = training_coexpression(data, ["A+B", "A+ctrl", "ctrl"], data_sha256="abc", top_k=2, threshold=0.3,
                                  cache_root=tmp_path)
    by_hand = coexpression_graph(np.vstack([x[10:20], x[30:40]]), top_k=2, threshold=0.3)
    assert _edges(graph) == _edges(by_hand)
    assert (0, 1) in _edges(coexpression_graph(x, top_k=2, threshold=0.3))  # with the double's cells
    assert (0, 1) not in _edges(graph)
    cached = list((tmp_path / "coexpression").glob("*.npz"))
    assert len(cached) == 1
    again = training_coexpression(data, ["ctrl", "A+ctrl", "A+B"], data_sha256="abc", top_k=2, threshold=0.3,
                                  cache_root=tmp_path)
    assert again.sha256 == graph.sha256
    cached[0].write_bytes(b"not an npz")  # a damaged cache entry is recomputed, not trusted
    assert training_coexpression(data, ["A+B", "A+ctrl", "ctrl"], data_sha256="abc", top_k=2, threshold=0.3,
                                 cache_root=tmp_path).sha256 == graph.sha256
    training_coexpression(data, ["A+ctrl", "ctrl"], data_sha256="abc", top_k=3, threshold=0.3, cache_root=tmp_path)
    assert len(list((tmp_path / "coexpression").glob("*.npz"))) == 2


def test_too_few_cells_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least two cells"):
        coexpression_graph(HAND, cells=np.array([0]))
