"""The GO, adapter and attention benchmarks run end to end at a small size (the full-size figures are measured)."""

from __future__ import annotations

from pertadapt.bench.go import fm_genes, run_go_benchmark
from pertadapt.bench.train import run_adapter_benchmark, run_attention_benchmark


def test_go_benchmark_on_the_first_vocabulary_genes() -> None:
    r = run_go_benchmark(300)
    assert r["n_genes"] == 300 == len(fm_genes(300))
    assert len(fm_genes()) == 19_264
    assert 0 < r["mask_density"] < 1
    assert r["peak_rss_mb"] > 0
    assert r["cpu_s"] > 0
    assert r["total_s"] >= r["build_s"]


def test_adapter_and_attention_benchmarks_agree_at_a_small_size() -> None:
    a = run_adapter_benchmark(200, d=32, heads=4, ffn_dim=16, attention_impl="sparse")
    assert (a["n_genes"], a["attention_impl"]) == (200, "sparse")
    assert a["peak_rss_mb"] > 0
    r = run_attention_benchmark(200, heads=2, d=32, chunk_size=64)
    assert r["max_rel_diff"] < 1e-5  # sparse and chunked paths: same output and gradients
    assert r["chunked_s"] > 0
    assert r["sparse_s"] > 0
    assert r["chunked_peak_mb"] >= 0
    assert r["flops_frac"] == r["mask_density"]
