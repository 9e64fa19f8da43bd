"""The one training loop: batch → forward → loss → backward → step → validate → report.

It knows nothing about Ray, DeepSpeed or W&B: the engine owns distribution, the ``report``
callback owns logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pertadapt.config.metrics import VOCAB_PREFIX
from pertadapt.config.schema import RunConfig
from pertadapt.data.dataset import PairedCells, PerturbData
from pertadapt.data.keys import CONTROL
from pertadapt.eval import Metrics, score_predictions
from pertadapt.rundir import RunDir
from pertadapt.train.checkpoint import Checkpoints
from pertadapt.train.engine import Engine
from pertadapt.train.schedule import LRSchedule
from pertadapt.train.timeline import mark
from pertadapt.types import Batch, LossOutput

__all__ = ["EvalSet", "TrainResult", "eval_autocast", "predict_condition_means", "score_gene_spaces", "train"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class EvalSet:
    """Cells to evaluate and the subgroups of their conditions.

    Attributes
    ----------
    cells
        Paired cells of the evaluated conditions.
    subgroups
        subgroup name → conditions (e.g. ``combo_seen0``).
    reference
        The training conditions (the Systema reference of the metrics).
    measured
        The view of ``cells.data`` over its measured genes when the model genes also hold zero-filled ones
        (``model.gene_space: vocabulary``): the metrics are then scored there and the all-gene ones are
        reported as ``vocab_<metric>`` (:func:`score_gene_spaces`); ``None`` = the model genes are measured.
    """

    cells: PairedCells
    subgroups: Mapping[str, Sequence[str]]
    reference: Sequence[str] = ()
    measured: PerturbData | None = None


@dataclass(frozen=True)
class TrainResult:
    """What training returns: the selected epoch, its validation and test metrics, its test predictions."""

    best_epoch: int
    val: Metrics
    test: Metrics
    test_predictions: dict[str, np.ndarray]


def _micro_batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i: i + size] for i in range(0, len(order), size)]


def eval_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The evaluation forwards' precision context (``eval.precision``): bf16 autocast on CUDA, else none."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_condition_means(engine: Engine, cells: PairedCells, batch_size: int,
                            precision: str = "fp32") -> dict[str, np.ndarray]:
    """Mean prediction per condition, computed across all ranks.

    Batches are dealt round-robin to ranks (the last ones padded with a repeat so that every rank
    runs the same number of forwards, as ZeRO-3 requires); per-condition sums are gathered. The forwards
    run under :func:`eval_autocast` (``precision``: ``fp32`` or ``bf16``); sums are float64.

    Returns
    -------
    dict
        condition → ``(N,)`` mean prediction over that condition's cells.
    """
    engine.train(False)
    batches = _micro_batches(np.arange(len(cells)), batch_size)
    per_rank = math.ceil(len(batches) / engine.world_size)
    mine = [batches[i] if i < len(batches) else None
            for i in range(engine.rank, per_rank * engine.world_size, engine.world_size)]
    n_genes = len(cells.data.genes)
    sums: dict[int, list[np.ndarray]] = {}
    for items in mine:
        batch = cells.batch(batches[-1] if items is None else items)
        with eval_autocast(engine.device, precision):
            pred = engine.forward(batch).cpu().double().numpy()
        if items is None:
            continue
        for c in np.unique(batch.cond_id.numpy()):
            rows = batch.cond_id.numpy() == c
            acc = sums.setdefault(int(c), [np.zeros(n_genes), np.zeros(1)])
            acc[0] += pred[rows].sum(0)
            acc[1] += rows.sum()
    merged: dict[int, list[np.ndarray]] = {}
    for part in engine.gather(sums):
        for c, (p, n) in part.items():
            acc = merged.setdefault(c, [np.zeros(n_genes), np.zeros(1)])
            acc[0] += p
            acc[1] += n
    names = cells.data.conditions
    return {names[c]: (p / n).astype(np.float32) for c, (p, n) in merged.items()}


def score_gene_spaces(pred: Mapping[str, np.ndarray], data: PerturbData, measured: PerturbData | None, *,
                      subgroups: Mapping[str, Sequence[str]], reference: Sequence[str]) -> Metrics:
    """Score predictions over ``data.genes`` on the measured genes (and, with zero-filled ones, on all).

    Parameters
    ----------
    pred
        Condition → ``(N,)`` predicted mean over ``data.genes``.
    data
        The dataset over the model genes.
    measured
        ``data.measured_only()`` (``data`` being the whole file, its ``columns`` are positions in
        ``data.genes``), or ``None`` when ``data``'s genes are all measured: the metrics are then those of :func:`~pertadapt.eval.score_predictions` on ``data``.
    subgroups, reference
        As for :func:`~pertadapt.eval.score_predictions`.

    Returns
    -------
    Metrics
        The metrics on the measured genes; with ``measured``, also every all-gene value (the reference's
        numbers) under ``vocab_<metric>`` (overall, per subgroup and per condition).
    """
    if measured is None:
        return score_predictions(pred, data, subgroups=subgroups, reference_conditions=reference)
    on_measured = score_predictions({c: p[measured.columns] for c, p in pred.items()}, measured, subgroups=subgroups,
                                    reference_conditions=reference)
    on_all = score_predictions(pred, data, subgroups=subgroups, reference_conditions=reference)

    def merged(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
        return {**a, **{f"{VOCAB_PREFIX}{k}": v for k, v in b.items()}}

    return Metrics(merged(on_measured.overall, on_all.overall),
                   {g: merged(v, on_all.subgroups.get(g, {})) for g, v in on_measured.subgroups.items()},
                   {c: merged(v, on_all.per_perturbation.get(c, {})) for c, v in on_measured.per_perturbation.items()})


def evaluate(engine: Engine, es: EvalSet, batch_size: int, precision: str = "fp32"
             ) -> tuple[Metrics, dict[str, np.ndarray]]:
    """Metrics of one split (ctrl excluded) through the one metric path, and the mean predictions."""
    pred = predict_condition_means(engine, es.cells, batch_size, precision)
    pred.pop(CONTROL, None)
    return score_gene_spaces(pred, es.cells.data, es.measured, subgroups=es.subgroups, reference=es.reference), pred


def _epoch_loss_row(gathered: list[list[dict[str, float]]]) -> dict[str, float]:
    """Mean total loss, components and weights of an epoch over every rank's micro-batches."""
    rows = [r for part in gathered for r in part]
    keys = {k for r in rows for k in r}
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in sorted(keys)}


def _loss_record(out: LossOutput) -> dict[str, float]:
    rec = {"train_loss": float(out.total.detach())}
    rec.update({f"train_{k}": float(v) for k, v in out.components.items()})
    rec.update({f"loss_weight_{k}": float(v) for k, v in out.weights.items()})
    return rec


def _epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's cells for one epoch, so that every optimiser step sees the same cells at any world size.

    The seeded permutation is cut into steps of ``batch_size`` cells (a last partial step is dropped, so
    every rank runs the same number of micro-batches); rank ``r`` takes the ``r``-th slice of each step.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = batch_size // world
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} training cells are fewer than one optimiser step (optim.batch_size={batch_size})")
    return order[: steps * batch_size].reshape(steps, world, per_rank)[:, rank].ravel()


def train(cfg: RunConfig, engine: Engine, train_cells: PairedCells, val: EvalSet, test: EvalSet,
          loss_fn: Callable[[torch.Tensor, Batch], LossOutput], run: RunDir, report: Report,
          *, checkpoints: Checkpoints, resumed: dict[str, Any] | None = None) -> TrainResult:
    """Train, select the best epoch on ``eval.select_metric``, test it, and return the final metrics.

    Parameters
    ----------
    cfg
        The run config (``optim`` and ``eval`` sections are read).
    engine
        Torch or DeepSpeed engine.
    train_cells, val, test
        Training cells and the two evaluation sets.
    loss_fn
        ``(pred, batch) -> LossOutput``.
    run
        The run directory: its epoch history, attempt records (one per start) and, on a non-finite
        loss, the non-finite record are written (:class:`~pertadapt.rundir.RunDir`).
    report
        Called on every rank with each epoch's row, after the epoch's checkpoint was saved: ``epoch``,
        ``lr`` (of the epoch's first optimiser step, ``optim.schedule``), ``train_loss`` and the loss components (``train_<component>``) and weights
        (``loss_weight_<name>``), and the validation metrics.
    checkpoints
        Where each epoch's checkpoint goes and the selected one is read back from.
    resumed
        Client state of the checkpoint already restored into ``engine`` (``Checkpoints.restore``):
        training continues after its epoch; ``None`` starts from epoch 0.

    Raises
    ------
    FloatingPointError
        When a micro-batch loss is NaN/inf (epoch, micro-step and loss components in the message; also
        recorded in the run directory, so that a retry does not train again).
    """
    o, ev = cfg.optim, cfg.eval
    start, best, best_epoch = 0, math.inf, -1
    if resumed is not None:
        start, best, best_epoch = resumed["epoch"] + 1, resumed["best"], resumed["best_epoch"]
        log.info("resumed at epoch %d (best so far: epoch %d)", start, best_epoch)
    if engine.rank == 0:
        run.record_attempt(start if resumed is not None else None)
        run.keep_history(start)
    select, sign = cfg.eval.select_metric, (1.0 if cfg.eval.select_mode == "min" else -1.0)
    per_step = max(1, o.batch_size // (o.micro_batch_size * engine.world_size))
    steps = len(train_cells) // o.batch_size
    schedule = LRSchedule(o, steps if o.max_steps_per_epoch is None else min(steps, o.max_steps_per_epoch))
    for epoch in range(start, o.epochs):
        engine.train(True)
        order = _epoch_order(len(train_cells), o.batch_size, cfg.seed, epoch, engine.rank, engine.world_size)
        batches = _micro_batches(order, o.micro_batch_size)
        if o.max_steps_per_epoch is not None:
            batches = batches[: o.max_steps_per_epoch * per_step]
        records = []
        for step, items in enumerate(batches):
            engine.set_lr(schedule.lr(epoch, step // per_step))
            batch = train_cells.batch(items)
            out = loss_fn(engine.forward(batch), batch)
            rec = _loss_record(out)
            if not math.isfinite(rec["train_loss"]):
                message = (f"training loss became {rec['train_loss']} at epoch {epoch}, micro-step {step} "
                           f"(components: {rec})")
                run.record_nonfinite(message, epoch=epoch, micro_step=step)
                raise FloatingPointError(message)
            engine.backward(out.total)
            engine.step()
            records.append(rec)
        val_metrics = evaluate(engine, val, ev.batch_size, ev.precision)[0].flat("val")
        row = {"epoch": epoch, "lr": schedule.lr(epoch, 0),
               **_epoch_loss_row(engine.gather(records)), **val_metrics}
        if select not in val_metrics:
            raise KeyError(f"eval.select_metric: {select!r} is not a validation metric "
                           f"(e.g. {', '.join(sorted(val_metrics)[:6])}, ...)")
        improved = sign * val_metrics[select] < best
        if improved:
            best, best_epoch = sign * val_metrics[select], epoch
        checkpoints.save(engine, {"epoch": epoch, "best": best, "best_epoch": best_epoch}, improved)
        if engine.rank == 0:
            run.append_history(row)
        report(row)
    if engine.rank == 0:
        mark(run, "train_end")
    checkpoints.load_best(engine, best_epoch)
    test_metrics, test_pred = evaluate(engine, test, ev.batch_size, ev.precision)
    val_metrics = evaluate(engine, val, ev.batch_size, ev.precision)[0]
    return TrainResult(best_epoch, val_metrics, test_metrics, test_pred)
