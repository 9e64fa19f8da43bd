"""The data benchmark runs end to end at a small size (the 200k x 5k number is measured, not tested)."""

from __future__ import annotations

from pertadapt.bench.data import run_data_benchmark


def test_small_benchmark(tmp_path):
    result = run_data_benchmark(n_cells=1_500, n_genes=2_500, density=0.1, n_conditions=20, workdir=tmp_path)
    assert result["nnz"] > 0.08 * 1_500 * 2_500
    assert 0.05 < result["peak_rss_gb"] < result["target_gb"]
    assert result["within_target"]
    # the in-place normalisation against scanpy's (the naive path), same file, same run: same numbers
    assert result["normalize_max_abs_diff"] < 1e-5
    assert result["normalize_s"] > 0
    assert result["naive_normalize_s"] > 0
    assert 0 < result["normalize_peak_mem_ratio"] < 2
    assert list(tmp_path.iterdir()) == []
