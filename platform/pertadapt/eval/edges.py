"""How well a gene–gene score recovers a known regulatory network: the AUROC of true edges against non-edges.

Numpy only. The score is any ``(N, N)`` matrix (here the in-silico perturbation score of a pretrained FM,
``train.pretrain``); the network is the simulator's (``uns['sim']``: ``edge_src``/``edge_dst`` as gene
indices). Pairs are unordered: a pair is an edge when either direction is one, and its score is the
larger of ``S[i, j]`` and ``S[j, i]``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["edge_auroc"]


def edge_auroc(score: np.ndarray, edge_src: np.ndarray, edge_dst: np.ndarray) -> float:
    """AUROC of ``score`` for the unordered gene pairs joined by an edge against all other pairs.

    Parameters
    ----------
    score
        ``(N, N)`` gene–gene score (higher = more likely joined); the diagonal is ignored.
    edge_src, edge_dst
        ``(n_edges,)`` gene indices of the true (directed) edges; self-loops are ignored.

    Returns
    -------
    float
        The Mann–Whitney AUROC (ties count one half): 0.5 = no better than chance.

    Raises
    ------
    ValueError
        When ``score`` is not square, an index is out of range, or there is no edge or no non-edge.
    """
    score = np.asarray(score, dtype=np.float64)
    n = score.shape[0]
    if score.ndim != 2 or score.shape[1] != n:
        raise ValueError(f"edge score: expected a square (N, N) matrix, got shape {score.shape}")
    src, dst = np.asarray(edge_src, dtype=np.int64), np.asarray(edge_dst, dtype=np.int64)
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge score: edge indices must lie in [0, {n})")
    joined = np.zeros((n, n), dtype=bool)
    joined[src, dst] = True
    joined |= joined.T
    iu, ju = np.triu_indices(n, 1)
    labels = joined[iu, ju]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"edge score: needs edges and non-edges among the {n} genes ({n_pos} edges)")
    sym = np.maximum(score, score.T)[iu, ju]
    ranks = rankdata(sym)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
