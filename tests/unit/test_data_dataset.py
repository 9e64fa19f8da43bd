"""Paired-control dataset: raw layout → prepare → split → dataset, in memory and file-backed."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertadapt.data.dataset import PairedCells, read_perturb_data
from pertadapt.data.io import read_raw, write_h5ad_atomic
from pertadapt.data.prepare import prepare_adata
from pertadapt.data.splits import split_conditions

GENES = [f"G{i}" for i in range(12)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw counts in layout (b) (``gene`` column, ``non-targeting``, ``A_B``), two cell types, prepared."""
    rng = np.random.default_rng(0)
    labels = ["non-targeting"] * 30 + [f"G{i}" for i in range(6) for _ in range(6)] + ["G0_G1"] * 6 + ["G2_G3"] * 6
    n = len(labels)
    x = rng.poisson(4.0, size=(n, len(GENES))).astype(np.float32)
    obs = pd.DataFrame({"gene": labels, "cell_type": np.where(np.arange(n) % 2, "K562", "RPE1")},
                       index=[f"c{i}" for i in range(n)])
    raw = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame({"gene_name": GENES}, index=GENES))
    d = tmp_path_factory.mktemp("layout")
    raw.write_h5ad(d / "raw.h5ad")
    adata = read_raw(d / "raw.h5ad", perturbation_column="gene", control_labels=["non-targeting"], delimiter="_")
    out = d / "prepared.h5ad"
    write_h5ad_atomic(prepare_adata(adata, min_genes=1, n_de=5), out)
    return out


@pytest.mark.parametrize("backed", [False, True])
def test_round_trip_pairs_controls_of_the_same_cell_type(prepared: Path, backed: bool) -> None:
    data = read_perturb_data(prepared, n_de=5, backed=backed)
    split = split_conditions(list(data.conditions), "simulation", seed=1)
    genes = sorted({g for c in data.conditions for g in c.split("+") if g != "ctrl"})
    cells = PairedCells(data, split.train, genes, seed=3, n_de=5)
    batch = cells.batch(np.arange(len(cells)))
    assert batch.x_ctrl.shape == batch.y.shape == (len(cells), len(GENES))
    ctrl_id = data.conditions.index("ctrl")
    perturbed = data.cell_condition[cells.pair] != ctrl_id
    assert not perturbed.any()  # every input is a control cell
    assert (data.cell_type[cells.pair] == data.cell_type[cells.cells]).all()
    own = data.cell_condition[cells.cells] == ctrl_id
    assert (cells.pair[own] == cells.cells[own]).all()  # controls are paired with themselves
    assert batch.de_idx.shape == (len(cells), 5)
    assert bool(batch.nz_mask[batch.is_ctrl].all())


def test_backed_equals_in_memory_and_seed_controls_pairing(prepared: Path) -> None:
    mem, disk = read_perturb_data(prepared), read_perturb_data(prepared, backed=True)
    conds = list(mem.conditions)
    a = PairedCells(mem, conds, ["G0", "G1"], seed=5).batch([3, 1, 1, 40])
    b = PairedCells(disk, conds, ["G0", "G1"], seed=5).batch([3, 1, 1, 40])
    np.testing.assert_array_equal(a.x_ctrl.numpy(), b.x_ctrl.numpy())
    np.testing.assert_array_equal(a.y.numpy(), b.y.numpy())
    np.testing.assert_allclose(mem.ctrl_mean, disk.ctrl_mean)
    for c in conds:
        np.testing.assert_allclose(mem.condition_means[c], disk.condition_means[c])
    other = PairedCells(mem, conds, ["G0", "G1"], seed=6)
    assert not np.array_equal(other.pair, PairedCells(mem, conds, ["G0", "G1"], seed=5).pair)


def test_simulating_the_data_leaves_torchs_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numba's OpenMP layer (run by scanpy while a preset is simulated) sets the process-wide thread count to
    every core; a run that simulated its data must train on as many threads as one that found the file (the
    float reductions, and so the metrics, depend on it)."""
    import torch

    from pertadapt.config import load_run_config
    from pertadapt.train.setup import ensure_data_file

    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path))
    cfg = load_run_config("configs/smoke.yaml", ["data.simulate_seed=3"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ensure_data_file(cfg).is_file()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
