"""Fine-tune modes: each one changes which backbone parameters receive gradients."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from pertadapt.models.backbones.aido_cell import build_aido_cell
from pertadapt.models.backbones.scfoundation import build_scfoundation
from pertadapt.models.finetune import LoRADelta, apply_finetune, lora_targets, merge_lora

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


def _grads(backbone: nn.Module) -> set[str]:
    """Names of backbone parameters that receive a gradient from one backward pass."""
    x, total = _cells()
    out = backbone.encode(x, total)
    if out.requires_grad:
        out.square().mean().backward()
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
    assert got
    assert all(".lora_A" in n or ".lora_B" in n for n in got)
    assert len(got) == len(params)
    assert all(not p.requires_grad for n, p in b.named_parameters() if "lora_" not in n)
    # one optimiser step on the adapters changes the output; merging keeps it and removes the adapters
    torch.optim.SGD(params, lr=0.5).step()
    after = b.encode(x, total).detach()
    assert not torch.allclose(after, before)
    assert merge_lora(b) == n_targets
    assert not any(isinstance(m, LoRADelta) for m in b.modules())
    torch.testing.assert_close(b.encode(x, total), after, atol=1e-5, rtol=1e-5)
    assert set(b.state_dict()) == set(make().state_dict())


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
    with pytest.raises(ValueError, match="not one of"):
        apply_finetune(b, "partial")
