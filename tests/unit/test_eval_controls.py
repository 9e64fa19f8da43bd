"""Evaluation control cells (``eval.val_controls``, ``eval.test_controls``, ``eval.controls_seed``): a no-change model
through the real predict path, the baselines on the same controls, the pairing noise and ``eval.precision``."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from pertadapt.config.load import load_run_config
from pertadapt.config.schema import ConfigError, EvalConfig, RunConfig
from pertadapt.data.dataset import PairedCells, PerturbData
from pertadapt.eval import pairing_noise_mse_de
from pertadapt.train.engine import TorchEngine
from pertadapt.train.loop import eval_autocast, predict_condition_means
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
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=k, controls_seed=seed)
    return predict_condition_means(engine, cells, batch_size=64)


def test_the_whole_pool_gives_the_control_mean_exactly(engine: TorchEngine, data: PerturbData) -> None:
    pred = _means(engine, data, None, seed=1)
    assert sorted(pred) == sorted(c for c in CONDS if c != "ctrl")  # ctrl is not evaluated
    for c in pred:
        np.testing.assert_allclose(pred[c], data.ctrl_mean, rtol=1e-6)
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=1, controls=N_CTRL + 7)
    assert len(cells) == (len(CONDS) - 1) * N_CTRL  # more than the pool: the whole pool


def test_k_controls_are_distinct_seeded_and_carry_the_sampling_noise(engine: TorchEngine, data: PerturbData) -> None:
    k = 40
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=k, controls_seed=3)
    assert len(cells) == 4 * k
    ctrl = set(data.control_cells.tolist())
    for c in range(4):
        rows = data.cell_condition[cells.cells] == c
        assert len(set(cells.pair[rows].tolist())) == k
        assert set(cells.pair[rows].tolist()) <= ctrl
    again = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=k, controls_seed=3)
    assert np.array_equal(again.pair, cells.pair)
    # E[mse(mean of k of M controls drawn without replacement, pool mean)] = mean_g var_g / k * (M - k) / (M - 1)
    pool = data.X[data.control_cells].toarray().astype(np.float64)
    expected = pool.var(axis=0).mean() / k * (N_CTRL - k) / (N_CTRL - 1)
    mse = [float(np.mean((p - data.ctrl_mean) ** 2)) for seed in range(60)
           for p in _means(engine, data, k, seed).values()]
    assert np.mean(mse) == pytest.approx(expected, rel=0.1)
    assert min(mse) > 0


def test_controls_are_validated() -> None:
    for key in ("val_controls", "test_controls"):
        for bad in (0, -3, 2.5):
            with pytest.raises(ConfigError, match=f"eval.{key}"):
                EvalConfig(**{key: bad})
    with pytest.raises(ConfigError, match="eval.controls_seed"):
        EvalConfig(controls_seed=-1)
    with pytest.raises(ConfigError, match="eval.precision"):
        EvalConfig(precision="fp16")


def test_the_old_key_names_the_new_ones(tmp_path) -> None:
    with pytest.raises(ConfigError, match="eval.controls_per_condition.*eval.val_controls and eval.test_controls"):
        load_run_config(None, ["eval.controls_per_condition=20"])
    path = tmp_path / "old.yaml"
    path.write_text("eval: {controls_per_condition: null}\n")
    with pytest.raises(ConfigError, match="eval.controls_per_condition.*eval.controls_seed"):
        load_run_config(path)


def test_the_subset_depends_on_the_controls_seed_only(data: PerturbData) -> None:
    """Same subset whatever the run seed (epochs, arms and seeds share it) and the other conditions evaluated."""
    k = 30

    def subsets(conds: list[str], **kw: int) -> dict[str, list[int]]:
        cells = PairedCells.for_evaluation(data, conds, ["A", "B", "C"], controls=k, **kw)
        names = np.asarray(data.conditions)[data.cell_condition[cells.cells]]
        return {c: cells.pair[names == c].tolist() for c in np.unique(names)}

    base = subsets(list(CONDS), seed=1, controls_seed=0)
    assert subsets(list(CONDS), seed=2, controls_seed=0) == base  # another run seed (or arm): the same
    assert subsets(["B+ctrl", "ctrl"], seed=9, controls_seed=0)["B+ctrl"] == base["B+ctrl"]  # another split
    other = subsets(list(CONDS), seed=1, controls_seed=1)
    assert all(other[c] != base[c] for c in base)
    assert len({tuple(v) for v in base.values()}) == len(base)  # each condition draws its own


def test_setup_draws_the_eval_sets_from_the_eval_options() -> None:
    """``prepare_run_data``: val/test subsets sized by eval.val_controls/test_controls, identical across run seeds
    (on a shared split; a condition keeps its controls across splits too, see above)."""
    from pertadapt.train.setup import prepare_run_data

    def sets(*overrides: str) -> tuple:
        rd = prepare_run_data(load_run_config("smoke.yaml", ["eval.val_controls=7", "eval.test_controls=11",
                                                             "data.split_seed=0", *overrides]))
        return rd, (rd.val.cells.cells.tolist(), rd.val.cells.pair.tolist(), rd.test.cells.pair.tolist())

    rd, one = sets("seed=1")
    n_val = len([c for c in rd.split.val if c != "ctrl"])
    assert len(rd.val.cells) == 7 * n_val
    assert len(rd.test.cells) == 11 * len([c for c in rd.split.test if c != "ctrl"])
    assert sets("seed=2")[1] == one  # another run seed: the same controls
    assert sets("seed=1", "eval.controls_seed=5")[1] != one


def test_baselines_are_scored_against_the_models_controls(engine: TorchEngine, data: PerturbData) -> None:
    """The no-change baseline on the eval controls equals the no-change model's prediction through the predict
    path; every baseline is shifted by the same controls; the whole pool shifts nothing."""
    from pertadapt.baselines import fit_baseline
    from pertadapt.config.components import MODEL_OPTIONS, NoChangeBaseline

    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=25, controls_seed=4)
    model_pred = predict_condition_means(engine, cells, batch_size=64)
    shift = {c: m - data.ctrl_mean for c, m in cells.control_means().items()}
    train = {c: data.condition_means[c] for c in ("A+ctrl", "B+ctrl")}
    conds = sorted(model_pred)
    nochange = fit_baseline(NoChangeBaseline(), train, data.ctrl_mean).predict(conds, control_shift=shift)
    for c in conds:
        np.testing.assert_allclose(nochange[c], model_pred[c], rtol=1e-5, atol=1e-6)
    for name in ("baseline_mean", "baseline_additive"):
        model = fit_baseline(MODEL_OPTIONS.options(name)(), train, data.ctrl_mean)
        plain, shifted = model.predict(conds), model.predict(conds, control_shift=shift)
        for c in conds:
            np.testing.assert_allclose(shifted[c] - plain[c], shift[c])
    whole = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=None)
    assert all(m is data.ctrl_mean for m in whole.control_means().values())


def test_pairing_noise_is_zero_on_the_whole_pool_and_shrinks_with_k(data: PerturbData) -> None:
    def noise(k: int | None) -> float:
        cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=k)
        return pairing_noise_mse_de(cells.control_means(), data.ctrl_mean, data.de_idx)

    assert noise(None) == 0.0
    assert noise(10) > noise(100) > noise(250) > 0.0


def test_bf16_precision_autocasts_on_cuda_only(engine: TorchEngine, data: PerturbData) -> None:
    assert isinstance(eval_autocast(torch.device("cpu"), "bf16"), contextlib.nullcontext)
    assert isinstance(eval_autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: constructing is enough to read the dtype
        ctx = eval_autocast(torch.device("cuda"), "bf16")
    assert isinstance(ctx, torch.autocast)
    assert ctx.fast_dtype == torch.bfloat16
    cells = PairedCells.for_evaluation(data, list(CONDS), ["A", "B", "C"], seed=0, controls=25)
    fp32 = predict_condition_means(engine, cells, batch_size=64)
    bf16 = predict_condition_means(engine, cells, batch_size=64, precision="bf16")  # CPU: fp32 unchanged
    assert all(np.array_equal(fp32[c], bf16[c]) for c in fp32)


def test_eval_precision_reaches_every_evaluation_forward(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval.precision`` from the config is what the per-epoch validation and the final evaluation run under."""
    from pertadapt.train import loop
    from pertadapt.train.run import run
    from pertadapt.train.setup import ensure_data_file

    seen: list[str] = []

    def recording(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
        seen.append(precision)
        return contextlib.nullcontext()

    monkeypatch.setattr(loop, "eval_autocast", recording)
    cfg = load_run_config("configs/smoke.yaml", ["eval.precision=bf16", "optim.epochs=1", "optim.max_steps_per_epoch=1"])
    ensure_data_file(cfg)
    run(cfg, tmp_path / "run")
    assert seen
    assert set(seen) == {"bf16"}
