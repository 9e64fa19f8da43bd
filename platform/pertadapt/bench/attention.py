"""``pertadapt bench adapter`` and ``pertadapt bench attention``: the GO-masked adapter over the FM vocabulary.

``run_adapter_benchmark`` measures that the GO-masked adapter builds and runs a forward + backward at
batch 1 without ever materialising an ``N x N`` tensor (peak RSS is printed next to the dense-mask
size it avoids). ``run_attention_benchmark`` times the sparse attention path against the chunked one
in the same run, on the same inputs, and checks that they agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from pertadapt.bench.go import fm_genes
from pertadapt.bench.measure import measure, peak_rss_mib
from pertadapt.go import GOMask, cached_go_mask, load_annotations
from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask, masked_attention, sparse_attention

__all__ = ["run_adapter_benchmark", "run_attention_benchmark"]

#: d-length products per allowed pair: chunked = forward twice (checkpointed chunks) x (QK, PV) +
#: backward (dP, dQ, dK, dV); sparse = forward (QK, PV) + backward (QK again, dP, dQ, dK, dV).
_CHUNKED_PRODUCTS, _SPARSE_PRODUCTS = 8, 7


def _fm_go_mask(n_genes: int | None) -> tuple[list[str], GOMask, float]:
    """The first ``n_genes`` FM vocabulary genes (default all), their cached GO mask and its build time (s)."""
    genes = fm_genes(n_genes)
    t0 = time.perf_counter()
    mask = cached_go_mask(load_annotations("bundled"), genes, threshold=0.1, kind="go")
    return genes, mask, time.perf_counter() - t0


def _sparse_mask(mask: GOMask) -> SparseMask:
    csr = mask.csr
    return SparseMask(torch.from_numpy(csr.indptr.astype("int64")), torch.from_numpy(csr.indices.astype("int64")))


def run_adapter_benchmark(n_genes: int | None = None, *, d: int = 512, heads: int = 8, ffn_dim: int = 256,
                          chunk_size: int = 2048, device: str = "cpu", attention_impl: str = "auto") -> dict[str, float]:
    """Forward + backward of the paper-size PA over the FM vocabulary (or its first ``n_genes``).

    Parameters
    ----------
    n_genes
        First ``n_genes`` of the 19,264-gene vocabulary (default: all).
    d, heads, ffn_dim
        Adapter sizes (paper: 512, 8, 256).
    chunk_size
        Queries per attention chunk.
    device
        ``cpu`` or ``cuda`` (then the peak GPU memory is reported too).
    attention_impl
        ``chunked``, ``sparse`` or ``auto`` (``adapter.attention_impl``).

    Returns
    -------
    dict
        ``n_genes``, ``attention_impl`` (the path taken), ``mask_density``, ``params``, ``mask_s``, ``forward_backward_s``, ``peak_rss_mb``,
        ``peak_gpu_mb`` (CUDA only) and ``dense_fp32_mask_mb`` (what a dense float mask alone would cost).
    """
    genes, mask, t_mask = _fm_go_mask(n_genes)
    sparse = _sparse_mask(mask)
    adapter = PerturbationAdapter(d, heads, ffn_dim, 1, sparse, chunk_size, attention_impl=attention_impl).to(device)
    x = torch.randn(1, len(genes), d, device=device, requires_grad=True)
    if device == "cuda":  # warm-up outside the timing (kernel selection, allocator)
        adapter(x).square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    adapter(x).square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    t_fb = time.perf_counter() - t0
    n = len(genes)
    out = {"n_genes": n, "attention_impl": adapter.blocks[0].last_attention_impl, "mask_density": mask.density, "params": sum(p.numel() for p in adapter.parameters()),
           "mask_s": t_mask, "forward_backward_s": t_fb, "peak_rss_mb": peak_rss_mib(),
           "dense_fp32_mask_mb": n * n * 4 / 2**20}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_attention_benchmark(n_genes: int | None = None, *, heads: int = 8, d: int = 512, chunk_size: int = 2048,
                            device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Forward + backward of the sparse attention path against the chunked one, same inputs, same run.

    Parameters
    ----------
    n_genes
        First ``n_genes`` of the 19,264-gene vocabulary (default: all), masked by their real GO mask.
    heads, d
        Attention heads and model width (paper: 8, 512; head dim ``d / heads``); batch 1.
    chunk_size
        Queries per chunk of the chunked path (checkpointed as in the adapter when ``N > chunk_size``).
    device
        ``cpu`` or ``cuda``.
    seed
        Seed of the random ``q, k, v`` ``(1, heads, N, d / heads)`` and of the upstream gradient.

    Returns
    -------
    dict
        ``n_genes``, ``heads``, ``d``, ``device``, ``threads``, ``mask_density``, ``nnz``,
        ``chunked_s``, ``sparse_s``, ``speedup`` (chunked / sparse time), ``chunked_peak_mb``,
        ``sparse_peak_mb``, ``peak_mem_ratio`` (sparse / chunked), ``max_rel_diff`` (largest
        ``max |sparse - chunked| / max |chunked|`` over the output and the gradients of q, k, v),
        ``flops_frac`` (products the sparse path computes / the dense ones: the mask density),
        ``chunked_gflops``, ``sparse_gflops`` (each counting its own products), ``lower_bound_s``
        (the allowed pairs' products at the chunked path's throughput), ``lower_bound_frac``
        (``lower_bound_s / sparse_s``: the achieved fraction of the sparse lower bound),
        ``break_even_density`` (the density at which the two would tie if the sparse cost stays
        proportional to the allowed pairs) and ``dense_fp32_scores_mb`` (one N x N score matrix per head).
    """
    if d % heads:
        raise ValueError(f"d={d} is not divisible by heads={heads}")
    genes, go_mask, _ = _fm_go_mask(n_genes)
    mask = _sparse_mask(go_mask).to(device)
    n, dh = len(genes), d // heads
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, heads, n, dh, generator=g).to(device) for _ in range(4))
    n_tiny = min(64, n)  # compile / warm up both paths outside the timing
    tiny = _sparse_mask(_fm_go_mask(n_tiny)[1]).to(device)
    for impl in ("chunked", "sparse"):
        x = [t[:, :, :n_tiny].clone().requires_grad_() for t in (q, k, v)]
        masked_attention(*x, tiny, impl=impl).sum().backward()

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
        x = [t.clone().requires_grad_() for t in (q, k, v)]  # inputs exist before the memory baseline

        def run() -> list[torch.Tensor]:
            out = fn(*x)
            return [out.detach(), *torch.autograd.grad(out, x, grad)]
        return run

    ref, chunked_s, chunked_mb = measure(fwd_bwd(lambda *x: masked_attention(
        *x, mask, chunk_size=chunk_size, checkpoint_chunks=n > chunk_size, impl="chunked")), device)
    got, sparse_s, sparse_mb = measure(fwd_bwd(lambda *x: sparse_attention(*x, mask)), device)
    max_rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True))
    density = mask.density
    chunked_gflops = _CHUNKED_PRODUCTS * 2 * n * n * heads * dh / chunked_s / 1e9
    sparse_gflops = _SPARSE_PRODUCTS * 2 * mask.nnz * heads * dh / sparse_s / 1e9
    lower_bound_s = chunked_s * density * _SPARSE_PRODUCTS / _CHUNKED_PRODUCTS
    return {"n_genes": n, "heads": heads, "d": d, "device": device, "threads": torch.get_num_threads(),
            "mask_density": density, "nnz": mask.nnz, "chunked_s": chunked_s, "sparse_s": sparse_s,
            "speedup": chunked_s / sparse_s, "chunked_peak_mb": chunked_mb, "sparse_peak_mb": sparse_mb,
            "peak_mem_ratio": sparse_mb / chunked_mb if chunked_mb > 0 else math.nan, "max_rel_diff": max_rel,
            "flops_frac": density, "chunked_gflops": chunked_gflops, "sparse_gflops": sparse_gflops,
            "lower_bound_s": lower_bound_s, "lower_bound_frac": lower_bound_s / sparse_s,
            "break_even_density": density * chunked_s / sparse_s, "dense_fp32_scores_mb": n * n * 4 / 2**20}
