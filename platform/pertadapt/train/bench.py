"""Full-size adapter benchmark: the PA over all 19,264 FM genes with the real GO mask, on CPU.

Measures that the GO-masked adapter builds and runs a forward + backward at batch 1 without ever
materialising an ``N x N`` tensor (peak RSS is printed next to the dense-mask size it avoids).
"""

from __future__ import annotations

import resource
import time
from importlib import resources

import torch

from pertadapt.go import cached_go_mask, load_annotations
from pertadapt.models.adapter import PerturbationAdapter
from pertadapt.models.attention import SparseMask

__all__ = ["run_adapter_benchmark"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_adapter_benchmark(n_genes: int | None = None, *, d: int = 512, heads: int = 8, ffn_dim: int = 256,
                          chunk_size: int = 2048, device: str = "cpu") -> dict[str, float]:
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

    Returns
    -------
    dict
        ``n_genes``, ``mask_density``, ``params``, ``mask_s``, ``forward_backward_s``, ``peak_rss_mb``,
        ``peak_gpu_mb`` (CUDA only) and ``dense_fp32_mask_mb`` (what a dense float mask alone would cost).
    """
    vocab = resources.files("pertadapt.resources").joinpath("fm_gene_vocab_19264.txt").read_text().split()
    genes = vocab[:n_genes] if n_genes else vocab
    t0 = time.perf_counter()
    mask = cached_go_mask(load_annotations("bundled"), genes, threshold=0.1, kind="go")
    t_mask = time.perf_counter() - t0
    csr = mask.csr
    sparse = SparseMask(torch.from_numpy(csr.indptr.astype("int64")), torch.from_numpy(csr.indices.astype("int64")))
    adapter = PerturbationAdapter(d, heads, ffn_dim, 1, sparse, chunk_size).to(device)
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
    out = {"n_genes": n, "mask_density": mask.density, "params": sum(p.numel() for p in adapter.parameters()),
           "mask_s": t_mask, "forward_backward_s": t_fb, "peak_rss_mb": _peak_rss_mb(),
           "dense_fp32_mask_mb": n * n * 4 / 2**20}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
