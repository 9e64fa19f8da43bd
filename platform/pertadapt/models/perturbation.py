"""GEARS-style perturbation encoder: embedding table, one SGConv step over the GO gene graph, MLP.

The SGConv step (:class:`GraphPropagation`) is also the co-expression step of the FM-baseline decoder.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GraphPropagation", "PerturbationEncoder", "max_norm_rows", "mlp_bn"]


def max_norm_rows(weight: torch.Tensor, max_norm: float = 1.0) -> torch.Tensor:
    """Rows of ``weight`` rescaled to L2 norm ≤ ``max_norm`` (out of place).

    ``nn.Embedding(max_norm=...)`` renormalises the stored weight in place during the forward pass,
    which sharded engines (ZeRO) silently undo; this functional form gives the same embedding on every
    engine. Unlike the in-place version, the gradient flows through the rescaling.

    Parameters
    ----------
    weight
        ``(n, d)`` embedding table.
    max_norm
        Largest allowed row norm.
    """
    norms = weight.norm(dim=1, keepdim=True).clamp(min=1e-7)
    return weight * (max_norm / norms).clamp(max=1.0)


def mlp_bn(sizes: list[int]) -> nn.Sequential:
    """``Linear-BN-ReLU-…-Linear-BN`` (the last ReLU dropped, as GEARS' ``MLP`` does)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class GraphPropagation(nn.Module):
    """One parameter-free SGConv step (``K = 1``): ``X' = D^-1/2 (A + I) D^-1/2 X`` over a weighted graph.

    Edges run ``src → dst`` (node ``dst`` sums its in-neighbours, as PyG's ``source_to_target`` flow);
    a self-loop of weight 1 is added to every node that has none (PyG ``add_remaining_self_loops``), and
    the degree is the weighted in-degree. The learned ``Linear`` of an SGConv stays with its caller.

    Parameters
    ----------
    n_nodes
        Number of nodes ``n``.
    edge_src, edge_dst, edge_weight
        ``(n_edges,)`` edge list.
    """

    def __init__(self, n_nodes: int, edge_src: torch.Tensor, edge_dst: torch.Tensor,
                 edge_weight: torch.Tensor) -> None:
        super().__init__()
        src, dst, w = self._with_self_loops(n_nodes, edge_src.long(), edge_dst.long(), edge_weight.float())
        deg = torch.zeros(n_nodes).index_add_(0, dst, w)
        norm = deg.pow(-0.5)[src] * w * deg.pow(-0.5)[dst]
        order = torch.sort(dst, stable=True).indices  # edges grouped by target, in their given order
        self.register_buffer("src", src[order], persistent=False)
        self.register_buffer("dst", dst[order], persistent=False)
        self.register_buffer("norm", norm[order], persistent=False)
        #: ``(n + 1,)`` offsets: node ``v``'s in-edges are ``indptr[v]:indptr[v + 1]``.
        self.register_buffer("indptr", torch.cat([torch.zeros(1, dtype=torch.long),
                                                  torch.bincount(dst, minlength=n_nodes).cumsum(0)]),
                             persistent=False)

    @staticmethod
    def _with_self_loops(n: int, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor):
        has_loop = torch.zeros(n, dtype=torch.bool)
        has_loop[src[src == dst]] = True
        missing = torch.nonzero(~has_loop).flatten()
        return (torch.cat([src, missing]), torch.cat([dst, missing]),
                torch.cat([w, torch.ones(missing.numel())]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` node features → ``(n, d)`` propagated features."""
        msg = x[self.src] * self.norm[:, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, self.dst, msg)

    def in_edges(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The in-edges of ``nodes`` (``(m,)`` long): ``(source node, position in nodes, norm)``, each ``(e,)``."""
        start, count = self.indptr[nodes], self.indptr[nodes + 1] - self.indptr[nodes]
        local = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)
        edge = start[local] + torch.arange(len(local), device=nodes.device) - (count.cumsum(0) - count)[local]
        return self.src[edge], local, self.norm[edge]


class PerturbationEncoder(nn.Module):
    """Embed each cell's perturbed genes into one ``d``-vector (zeros for control cells).

    ``G = SGConv(emb)`` with GCN normalisation ``D^-1/2 (A + I) D^-1/2`` over the weighted GO graph
    (edges ``src → dst``), then ``p_b = MLP(Σ_{k ∈ pert(b)} G_k)``.

    Parameters
    ----------
    n_perts
        Size ``P`` of the perturbation vocabulary.
    d
        Embedding width.
    edge_src, edge_dst, edge_weight
        ``(n_edges,)`` GO graph over the perturbation vocabulary (self-loops included or added).
    """

    def __init__(self, n_perts: int, d: int, edge_src: torch.Tensor, edge_dst: torch.Tensor,
                 edge_weight: torch.Tensor) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_perts, d)
        self.lin = nn.Linear(d, d)
        self.fuse = mlp_bn([d, d, d])
        self.graph = GraphPropagation(n_perts, edge_src, edge_dst, edge_weight)

    def propagated(self) -> torch.Tensor:
        """``(n_perts, d)`` GO-propagated perturbation embeddings of the whole vocabulary."""
        return self.lin(self.graph(max_norm_rows(self.emb.weight)))

    def propagated_rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(m, d)`` rows ``nodes`` (``(m,)`` long) of :meth:`propagated`, from their in-neighbours only.

        The same numbers as the whole table's SGConv step, at a cost that does not grow with ``P`` (the
        vocabulary over every GO gene has ``P`` ≈ 20k; a batch needs a few dozen rows).
        """
        src, local, norm = self.graph.in_edges(nodes)
        w = self.emb.weight
        msg = max_norm_rows(w[src]) * norm[:, None].to(w.dtype)
        return self.lin(torch.zeros(len(nodes), w.shape[1], dtype=w.dtype, device=w.device).index_add_(0, local, msg))

    def forward(self, pert_idx: torch.Tensor) -> torch.Tensor:
        """``(batch, 2)`` indices with ``-1`` padding → ``(batch, d)`` (zero rows for control cells)."""
        valid = pert_idx >= 0
        nodes, inverse = torch.unique(pert_idx.clamp(min=0), return_inverse=True)
        g = self.propagated_rows(nodes)
        summed = (g[inverse] * valid[..., None]).sum(1)
        out = torch.zeros_like(summed)
        perturbed = valid.any(1)
        if perturbed.any():
            z = summed[perturbed]
            if self.training and z.shape[0] == 1:  # BatchNorm needs two samples; GEARS duplicates
                z = self.fuse(z.repeat(2, 1))[:1]
            else:
                z = self.fuse(z)
            out = out.index_put((torch.nonzero(perturbed).flatten(),), z)
        return out
