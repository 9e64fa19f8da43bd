"""Fine-tune modes: each one changes which backbone parameters receive gradients."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from pertadapt.config.schema import FINETUNE_MODES as SCHEMA_FINETUNE_MODES
from pertadapt.models.backbones.aido_cell import build_aido_cell
from pertadapt.models.backbones.scfoundation import build_scfoundation
from pertadapt.models.finetune import FINETUNE_MODES, LoRADelta, apply_finetune, lora_targets

GENES = [f"G{i}" for i in range(24)]
BUILDERS = {
    "aido_cell": lambda: build_aido_cell(checkpoint=None, genes=GENES, hidden_size=16, layers=3, heads=2),
    "scfoundation": lambda: build_scfoundation(checkpoint=None, genes=GENES, hidden_size=16, layers=2, heads=2),
}
# parameters that exist for the checkpoint layout only and never reach the embedding
LAYOUT_ONLY = ("mask_embedding", "pad_embedding", "emb_mask", "to_final")


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, len(GENES), generator=g) * 2
    x[:, :6] = 0.0
    return x, torch.tensor([1e3, 2e4])


def _loss(out: torch.Tensor) -> torch.Tensor:
    """``Σ out · w`` with a fixed random ``w``: its gradient never vanishes by construction.

    (``out.square().mean()`` would not do: the backbones end in a unit-gain normalisation, after which
    the sum of squares is constant, so its gradient into everything before the norm is zero.)
    """
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * w).sum()


def _grads(backbone: nn.Module) -> set[str]:
    """Names of backbone parameters that receive a gradient from one backward pass."""
    x, total = _cells()
    out = backbone.encode(x, total)
    if out.requires_grad:
        _loss(out).backward()
    return {n for n, p in backbone.named_parameters() if p.grad is not None}


@pytest.fixture(params=sorted(BUILDERS))
def make(request):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return BUILDERS[request.param]()
    return build


def test_frozen_no_gradients_and_pinned_eval(make) -> None:
    b = make()
    assert apply_finetune(b, "frozen") == []
    assert not b.training
    assert _grads(b) == set()
    parent = nn.Sequential(b)
    parent.train()  # the engine's model.train() every epoch must not wake the frozen backbone
    assert parent.training
    assert not b.training
    assert not any(m.training for m in b.modules())
    assert not copy.deepcopy(b).train().training
    assert not pickle.loads(pickle.dumps(b)).train().training


def test_last_k_only_last_blocks(make) -> None:
    b = make()
    params = apply_finetune(b, "last_k", last_k=1)
    last = b.transformer_layers()[-1]
    assert {id(p) for p in params} == {id(p) for p in last.parameters()}
    got = _grads(b)
    prefix = {id(p): n for n, p in b.named_parameters()}
    assert got == {prefix[id(p)] for p in last.parameters()}
    assert b.training
    with pytest.raises(ValueError, match="outside 1..3"):
        apply_finetune(make(), "last_k", last_k=4)


def test_last_k_two_blocks_more_than_one(make) -> None:
    b = make()
    two = apply_finetune(b, "last_k", last_k=2)
    assert len(_grads(b)) == len(two) > len(list(b.transformer_layers()[-1].parameters()))


def test_full_everything(make) -> None:
    b = make()
    params = apply_finetune(b, "full")
    assert len(params) == len(list(b.parameters()))
    got = _grads(b)
    expected = {n for n, _ in b.named_parameters() if not any(s in n for s in LAYOUT_ONLY)}
    assert got == expected


def test_lora_adapters_only_and_identity_at_init(make) -> None:
    b = make()
    x, total = _cells()
    before = b.eval().encode(x, total).detach()
    n_targets = len(lora_targets(b))
    params = apply_finetune(b, "lora", lora_rank=4)
    assert n_targets > 0
    assert len(params) == 2 * n_targets
    b.eval()
    torch.testing.assert_close(b.encode(x, total), before)  # B = 0: the adapted model is unchanged
    got = _grads(b)
    assert all(".lora_A" in n or ".lora_B" in n for n in got)
    assert len(got) == len(params)
    assert all(not p.requires_grad for n, p in b.named_parameters() if "lora_" not in n)
    # B = 0, so only the B factors get a non-zero gradient at init
    assert all(float(p.grad.abs().max()) == 0.0 for n, p in b.named_parameters() if ".lora_A" in n)
    assert all(float(p.grad.abs().max()) > 0.0 for n, p in b.named_parameters() if ".lora_B" in n)
    frozen = {n: p.detach().clone() for n, p in b.named_parameters() if "lora_" not in n}
    # a small optimiser step on the adapters (length 0.01) lowers the loss by about lr · |∇|² (first order)
    # and leaves the frozen weights as they were
    grad_sq = sum(float(p.grad.square().sum()) for p in params)
    lr = 1e-2 / grad_sq ** 0.5
    loss_before = float(_loss(before))
    expected_drop = lr * grad_sq
    torch.optim.SGD(params, lr=lr).step()
    after = b.encode(x, total).detach()
    drop = loss_before - float(_loss(after))
    assert drop == pytest.approx(expected_drop, rel=0.1)
    assert float((after - before).abs().max()) > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in b.named_parameters() if n in frozen)
    # the adapted backbone round-trips through state_dict() into a freshly adapted one (run checkpoints)
    fresh = make()
    apply_finetune(fresh, "lora", lora_rank=4)
    fresh.load_state_dict(b.state_dict())
    torch.testing.assert_close(fresh.eval().encode(x, total), after)
    assert any(isinstance(m, LoRADelta) for m in fresh.modules())


def test_lora_targets_are_attention_projections() -> None:
    b = BUILDERS["aido_cell"]()
    names = sorted({attr for _, attr in lora_targets(b)})
    assert names == ["weight"]
    assert len(lora_targets(b)) == 3 * 4
    s = BUILDERS["scfoundation"]()
    attrs = sorted(attr for _, attr in lora_targets(s))
    assert attrs.count("in_proj_weight") == 2
    assert len(attrs) == 2 * 2 + 4


def test_mode_switch_releases_frozen_pin(make) -> None:
    b = make()
    apply_finetune(b, "frozen")
    apply_finetune(b, "full")
    nn.Sequential(b).train()
    assert b.training
    with pytest.raises(ValueError, match="'partial' is not one of frozen, last_k, full, lora"):
        apply_finetune(b, "partial")


def test_modes_are_the_schema_choices() -> None:
    assert set(FINETUNE_MODES) == set(SCHEMA_FINETUNE_MODES)
