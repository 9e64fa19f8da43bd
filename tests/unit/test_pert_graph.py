"""The perturbation encoder's GO graph over every annotated gene (``go.pert_graph_genes: all``) or the targets."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from pertadapt.config.schema import ConfigError, GOConfig
from pertadapt.go import GOAnnotations, build_gene_graph, perturbation_vocabulary
from pertadapt.go.errors import GOOptionError
from pertadapt.models.perturbation import PerturbationEncoder

# UNSEEN (a test target) shares its terms with N1 and N2, which nobody perturbed; SEEN and Z are unrelated.
TABLE = {"UNSEEN": {"GO:1", "GO:2"}, "N1": {"GO:1", "GO:2"}, "N2": {"GO:1", "GO:2", "GO:3"}, "SEEN": {"GO:4"},
         "Z": {"GO:5"}}
TARGETS = ["SEEN", "UNSEEN_OLD"]  # the data names UNSEEN by an alias


@pytest.fixture
def ann() -> GOAnnotations:
    g2t = {g: frozenset(t) for g, t in TABLE.items()}
    return GOAnnotations(MappingProxyType(g2t), "test", MappingProxyType({"go_release": "test"}), ("BP",), False,
                         symbols=frozenset(g2t), aliases=MappingProxyType({"UNSEEN_OLD": ("UNSEEN",)}))


def test_all_is_every_annotated_gene_with_the_targets_under_their_data_names(ann: GOAnnotations) -> None:
    assert perturbation_vocabulary(ann, TARGETS, "all") == ("N1", "N2", "SEEN", "UNSEEN_OLD", "Z")
    assert perturbation_vocabulary(ann, TARGETS, "targets") == ("SEEN", "UNSEEN_OLD")
    with pytest.raises(GOOptionError, match="all, targets"):
        perturbation_vocabulary(ann, TARGETS, "some")
    with pytest.raises(ConfigError, match="go.pert_graph_genes"):
        GOConfig(pert_graph_genes="some")


def _encoder(ann: GOAnnotations, vocab: tuple[str, ...]) -> PerturbationEncoder:
    graph = build_gene_graph(ann, vocab, threshold=0.1, top_k=20)
    torch.manual_seed(0)
    return PerturbationEncoder(len(vocab), 8, torch.from_numpy(graph.src), torch.from_numpy(graph.dst),
                               torch.from_numpy(graph.weight))


def _unseen_row_after_changing(enc: PerturbationEncoder, vocab: tuple[str, ...], gene: str | None) -> torch.Tensor:
    with torch.no_grad():
        if gene is not None:
            enc.emb.weight[vocab.index(gene)] = torch.linspace(-1.0, 1.0, 8)
        return enc.propagated()[vocab.index("UNSEEN_OLD")].clone()


@pytest.mark.parametrize("neighbour", ["N1", "N2"])
def test_an_unseen_targets_embedding_borrows_from_never_perturbed_go_neighbours(ann: GOAnnotations,
                                                                                 neighbour: str) -> None:
    vocab = perturbation_vocabulary(ann, TARGETS, "all")
    enc = _encoder(ann, vocab)
    before = _unseen_row_after_changing(enc, vocab, None)
    assert not torch.allclose(_unseen_row_after_changing(enc, vocab, neighbour), before)
    after_neighbour = _unseen_row_after_changing(enc, vocab, neighbour)
    assert torch.equal(_unseen_row_after_changing(enc, vocab, "Z"), after_neighbour)  # Z shares no term


def test_over_the_targets_only_the_unseen_target_sees_only_itself(ann: GOAnnotations) -> None:
    vocab = perturbation_vocabulary(ann, TARGETS, "targets")
    enc = _encoder(ann, vocab)
    before = _unseen_row_after_changing(enc, vocab, None)
    with torch.no_grad():  # one SGConv step over a lone self-loop: the target's own (max-normed) row
        own = enc.lin(enc.emb.weight[vocab.index("UNSEEN_OLD")] / enc.emb.weight[vocab.index("UNSEEN_OLD")].norm()
                      .clamp(min=1.0))
    torch.testing.assert_close(before, own)
    assert torch.equal(_unseen_row_after_changing(enc, vocab, "SEEN"), before)


def test_the_batch_rows_equal_the_whole_tables_sgconv_step(ann: GOAnnotations) -> None:
    vocab = perturbation_vocabulary(ann, TARGETS, "all")
    enc = _encoder(ann, vocab).train()
    pert_idx = torch.tensor([[3, -1], [2, 3], [-1, -1], [3, -1], [0, 4]])
    nodes = torch.tensor([4, 0, 3, 3, 1, 2])
    torch.testing.assert_close(enc.propagated_rows(nodes), enc.propagated()[nodes], rtol=0, atol=1e-6)
    full = enc.propagated()
    summed = (full[pert_idx.clamp(min=0)] * (pert_idx >= 0)[..., None]).sum(1)
    expected = torch.zeros_like(summed)
    expected[[0, 1, 3, 4]] = enc.fuse(summed[[0, 1, 3, 4]])
    out = enc(pert_idx)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.square().sum().backward()
    grad = enc.emb.weight.grad.clone()
    enc.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(grad, enc.emb.weight.grad, rtol=0, atol=1e-6)
