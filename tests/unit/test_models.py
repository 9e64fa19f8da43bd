"""The PertAdapt network: shapes, parameter count, masked attention, and the four ablation toggles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertadapt.config import load_run_config
from pertadapt.config.schema import ConfigError
from pertadapt.models import ModelInputs, build_loss, build_model
from pertadapt.models.adapter import AdapterBlock
from pertadapt.models.attention import SparseMask, masked_attention
from pertadapt.models.losses import adaptive_loss, gears_loss, mse_loss
from pertadapt.types import Batch

N, P = 24, 5


def _banded_mask(n: int, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rows = [np.arange(max(0, i - width), min(n, i + width + 1)) for i in range(n)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return indptr.astype(np.int64), np.concatenate(rows).astype(np.int64)


def _inputs(mask: bool = True) -> ModelInputs:
    indptr, indices = _banded_mask(N)
    return ModelInputs(tuple(f"G{i}" for i in range(N)), P, np.array([0, 1, 2, 3]), np.array([1, 0, 3, 2]),
                       np.full(4, 0.5, np.float32), indptr if mask else None, indices if mask else None,
                       np.full(N, 0.3, np.float32))


def _cfg(*overrides: str):
    return load_run_config(None, ["model.hidden_size=16", "model.head_hidden=32", "backbone.hidden_size=16",
                                  "backbone.layers=1", "backbone.heads=2", "adapter.heads=2", "adapter.ffn_dim=8",
                                  *overrides])


def _batch(seed: int = 0, b: int = 6) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, N, generator=g)
    pert = torch.tensor([[0, -1], [0, -1], [1, 2], [3, -1], [-1, -1], [-1, -1]])[:b]
    cond = torch.tensor([0, 0, 1, 2, 3, 3])[:b]
    is_ctrl = cond == 3
    de = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(b)])
    return Batch(x, torch.full((b,), 2000.0), torch.rand(b, N, generator=g), pert, torch.full((b, 2), -1), cond,
                 is_ctrl, de, torch.rand(b, N, generator=g) > 0.2)


def _model(*overrides: str, seed: int = 0, mask: bool = True):
    torch.manual_seed(seed)
    return build_model(_cfg(*overrides), _inputs(mask)).eval()


def test_full_size_adapter_parameter_count_matches_paper() -> None:
    assert sum(p.numel() for p in AdapterBlock(512, 8, 256).parameters()) == 1_316_608


def test_forward_shapes_and_residual() -> None:
    m = _model()
    out = m(_batch())
    assert out.shape == (6, N)
    assert torch.isfinite(out).all()


def test_chunked_sparse_attention_equals_dense_masked_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, N, 4) for _ in range(3))
    indptr, indices = _banded_mask(N)
    mask = SparseMask(torch.from_numpy(indptr), torch.from_numpy(indices))
    dense = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        dense[i, indices[indptr[i]:indptr[i + 1]]] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    for chunk in (5, 7, N):
        got = masked_attention(q, k, v, mask, chunk_size=chunk)
        torch.testing.assert_close(got, ref)


def test_am_toggle_restricts_attention_to_go_neighbours() -> None:
    """With the GO mask, a token outside gene 0's neighbourhood cannot change gene 0's output."""
    torch.manual_seed(0)
    block = AdapterBlock(8, 2, 4).eval()
    indptr, indices = _banded_mask(N)
    mask = SparseMask(torch.from_numpy(indptr), torch.from_numpy(indices))
    x = torch.randn(1, N, 8)
    x2 = x.clone()
    x2[0, 10] = torch.randn(8) * 3  # gene 10 is not a neighbour of gene 0 (band width 2)
    with torch.no_grad():
        masked = block(x, mask)[0, 0], block(x2, mask)[0, 0]
        full = block(x, None)[0, 0], block(x2, None)[0, 0]
    torch.testing.assert_close(masked[0], masked[1])
    assert (full[0] - full[1]).abs().max() > 1e-4


def test_am_toggle_changes_model_output() -> None:
    with_mask = _model("adapter.attention_mask=go")
    without = _model("adapter.attention_mask=none", mask=False)
    without.load_state_dict(with_mask.state_dict())  # identical weights; only the mask differs
    b = _batch()
    with torch.no_grad():
        assert (with_mask(b) - without(b)).abs().max() > 1e-5


def test_pa_toggle_removes_the_adapter() -> None:
    """``off_mode: sum`` keeps every other part, so the PA's effect shows with the shared weights loaded."""
    on, off = _model("adapter.enabled=true"), _model("adapter.enabled=false", "adapter.off_mode=sum")
    assert off.adapter is None
    assert any(n.startswith("adapter.") for n, _ in on.named_parameters())
    assert not any(n.startswith("adapter.") for n, _ in off.named_parameters())
    shared = {k: v for k, v in on.state_dict().items() if not k.startswith("adapter.")}
    off.load_state_dict(shared)
    b = _batch()
    with torch.no_grad():
        assert (on(b) - off(b)).abs().max() > 1e-5


def test_fm_toggle_learned_embedding_ignores_the_control_cell() -> None:
    """FM off: token embeddings are identical for every cell, so ŷ − x_ctrl does not depend on x_ctrl."""
    b = _batch()
    b2 = Batch(**{**b.__dict__, "x_ctrl": torch.rand_like(b.x_ctrl)})
    with torch.no_grad():
        learned = _model("backbone.name=learned")
        d1, d2 = learned(b) - b.x_ctrl, learned(b2) - b2.x_ctrl
        torch.testing.assert_close(d1, d2)
        tiny = _model("backbone.name=tiny")
        t1, t2 = tiny(b) - b.x_ctrl, tiny(b2) - b2.x_ctrl
    assert (t1 - t2).abs().max() > 1e-5


def test_fm_frozen_backbone_gets_no_gradient_but_learned_embedding_does() -> None:
    frozen = _model("backbone.name=tiny", "backbone.finetune=frozen")
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    learned = _model("backbone.name=learned")
    assert all(p.requires_grad for p in learned.backbone.parameters())


def test_adaptive_loss_code_variant_equals_hand_computation() -> None:
    b = _batch()
    pred = b.y + 0.1 * torch.arange(N, dtype=torch.float32)
    err = (pred - b.y) ** 2
    k = 4  # conditions 0, 1, 2 and ctrl
    l_de = sum(err[b.cond_id == c][:, b.de_idx[int(torch.nonzero(b.cond_id == c)[0])]].mean() for c in (0, 1, 2)) / k
    l_all = (sum(err[b.cond_id == c][:, b.nz_mask[int(torch.nonzero(b.cond_id == c)[0])]].mean() for c in (0, 1, 2))
             + err[b.is_ctrl].mean()) / k
    out = adaptive_loss(pred, b, variant="code")
    torch.testing.assert_close(out.components["loss_de"], l_de)
    torch.testing.assert_close(out.components["loss_all"], l_all)
    torch.testing.assert_close(out.total, l_de + 3 * l_all)  # w_DE·L_DE + 2·L_all = L_DE + 3·L_all
    intended = adaptive_loss(pred, b, variant="intended")
    assert intended.weights["w_all"] == pytest.approx(float((l_de + l_all) / l_all))


def test_ladapt_toggle_changes_the_gradient() -> None:
    b = _batch()
    grads = {}
    for name in ("adaptive", "mse"):
        m = _model(f"loss.name={name}").train()
        loss = build_loss(_cfg(f"loss.name={name}"), _inputs())(m(b), b)
        loss.total.backward()
        grads[name] = m.head.w.grad.clone()
    assert not torch.allclose(grads["adaptive"], grads["mse"])
    assert mse_loss(b.y, b).total.item() == 0.0


def test_gears_loss_components() -> None:
    b = _batch()
    out = build_loss(_cfg("loss.name=gears"), _inputs())(b.y.clone(), b)
    assert out.total.item() == pytest.approx(0.0)
    worse = build_loss(_cfg("loss.name=gears"), _inputs())(b.y + 1.0, b)
    assert worse.components["loss_autofocus"].item() == pytest.approx(1.0)


def test_gears_loss_direction_term_equals_hand_computation() -> None:
    """GEARS ``loss_fct`` (snap-stanford/GEARS gears/utils.py) on 3 cells × 4 genes, c = 0.5 for every gene.

    Condition A: cells 0 and 1, non-zero genes 0-2; ctrl: cell 2, all genes; K = 2.
    (sign(y − c) − sign(ŷ − c))² per entry:
      cell 0: y (+, −, +), ŷ (+, +, −) → 0, 4, 4;   cell 1: y (−, −, +), ŷ (−, −, 0) → 0, 0, 1
      A: 9 / (2 · 3) = 1.5;   ctrl: y (+, +, −, −), ŷ (+, −, −, +) → 0, 4, 0, 4 → 8 / 4 = 2
      direction = (1.5 + 2) / 2 = 1.75
    |ŷ − y|⁴: A errors 1, 0.5, 0.2 → (1 + 0.0625 + 0.0016) / 6 = 0.17735; ctrl errors 0.5, 1 → 1.0625 / 4
    = 0.265625; autofocus = (0.17735 + 0.265625) / 2 = 0.2214875; total = 0.2214875 + 0.1 · 1.75.
    """
    y = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.2, 0.3, 0.7, 0.0], [0.6, 0.9, 0.4, 0.1]])
    pred = torch.tensor([[0.9, 1.1, 0.3, 9.0], [0.2, 0.3, 0.5, 9.0], [0.6, 0.4, 0.4, 1.1]])
    nz = torch.tensor([[True, True, True, False]] * 2 + [[True] * 4])
    b = Batch(torch.zeros(3, 4), torch.full((3,), 1e3), y, torch.tensor([[0, -1], [0, -1], [-1, -1]]),
              torch.full((3, 2), -1), torch.tensor([0, 0, 1]), torch.tensor([False, False, True]),
              torch.zeros(3, 2, dtype=torch.long), nz)
    out = gears_loss(pred, b, ctrl_mean=torch.full((4,), 0.5), gamma=2.0, direction_lambda=0.1)
    assert out.components["loss_direction"].item() == pytest.approx(1.75)
    assert out.components["loss_autofocus"].item() == pytest.approx(0.2214875, rel=1e-5)
    assert out.total.item() == pytest.approx(0.2214875 + 0.175, rel=1e-5)


def test_inject_perturbed_only_changes_output() -> None:
    b = _batch()
    b = Batch(**{**b.__dict__, "pert_gene_pos": torch.tensor([[3, -1], [3, -1], [5, 7], [9, -1], [-1, -1],
                                                               [-1, -1]])})
    a, p = _model("adapter.inject=all"), _model("adapter.inject=perturbed")
    p.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(b) - p(b)).abs().max() > 1e-5


def test_zero_head_init_starts_as_no_change_and_still_learns() -> None:
    b = _batch()
    zero, xavier = _model("model.head_init=zero"), _model("model.head_init=xavier")
    with torch.no_grad():
        assert torch.equal(zero(b), b.x_ctrl)  # Δ̂ = 0 on every gene
        assert (xavier(b) - b.x_ctrl).abs().mean() > 1e-2
    zero.train()
    loss = mse_loss(zero(b), b).total
    loss.backward()
    assert zero.head.w.grad.abs().sum() > 0
    assert zero.head.b.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.head_init"):
        _cfg("model.head_init=ones")


@pytest.mark.parametrize("name", ["aido_cell", "scfoundation"])
def test_fm_backbones_build_through_the_registry(name: str) -> None:
    m = _model(f"backbone.name={name}", "backbone.random_init=true", "backbone.finetune=frozen")
    assert m(_batch()).shape == (6, N)
    assert not any(p.requires_grad for p in m.backbone.parameters())


def test_adapter_size_options_change_the_adapter() -> None:
    one, two = _model("adapter.layers=1"), _model("adapter.layers=2")
    n1 = sum(p.numel() for p in one.adapter.parameters())
    assert sum(p.numel() for p in two.adapter.parameters()) == 2 * n1
    wide = _model("adapter.ffn_dim=32")
    assert sum(p.numel() for p in wide.adapter.parameters()) > n1
    assert _model("adapter.heads=4").adapter.blocks[0].heads == 4


@pytest.mark.parametrize(("mode", "trainable"), [("frozen", False), ("last_k", True), ("full", True),
                                                 ("lora", True)])
def test_finetune_modes_select_backbone_parameters(mode: str, trainable: bool) -> None:
    m = _model("backbone.name=tiny", f"backbone.finetune={mode}")
    assert any(p.requires_grad for p in m.backbone.parameters()) is trainable
