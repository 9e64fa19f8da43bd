"""The Norman-like preset at full width: every gene and condition of the screen, fewer cells per condition
(the cells are independent draws; the full 90k-cell draw is `pertadapt simulate --preset norman_like`, and its
memory is measured by `pertadapt bench data`)."""

from __future__ import annotations

import pytest

from pertadapt.data.simulate import PRESETS, simulate
from pertadapt.data.validate import validate_adata


@pytest.mark.slow
def test_norman_like_preset_has_every_gene_and_condition_and_validates() -> None:
    p = PRESETS["norman_like"]
    n_perts = p.n_singles + p.n_doubles
    # the preset describes a Norman 2019-sized screen: ~5k genes, 105 singles, 131 doubles, ~90k cells
    assert (p.n_genes, p.n_singles, p.n_doubles) == (5045, 105, 131)
    assert n_perts * p.cells_per_condition + p.n_control == 90_060
    adata = simulate("norman_like", seed=0, cells_per_condition=30, n_control=2000)
    assert adata.n_vars == p.n_genes
    assert adata.n_obs == n_perts * 30 + 2000
    conds = set(adata.obs["condition"].astype(str))
    assert sum("ctrl" not in c for c in conds) == p.n_doubles
    assert len(conds) == n_perts + 1
    report = validate_adata(adata, expect="log1p")
    assert report.ok, [str(x) for x in report.errors]
