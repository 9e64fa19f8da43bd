"""The FM-baseline (GEARS) decoder, "PA off": GEARS's parameter shapes, its layer sequence, and the off modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertadapt.config import ConfigError, load_run_config
from pertadapt.models import ModelInputs, build_model
from pertadapt.models.decoder import GearsDecoder
from pertadapt.models.head import GeneHead
from pertadapt.types import Batch

N, P, D, HIDDEN = 50, 30, 16, 32


def _inputs(*, coexpress: bool = True) -> ModelInputs:
    rng = np.random.default_rng(0)
    go_src, go_dst = np.arange(P - 1), np.arange(1, P)  # a chain over the perturbation genes
    # co-expression: each gene takes 3 random genes; self-loops only on even genes (the rest get one added)
    dst = np.repeat(np.arange(N), 3)
    src = np.concatenate([rng.choice(np.delete(np.arange(N), i), 3, replace=False) for i in range(N)])
    src, dst = np.concatenate([src, np.arange(0, N, 2)]), np.concatenate([dst, np.arange(0, N, 2)])
    weight = np.concatenate([rng.uniform(0.4, 1.0, 3 * N), np.ones(N // 2)]).astype(np.float32)
    co = (src, dst, weight) if coexpress else (None, None, None)
    return ModelInputs(tuple(f"G{i}" for i in range(N)), P, go_src, go_dst, np.full(P - 1, 0.5, np.float32), None,
                       None, np.full(N, 0.3, np.float32), *co)


def _cfg(*overrides: str):
    return load_run_config(None, [f"model.hidden_size={D}", f"model.head_hidden={HIDDEN}", "backbone.name=learned",
                                  "adapter.enabled=false", "adapter.attention_mask=none", *overrides])


def _model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(_cfg(*overrides), _inputs())


def _batch(b: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    pert = torch.tensor([[0, -1], [0, -1], [3, 7], [-1, -1], [12, -1]])[:b]
    is_ctrl = (pert < 0).all(1)
    return Batch(torch.rand(b, N, generator=g), torch.full((b,), 2000.0), torch.rand(b, N, generator=g), pert,
                 torch.full((b, 2), -1), torch.arange(b), is_ctrl, torch.zeros(b, 4, dtype=torch.long),
                 torch.ones(b, N, dtype=torch.bool))


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameters_are_gears_model_for_the_same_sizes() -> None:
    """Shapes worked out by hand from snap-stanford/GEARS gears/model.py, ``GEARS_Model.__init__`` with
    num_genes=50, num_perts=30, hidden_size=16, num_go_gnn_layers=1, num_gene_gnn_layers=1, uncertainty off.

    GEARS ``MLP(sizes)`` = Linear-BN-ReLU-…-Linear-BN; ``SGConv(16, 16, 1)`` holds one ``lin`` Linear(16, 16).
    """
    m = _model()
    expected = {  # ours: shape                              # GEARS_Model name
        "backbone.gene.weight": (50, 16),                    # gene_emb (max_norm=True)
        "bn_emb.weight": (16,), "bn_emb.bias": (16,),        # bn_emb
        "perturbation.emb.weight": (30, 16),                 # pert_emb (max_norm=True)
        "perturbation.lin.weight": (16, 16), "perturbation.lin.bias": (16,),  # sim_layers.0.lin
        "perturbation.fuse.0.weight": (16, 16), "perturbation.fuse.0.bias": (16,),  # pert_fuse MLP([16, 16, 16])
        "perturbation.fuse.1.weight": (16,), "perturbation.fuse.1.bias": (16,),
        "perturbation.fuse.3.weight": (16, 16), "perturbation.fuse.3.bias": (16,),
        "perturbation.fuse.4.weight": (16,), "perturbation.fuse.4.bias": (16,),
        "decoder.pos_emb.weight": (50, 16),                  # emb_pos (max_norm=True)
        "decoder.coexpress_lin.weight": (16, 16), "decoder.coexpress_lin.bias": (16,),  # layers_emb_pos.0.lin
        "decoder.emb_trans.0.weight": (16, 16), "decoder.emb_trans.0.bias": (16,),  # emb_trans_v2 MLP([16, 16, 16])
        "decoder.emb_trans.1.weight": (16,), "decoder.emb_trans.1.bias": (16,),
        "decoder.emb_trans.3.weight": (16, 16), "decoder.emb_trans.3.bias": (16,),
        "decoder.emb_trans.4.weight": (16,), "decoder.emb_trans.4.bias": (16,),
        "decoder.head.bn.weight": (16,), "decoder.head.bn.bias": (16,),  # bn_pert_base
        "decoder.head.recovery.0.weight": (32, 16), "decoder.head.recovery.0.bias": (32,),  # recovery_w MLP([16, 32, 16])
        "decoder.head.recovery.1.weight": (32,), "decoder.head.recovery.1.bias": (32,),
        "decoder.head.recovery.3.weight": (16, 32), "decoder.head.recovery.3.bias": (16,),
        "decoder.head.recovery.4.weight": (16,), "decoder.head.recovery.4.bias": (16,),
        "decoder.head.w": (50, 16, 1),                       # indv_w1
        "decoder.head.b": (50, 1),                           # indv_b1
        "decoder.cross_gene.0.weight": (16, 50), "decoder.cross_gene.0.bias": (16,),  # cross_gene_state MLP([50, 16, 16])
        "decoder.cross_gene.1.weight": (16,), "decoder.cross_gene.1.bias": (16,),
        "decoder.cross_gene.3.weight": (16, 16), "decoder.cross_gene.3.bias": (16,),
        "decoder.cross_gene.4.weight": (16,), "decoder.cross_gene.4.bias": (16,),
        "decoder.indv_w2": (1, 50, 17),                      # indv_w2 (1, num_genes, hidden_size + 1)
        "decoder.indv_b2": (1, 50),                          # indv_b2
    }
    assert {k: tuple(v.shape) for k, v in m.named_parameters()} == expected
    # By hand: gene_emb 800, pert_emb 480, emb_trans_v2 608, pert_fuse 608, emb_pos 800, the two SGConv 272 + 272,
    # recovery_w 1,168, indv_w1 800, indv_b1 50, cross_gene_state 1,152, indv_w2 850, indv_b2 50, bn_emb 32,
    # bn_pert_base 32 = 7,974; GEARS_Model also allocates pert_w (32) and bn_pert_base_trans (32), which its
    # forward never uses: 8,038 in all.
    assert _n_params(m) == 7_974 == 8_038 - 32 - 32
    assert _n_params(m.decoder) == 5_782  # without gene_emb, bn_emb and the shared perturbation encoder
    assert isinstance(m.proj, torch.nn.Identity)  # the learned table has the full width: no projection


def _gears_forward(m, batch: Batch, inputs: ModelInputs) -> torch.Tensor:
    """GEARS_Model.forward (mode v1) written out with a dense co-expression matrix and GEARS's concat."""
    dec = m.decoder
    b = len(batch)
    emb = m.bn_emb(m.backbone.encode(batch.x_ctrl, batch.total_count).reshape(b * N, D))
    adj = torch.zeros(N, N)
    adj[torch.from_numpy(inputs.coexpress_dst), torch.from_numpy(inputs.coexpress_src)] = torch.from_numpy(
        inputs.coexpress_weight)
    adj[torch.arange(N), torch.arange(N)] = torch.where(adj.diagonal() > 0, adj.diagonal(), torch.ones(N))
    deg = adj.sum(1)  # in-degree of the target (row)
    norm_adj = deg.rsqrt()[:, None] * adj * deg.rsqrt()[None, :]
    table = dec.pos_emb.weight
    table = table * torch.clamp(1.0 / table.norm(dim=1, keepdim=True), max=1.0)  # max_norm=1
    pos = dec.coexpress_lin(norm_adj @ table).repeat(b, 1)
    base = dec.emb_trans(torch.relu(emb) + 0.2 * pos).view(b, N, D)
    base = base + m.perturbation(batch.pert_idx)[:, None, :]
    base = torch.relu(dec.head.bn(base.reshape(b * N, D)))
    out = (dec.head.recovery(base).view(b, N, D, 1) * dec.head.w).sum(2) + dec.head.b  # (b, N, 1)
    cross = dec.cross_gene(out.squeeze(2)).repeat(1, N).view(b, N, D)
    out = (torch.cat([out, cross], 2) * dec.indv_w2).sum(2) + dec.indv_b2
    return out + batch.x_ctrl


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_follows_gears_layer_sequence(mode: str) -> None:
    m = _model()
    m.train(mode == "train")
    batch = _batch()
    with torch.no_grad():
        got = m(batch)
        ref = _gears_forward(m, batch, _inputs())
    assert got.shape == (5, N)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_decoder_with_learned_embedding_depends_on_the_control_only_through_the_residual() -> None:
    m = _model().eval()
    b = _batch()
    b2 = Batch(**{**b.__dict__, "x_ctrl": torch.rand_like(b.x_ctrl)})
    with torch.no_grad():
        torch.testing.assert_close(m(b) - b.x_ctrl, m(b2) - b2.x_ctrl)


def test_decoder_trains_on_a_single_cell_micro_batch() -> None:
    m = _model().train()
    b = _batch(b=1)
    out = m(b)
    out.sum().backward()
    assert out.shape == (1, N)
    assert m.decoder.cross_gene[0].weight.grad is not None


def test_pa_sum_mode_is_e_plus_p_into_the_head() -> None:
    m = _model("adapter.off_mode=sum", "backbone.name=tiny", "backbone.hidden_size=8", "backbone.layers=1",
               "backbone.heads=2").eval()
    batch = _batch()
    with torch.no_grad():
        e = m.proj(m.backbone.encode(batch.x_ctrl, batch.total_count))
        e = m.bn_emb(e.reshape(-1, D)).view(len(batch), N, D)
        p = m.perturbation(batch.pert_idx)
        expected = m.head(e + p[:, None, :], batch.x_ctrl)
        got = m(batch)
    assert m.decoder is None
    assert m.adapter is None
    assert (p[batch.is_ctrl] == 0).all()
    assert (p[~batch.is_ctrl] != 0).any()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_off_mode_selects_decoder_or_sum() -> None:
    dec, summed = _model("adapter.off_mode=decoder"), _model("adapter.off_mode=sum")
    assert isinstance(dec.decoder, GearsDecoder)
    assert dec.head is None
    assert dec.adapter is None
    assert summed.decoder is None
    assert isinstance(summed.head, GeneHead)
    # sum: gene_emb 800 + bn_emb 32 + perturbation encoder 1,360 + head (BN 32, recovery 1,168, w 800, b 50) = 4,242
    assert _n_params(summed) == 4_242
    # the decoder adds emb_pos 800, its SGConv 272, emb_trans_v2 608, cross_gene_state 1,152, indv_w2 850, indv_b2 50
    assert _n_params(dec) - _n_params(summed) == 3_732
    on = _model("adapter.enabled=true", "adapter.heads=2", "adapter.ffn_dim=8")
    assert on.decoder is None
    assert on.adapter is not None


@pytest.mark.parametrize("off_mode", ["decoder", "sum"])
def test_attention_mask_does_not_matter_with_the_pa_off(off_mode: str) -> None:
    go, none = (_model(f"adapter.off_mode={off_mode}", f"adapter.attention_mask={mask}")
                for mask in ("go", "none"))  # no mask arrays in the inputs: none is needed
    assert go.state_dict().keys() == none.state_dict().keys()
    none.load_state_dict(go.state_dict())
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(go.eval()(batch), none.eval()(batch), rtol=0, atol=0)


def test_decoder_without_a_coexpression_graph_is_refused() -> None:
    with pytest.raises(ValueError, match="co-expression graph"):
        build_model(_cfg(), _inputs(coexpress=False))
    assert build_model(_cfg("adapter.off_mode=sum"), _inputs(coexpress=False)).decoder is None


def test_learned_backbone_is_a_full_width_max_norm_table() -> None:
    """FM off: an N × model.hidden_size embedding (``learned`` has no width of its own), rows of norm ≤ 1."""
    with pytest.raises(ConfigError, match=r"backbone\.hidden_size: not an option of backbone 'learned'"):
        _cfg("backbone.hidden_size=8")
    m = _model("adapter.enabled=true", "adapter.heads=2", "adapter.ffn_dim=8")
    assert tuple(m.backbone.gene.weight.shape) == (N, D)
    assert isinstance(m.proj, torch.nn.Identity)
    e = m.backbone.encode(torch.rand(2, N), torch.full((2,), 100.0))
    assert e.shape == (2, N, D)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, N))  # N(0, 1) rows of norm ≈ 4 are cut to 1


@pytest.mark.parametrize(("overrides", "key"), [
    (["adapter.off_mode=gears"], "adapter.off_mode"),
    (["model.coexpress_top_k=0"], "model.coexpress_top_k"),
    (["model.coexpress_threshold=1.0"], "model.coexpress_threshold"),
    (["model.coexpress_threshold=-0.1"], "model.coexpress_threshold"),
    (["adapter.inject=perturbed"], "adapter.inject"),
])
def test_invalid_options_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _cfg(*overrides)


def test_valid_off_mode_configs() -> None:
    cfg = _cfg()
    assert cfg.adapter.off_mode == "decoder"
    assert cfg.uses_fm_decoder
    assert (cfg.model.coexpress_top_k, cfg.model.coexpress_threshold) == (20, 0.4)
    assert not _cfg("adapter.off_mode=sum", "adapter.inject=perturbed").uses_fm_decoder
    assert not _cfg("adapter.enabled=true", "adapter.heads=2", "adapter.inject=perturbed").uses_fm_decoder
    assert not _cfg("model.name=baseline_mean").uses_fm_decoder
