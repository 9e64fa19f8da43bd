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
                          chunk_size: int = 2048) -> dict[str, float]:
    """Forward + backward of the paper-size PA over the FM vocabulary (or its first ``n_genes``).

    Returns
    -------
    dict
        ``n_genes``, ``mask_density``, ``params``, ``mask_s``, ``forward_backward_s``, ``peak_rss_mb`` and
        ``dense_fp32_mask_mb`` (what a dense float mask alone would cost).
    """
    vocab = resources.files("pertadapt.resources").joinpath("fm_gene_vocab_19264.txt").read_text().split()
    genes = vocab[:n_genes] if n_genes else vocab
    t0 = time.perf_counter()
    mask = cached_go_mask(load_annotations("bundled"), genes, threshold=0.1, kind="go")
    t_mask = time.perf_counter() - t0
    csr = mask.csr
    sparse = SparseMask(torch.from_numpy(csr.indptr.astype("int64")), torch.from_numpy(csr.indices.astype("int64")))
    adapter = PerturbationAdapter(d, heads, ffn_dim, 1, sparse, chunk_size)
    x = torch.randn(1, len(genes), d, requires_grad=True)
    t0 = time.perf_counter()
    adapter(x).square().mean().backward()
    t_fb = time.perf_counter() - t0
    n = len(genes)
    return {"n_genes": n, "mask_density": mask.density, "params": sum(p.numel() for p in adapter.parameters()),
            "mask_s": t_mask, "forward_backward_s": t_fb, "peak_rss_mb": _peak_rss_mb(),
            "dense_fp32_mask_mb": n * n * 4 / 2**20}
