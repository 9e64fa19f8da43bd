"""The data benchmark runs end to end at a small size (the 200k x 5k number is measured, not tested)."""

from __future__ import annotations

from pertadapt.data.bench import run_data_benchmark


def test_small_benchmark(tmp_path):
    result = run_data_benchmark(n_cells=1_500, n_genes=2_500, density=0.1, n_conditions=20, workdir=tmp_path)
    assert result["nnz"] > 0.08 * 1_500 * 2_500
    assert 0.05 < result["peak_rss_gb"] < result["target_gb"]
    assert result["within_target"]
    assert list(tmp_path.iterdir()) == []
