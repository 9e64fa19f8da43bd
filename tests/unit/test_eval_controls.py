"""Evaluation control cells (``eval.controls_per_condition``): a no-change model through the real predict path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from pertadapt.config.schema import ConfigError, EvalConfig, RunConfig
from pertadapt.data.dataset import PairedCells, PerturbData
from pertadapt.train.engine import TorchEngine
from pertadapt.train.loop import predict_condition_means
from pertadapt.types import Batch

N_GENES, N_CTRL, PER_COND = 20, 300, 5
CONDS = ("A+B", "A+ctrl", "B+ctrl", "C+ctrl", "ctrl")


@pytest.fixture(scope="module")
def data() -> PerturbData:
    rng = np.random.default_rng(0)
    n_pert = PER_COND * (len(CONDS) - 1)
    x = rng.gamma(2.0, 0.5, size=(N_CTRL + n_pert, N_GENES)).astype(np.float32)
    cond = np.concatenate([np.full(N_CTRL, CONDS.index("ctrl")), np.repeat(np.arange(len(CONDS) - 1), PER_COND)])
    idx = {c: np.arange(N_GENES) for c in CONDS if c != "ctrl"}
    return PerturbData(tuple(f"G{i}" for i in range(N_GENES)), sp.csr_matrix(x), np.full(len(x), 1e4, np.float32),
                       cond, np.zeros(len(x), dtype=np.int64), CONDS, idx, idx)


class _NoChange(nn.Module):
    """Predicts the paired control cell itself."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch.x_ctrl


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(_NoChange(), RunConfig(), torch.device("cpu"))


def _means(engine: TorchEngine, data: PerturbData, k: int | None, seed: int) -> dict[str, np.ndarray]:
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=seed, controls_per_condition=k)
    return predict_condition_means(engine, cells, batch_size=64)


def test_the_whole_pool_gives_the_control_mean_exactly(engine: TorchEngine, data: PerturbData) -> None:
    pred = _means(engine, data, None, seed=1)
    assert sorted(pred) == sorted(c for c in CONDS if c != "ctrl")  # ctrl is not evaluated
    for c in pred:
        np.testing.assert_allclose(pred[c], data.ctrl_mean, rtol=1e-6)
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=1, controls_per_condition=N_CTRL + 7)
    assert len(cells) == (len(CONDS) - 1) * N_CTRL  # more than the pool: the whole pool


def test_k_controls_are_distinct_seeded_and_carry_the_sampling_noise(engine: TorchEngine, data: PerturbData) -> None:
    k = 40
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=3, controls_per_condition=k)
    assert len(cells) == 4 * k
    ctrl = set(data.control_cells.tolist())
    for c in range(4):
        rows = data.cell_condition[cells.cells] == c
        assert len(set(cells.pair[rows].tolist())) == k
        assert set(cells.pair[rows].tolist()) <= ctrl
    again = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=3, controls_per_condition=k)
    assert np.array_equal(again.pair, cells.pair)
    # E[mse(mean of k of M controls drawn without replacement, pool mean)] = mean_g var_g / k * (M - k) / (M - 1)
    pool = data.X[data.control_cells].toarray().astype(np.float64)
    expected = pool.var(axis=0).mean() / k * (N_CTRL - k) / (N_CTRL - 1)
    mse = [float(np.mean((p - data.ctrl_mean) ** 2)) for seed in range(60)
           for p in _means(engine, data, k, seed).values()]
    assert np.mean(mse) == pytest.approx(expected, rel=0.1)
    assert min(mse) > 0


def test_controls_per_condition_is_validated() -> None:
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="eval.controls_per_condition"):
            EvalConfig(controls_per_condition=bad)
