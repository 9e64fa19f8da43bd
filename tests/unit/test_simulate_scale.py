"""Scale presets at full size (slow): shapes of the Norman-like screen, and a clean validation report."""

from __future__ import annotations

import pytest

from pertadapt.data.simulate import PRESETS, simulate
from pertadapt.data.validate import validate_adata


@pytest.mark.slow
def test_norman_like_preset_at_full_size() -> None:
    p = PRESETS["norman_like"]
    adata = simulate("norman_like", seed=0)
    n_perts = p.n_singles + p.n_doubles
    assert adata.n_vars == p.n_genes
    assert adata.n_obs == n_perts * p.cells_per_condition + p.n_control  # ~91k cells, as Norman 2019
    conds = set(adata.obs["condition"].astype(str))
    assert sum("ctrl" not in c for c in conds) == p.n_doubles
    report = validate_adata(adata, expect="log1p")
    assert report.ok, [str(x) for x in report.errors]
