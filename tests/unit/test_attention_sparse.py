"""The sparse GO-masked attention equals the chunked (dense SDPA) path, forward and backward.

Each case compares output and the gradients of q, k and v against ``impl="chunked"`` on the same mask,
for both sparse backends (the numba CPU kernel and the ``torch.sparse`` one used on other devices),
with a tolerance of 1e-5 relative to the largest reference value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.schema import AdapterConfig
from pertadapt.files import package_data
from pertadapt.go import build_go_mask, load_annotations
from pertadapt.models import ModelInputs, build_model
from pertadapt.models.adapter import AdapterBlock, PerturbationAdapter
from pertadapt.models.attention import (
    AUTO_SPARSE_MAX_DENSITY,
    SparseMask,
    masked_attention,
    resolve_impl,
    sparse_attention,
)

BACKENDS = ("numba", "torch")


def _mask(dense: np.ndarray) -> SparseMask:
    """A :class:`SparseMask` from a dense boolean ``(n, n)`` array."""
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))])
    return SparseMask(torch.from_numpy(indptr), torch.from_numpy(np.nonzero(dense)[1]))


def _qkv(n: int, b: int = 2, h: int = 3, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(b, h, n, d, generator=g)).requires_grad_() for _ in range(3)]


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn) -> list[torch.Tensor]:
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def _assert_rel_close(got: list[torch.Tensor], ref: list[torch.Tensor], rel: float = 1e-5) -> None:
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        err = (a - b).abs().max().item() / b.abs().max().clamp_min(1e-30).item()
        assert err <= rel, f"{name}: max relative difference {err:.3g} > {rel}"


def _check(mask: SparseMask, n: int, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reference ``[out, dq, dk, dv]`` of the chunked path, and the inputs ``[q, k, v]``."""
    q, k, v = _qkv(n, **kw)
    ref = _run(q, k, v, lambda *x: masked_attention(*x, mask, chunk_size=97, impl="chunked"))
    for backend in BACKENDS:
        _assert_rel_close(_run(q, k, v, lambda *x, be=backend: sparse_attention(*x, mask, backend=be)), ref)
    return ref, [q, k, v]


@pytest.mark.parametrize("density", [0.01, 0.08, 0.3])
def test_sparse_equals_chunked_on_random_masks(density: float) -> None:
    """Non-symmetric random masks over more genes than one key block of the CPU kernel (256)."""
    n = 600
    dense = np.random.default_rng(int(density * 100)).random((n, n)) < density
    dense[np.arange(n), np.arange(n)] = True
    _check(_mask(dense), n)


def test_sparse_equals_chunked_with_diagonal_only_rows_and_odd_head_dim() -> None:
    n = 300
    rng = np.random.default_rng(3)
    dense = rng.random((n, n)) < 0.05
    diag_only = rng.choice(n, 60, replace=False)
    dense[diag_only] = False
    dense[np.arange(n), np.arange(n)] = True
    mask = _mask(dense)
    assert all(int(mask.indptr[i + 1] - mask.indptr[i]) == 1 for i in diag_only)
    ref, (_, _, v) = _check(mask, n, d=5, h=2)
    # a diagonal-only row attends to itself alone: its output is its own value vector
    torch.testing.assert_close(ref[0][:, :, diag_only], v.detach()[:, :, diag_only])


def test_sparse_equals_chunked_on_a_fully_dense_mask() -> None:
    n = 270
    _check(_mask(np.ones((n, n), bool)), n, b=1, h=2, d=8)


def test_rows_without_allowed_keys_get_zero_output_and_gradients_like_sdpa() -> None:
    n = 280
    dense = np.random.default_rng(5).random((n, n)) < 0.1
    empty = np.array([0, 7, 100, 279])
    dense[empty] = False
    (out, dq, _, _), _ = _check(_mask(dense), n)
    assert torch.count_nonzero(out[:, :, empty]) == 0  # what SDPA returns for an all-False mask row
    assert torch.count_nonzero(dq[:, :, empty]) == 0
    assert torch.count_nonzero(out[:, :, 1]) > 0


def test_sparse_equals_chunked_on_the_real_go_mask_of_300_fm_genes() -> None:
    vocab = package_data("fm_gene_vocab_19264.txt").read_text().split()
    genes = vocab[::61][:300]
    go = build_go_mask(load_annotations("bundled"), genes, threshold=0.1, kind="go")
    csr = go.csr
    mask = SparseMask(torch.from_numpy(csr.indptr.astype(np.int64)), torch.from_numpy(csr.indices.astype(np.int64)))
    assert mask.n == 300
    assert 0.005 < mask.density < 0.5
    degrees = mask.indptr.diff()
    assert degrees.max() > 4 * degrees.float().median()  # hub genes, as in the full mask
    _check(mask, 300, b=1, h=8, d=8)


def test_auto_picks_sparse_below_the_density_threshold_on_cpu_and_chunked_otherwise() -> None:
    n = 50
    sparse = _mask(np.eye(n, dtype=bool))
    full = _mask(np.ones((n, n), bool))
    cpu = torch.device("cpu")
    assert sparse.density < AUTO_SPARSE_MAX_DENSITY < full.density
    assert resolve_impl("auto", sparse, cpu) == "sparse"
    assert resolve_impl("auto", full, cpu) == "chunked"
    assert resolve_impl("auto", None, cpu) == "chunked"
    assert resolve_impl("sparse", None, cpu) == "chunked"  # no mask: full attention
    assert resolve_impl("chunked", sparse, cpu) == "chunked"
    with pytest.raises(ValueError, match="attention_impl='blocked'"):
        resolve_impl("blocked", sparse, cpu)


def test_adapter_attention_impl_switches_the_code_path_and_keeps_the_output() -> None:
    n = 290
    dense = np.random.default_rng(7).random((n, n)) < 0.06
    dense[np.arange(n), np.arange(n)] = True
    mask = _mask(dense)
    x, w = torch.randn(2, 2, n, 32, generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("chunked", "sparse", "auto"):
        torch.manual_seed(0)
        adapter = PerturbationAdapter(32, 4, 16, 1, mask, chunk_size=64, attention_impl=impl)
        xi = x.clone().requires_grad_()
        out = adapter(xi)
        (grad,) = torch.autograd.grad((out * w).sum(), xi)
        results[impl] = (adapter.blocks[0].last_attention_impl, [out.detach(), grad])
    assert results["chunked"][0] == "chunked"
    assert results["sparse"][0] == "sparse"
    assert results["auto"][0] == "sparse"  # density 0.06 on CPU
    for impl in ("sparse", "auto"):
        got, ref = results[impl][1], results["chunked"][1]
        for a, b in zip(got, ref, strict=True):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    with pytest.raises(ValueError, match="attention_impl"):
        AdapterBlock(32, 4, 16, attention_impl="dense")


def test_config_attention_impl_reaches_the_built_adapter() -> None:
    n = 12
    indptr = np.arange(n + 1, dtype=np.int64)
    inputs = ModelInputs(tuple(f"G{i}" for i in range(n)), 3, np.array([0, 1]), np.array([1, 0]),
                         np.full(2, 0.5, np.float32), indptr, np.arange(n, dtype=np.int64),
                         np.full(n, 0.3, np.float32))
    base = ["model.hidden_size=16", "model.head_hidden=32", "backbone.hidden_size=16", "backbone.layers=1",
            "backbone.heads=2", "adapter.heads=2", "adapter.ffn_dim=8"]
    for impl in ("chunked", "sparse", "auto"):
        model = build_model(load_run_config(None, [*base, f"adapter.attention_impl={impl}"]), inputs)
        assert model.adapter.blocks[0].attention_impl == impl
    assert AdapterConfig().attention_impl == "auto"
    with pytest.raises(ConfigError, match="adapter.attention_impl"):
        AdapterConfig(attention_impl="dense")


def test_sparse_path_rejects_a_mask_of_another_size() -> None:
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="covers 9 genes but the attention has 10"):
        sparse_attention(q, k, v, _mask(np.eye(9, dtype=bool)))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_numba_kernels_leave_torch_thread_count_as_it_was(threads: int) -> None:
    """Numba's OpenMP layer, launched by the first kernel call, must not change torch's thread count.

    It set the process's OpenMP threads to all cores: after a worker's first sparse attention every torch op
    ran on more threads than ``OMP_NUM_THREADS``, and a resumed run's first epoch rounded differently from an
    uninterrupted one. A fresh process, so that the layer is launched here.
    """
    import os
    import subprocess
    import sys

    code = """
import numpy as np, torch
from pertadapt.models.attention import SparseMask, sparse_attention
before = torch.get_num_threads()
n = 64
dense = np.random.default_rng(0).random((n, n)) < 0.2
np.fill_diagonal(dense, True)
mask = SparseMask(torch.from_numpy(np.concatenate([[0], np.cumsum(dense.sum(1))])), torch.from_numpy(np.nonzero(dense)[1]))
q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
sparse_attention(q, k, v, mask, backend="numba").sum().backward()
print(before, torch.get_num_threads())
"""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": "4"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [str(threads), str(threads)]
