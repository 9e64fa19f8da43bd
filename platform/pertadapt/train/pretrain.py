"""``pertadapt pretrain``: masked-expression pretraining of an FM on the cells of an ``.h5ad``, end to end.

A trial's engines (:mod:`pertadapt.train.engine`: torch in one process, or DeepSpeed on each Ray Train worker
of :func:`pertadapt.train.worker.launch_pretrain`): each optimiser step draws ``optim.batch_size`` training
cells and masks ``objective.mask_ratio`` of their genes (both from a generator seeded by the run seed and the
step, so a resumed run sees the same batches; each rank takes its slice; with ``objective.read_depth: rda``
the same generator down-samples the input cells), the engine runs forward and
backward in micro-batches, and every ``checkpoint_every`` steps a resumable checkpoint replaces
``DIR/resume/`` whole. At the end the backbone is written in its architecture's checkpoint layout into
``DIR`` with a model card (``model_card.json``, ``MODEL_CARD.md``); held-out cells are scored against the
per-gene mean predictor and, for a simulated file, the in-silico perturbation score of the trained and of
the random-init network is compared with the true network (:func:`edge_scores`).

:func:`pretrained_checkpoint` is the cached entry point the rest of the platform calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pertadapt.config.errors import ConfigError
from pertadapt.config.load import config_to_dict
from pertadapt.config.pretrain import PretrainConfig, load_pretrain_config
from pertadapt.data.cells import CellMatrix, read_cells, read_depth_input
from pertadapt.eval.edges import edge_auroc
from pertadapt.files import (
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    exclusive_lock,
    node_sha256_file,
    sha256_bytes,
)
from pertadapt.models.backbones.checkpoint import read_json_object
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.models.backbones.tiny import TinyTransformer
from pertadapt.models.pretrain import MASK_VALUES, MaskedValueModel, masked_mse
from pertadapt.report.logger import RunLogger
from pertadapt.report.wandb import open_logger
from pertadapt.train.checkpoint import has_checkpoint, replace_dir, require_checkpoint
from pertadapt.train.engine import Engine, build_engine
from pertadapt.train.run import seed_everything
from pertadapt.train.schedule import LRSchedule
from pertadapt.train.setup import ensure_data_file, provenance
from pertadapt.types import MaskedCells

__all__ = ["MODEL_CARD_JSON", "MODEL_CARD_MD", "RESUME_DIR", "PretrainResult", "Split", "edge_scores", "heldout_scores",
           "masked_batch", "perturbation_score", "pretrain", "pretrained_checkpoint", "read_model_card", "split_cells",
           "summary_of"]

log = logging.getLogger(__name__)

#: Files of a pretraining's output directory (besides the backbone's own checkpoint files).
MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "MODEL_CARD.md"
#: The resumable state (engine checkpoint: weights, optimiser, RNG, loss curve), removed once finished.
RESUME_DIR = "resume"


@dataclass(frozen=True)
class Split:
    """Training and held-out rows of the cell matrix."""

    train: np.ndarray
    heldout: np.ndarray


@dataclass(frozen=True)
class PretrainResult:
    """What a finished pretraining returns.

    Attributes
    ----------
    directory
        The output directory (checkpoint + model card).
    card
        The model card (as written to ``model_card.json``); empty on ranks other than 0.
    summary
        The ``--json`` figures: ``backbone``, ``heldout_masked_mse``, ``mean_predictor_mse``, ``edge_auroc`` and
        ``edge_auroc_random`` (simulated files only), ``steps``, ``seconds``; empty on ranks other than 0.
    model
        The trained network (backbone + value head) of this process.
    """

    directory: Path
    card: dict[str, Any]
    summary: dict[str, Any]
    model: MaskedValueModel


def split_cells(n_cells: int, frac: float, seed: int) -> Split:
    """Hold out ``round(frac × n)`` (at least 1) of ``n_cells`` rows, drawn with ``seed``.

    Raises
    ------
    ConfigError
        When fewer than 2 cells leave nothing to train on or nothing to score.
    """
    n_held = max(1, round(frac * n_cells))
    if n_cells - n_held < 1:
        raise ConfigError(f"data.heldout_frac: {frac} of {n_cells} cells leaves no training cell")
    order = np.random.default_rng(seed).permutation(n_cells)
    return Split(np.sort(order[n_held:]), np.sort(order[:n_held]))


def masked_batch(cells: CellMatrix, rows: np.ndarray, mask: np.ndarray, mask_value: float,
                 source: tuple[np.ndarray, np.ndarray] | None = None) -> MaskedCells:
    """The :class:`MaskedCells` of ``rows`` with the ``(len(rows), N)`` boolean ``mask`` hidden.

    ``source``: the ``(len(rows), N)`` input expression and ``(len(rows),)`` totals of down-sampled copies of
    the cells (:func:`pertadapt.data.cells.read_depth_input`), which replace the cells in the input; the
    target stays the cells' own expression. ``None``: the input is the cells themselves.
    """
    target = torch.from_numpy(cells.x[rows])
    m = torch.from_numpy(mask)
    total = torch.from_numpy(cells.total_count[rows])
    if source is None:
        return MaskedCells(target.masked_fill(m, mask_value), total, target, m)
    x, source_total = source
    return MaskedCells(torch.from_numpy(x).masked_fill(m, mask_value), total, target, m,
                       torch.from_numpy(source_total))


def _step_batch(cfg: PretrainConfig, cells: CellMatrix, train: np.ndarray, step: int,
                mask_value: float) -> MaskedCells:
    """Step ``step``'s cells, mask and (``rda``) down-sampling: a function of (seed, step) only, so a resumed run
    draws the same."""
    rng = np.random.default_rng([cfg.seed, step])
    rows = rng.choice(train, size=cfg.optim.batch_size, replace=len(train) < cfg.optim.batch_size)
    mask = rng.random((rows.size, cells.x.shape[1])) < cfg.objective.mask_ratio
    obj = cfg.objective
    source = (read_depth_input(cells, rows, rng, obj.rda_prob, obj.rda_alpha, obj.rda_beta)
              if obj.read_depth == "rda" else None)
    return masked_batch(cells, rows, mask, mask_value, source)


def _build_network(cfg: PretrainConfig, genes: Sequence[str]) -> MaskedValueModel:
    """The seeded random-init network: the same weights for the same config and seed."""
    seed_everything(cfg.seed)
    return MaskedValueModel(build_backbone(cfg.backbone, genes=genes, width=cfg.backbone.hidden_size))


@torch.no_grad()
def heldout_scores(model: MaskedValueModel, cells: CellMatrix, split: Split, mask_ratio: float, mask_value: float,
                   seed: int) -> dict[str, float]:
    """Masked-value MSE of ``model`` on the held-out cells and of the training cells' per-gene mean.

    The held-out mask is drawn with ``seed`` (``data.heldout_seed``), so every model is scored on the same
    masked values. Returns ``heldout_masked_mse`` and ``mean_predictor_mse``.
    """
    rows = split.heldout
    mask = np.random.default_rng([seed, 1]).random((rows.size, cells.x.shape[1])) < mask_ratio
    batch = masked_batch(cells, rows, mask, mask_value)
    model.eval()
    device = next(model.parameters()).device
    sq, n = 0.0, int(mask.sum())
    for start in range(0, rows.size, 64):
        part = batch.rows(slice(start, start + 64)).to(device)
        pred = model(part)
        sq += float(((pred - part.target) ** 2)[part.mask].sum())
    mean = cells.x[split.train].mean(axis=0)
    base = float(((cells.x[rows] - mean[None, :]) ** 2)[mask].sum())
    return {"heldout_masked_mse": sq / max(n, 1), "mean_predictor_mse": base / max(n, 1)}


def perturbation_score(model: MaskedValueModel, x: np.ndarray, total: np.ndarray, mask_value: float,
                       chunk: int = 64) -> np.ndarray:
    """In-silico perturbation score ``S[i, j]``: how much gene ``i``'s input value moves the prediction of gene ``j``.

    For each cell and each gene ``j``, gene ``j`` is masked and the gradient of the predicted value of ``j``
    with respect to every other gene's input value is taken (an infinitesimal perturbation of gene ``i``);
    ``S[i, j]`` is the mean of its absolute value over the cells.

    Parameters
    ----------
    model
        The network (backbone + value head).
    x
        ``(n_cells, N)`` log1p-normalised expression.
    total
        ``(n_cells,)`` raw totals.
    mask_value
        The backbone's mask value.
    chunk
        Masked copies of a cell per forward.

    Returns
    -------
    np.ndarray
        ``(N, N)`` float64, zero diagonal.
    """
    model.eval()
    device = next(model.parameters()).device
    n = x.shape[1]
    score = np.zeros((n, n))
    for c in range(x.shape[0]):
        for start in range(0, n, chunk):
            js = torch.arange(start, min(start + chunk, n), device=device)
            rows = torch.arange(js.numel(), device=device)
            inp = torch.from_numpy(x[c]).to(device).repeat(js.numel(), 1)
            inp[rows, js] = mask_value
            inp.requires_grad_(True)
            pred = model.predict(inp, torch.full((js.numel(),), float(total[c]), device=device))
            (grad,) = torch.autograd.grad(pred[rows, js].sum(), inp)
            score[:, start:start + js.numel()] += grad.abs().T.double().cpu().numpy()  # row j of grad → column j
    np.fill_diagonal(score, 0.0)
    return score / max(x.shape[0], 1)


def edge_scores(trained: MaskedValueModel, random_init: MaskedValueModel, cells: CellMatrix, split: Split,
                n_cells: int, mask_value: float) -> dict[str, float]:
    """``edge_auroc`` (trained) and ``edge_auroc_random`` of the in-silico perturbation score on held-out cells.

    Empty when the file has no simulator truth (no true edges to score against).
    """
    if cells.edges is None:
        return {}
    rows = split.heldout[:n_cells]
    src, dst = cells.edges
    out = {}
    for key, model in (("edge_auroc", trained), ("edge_auroc_random", random_init)):
        out[key] = edge_auroc(perturbation_score(model, cells.x[rows], cells.total_count[rows], mask_value), src, dst)
    return out


def _config_sha256(cfg: PretrainConfig, *, data_path: bool = True) -> str:
    """SHA-256 of what decides a pretraining's result: the resolved config without ``name`` and ``logging``
    (and without ``data.path`` when ``data_path`` is false: the caller hashes the file's content instead)."""
    doc = config_to_dict(cfg)
    for key in ("name", "logging"):
        doc.pop(key)
    if not data_path:
        doc["data"].pop("path")
    return sha256_bytes(json.dumps(doc, sort_keys=True))


def _save_backbone(backbone: nn.Module, directory: Path, genes: Sequence[str]) -> None:
    """The backbone's checkpoint in its architecture's layout (``tiny`` is told its genes; the FMs know theirs)."""
    if isinstance(backbone, TinyTransformer):
        backbone.save_pretrained_dir(directory, genes)
    else:
        backbone.save_pretrained_dir(directory)


def _objective_text(cfg: PretrainConfig, mask_value: float) -> str:
    """The model card's one-line description of the objective."""
    obj = cfg.objective
    text = f"masked-value regression (MSE on masked genes), mask ratio {obj.mask_ratio}, mask value {mask_value}"
    if obj.read_depth == "rda":
        text += (f"; read-depth-aware: a cell is down-sampled with probability {obj.rda_prob} (ratio ~ "
                 f"Beta({obj.rda_alpha}, {obj.rda_beta}), binomial thinning), target at its full depth")
    return text


def _model_card_md(card: dict[str, Any]) -> str:
    s, d = card["scores"], card["data"]
    edge = (f"- edge AUROC of the in-silico perturbation score against the simulator's network: "
            f"{s['edge_auroc']:.3f} (random init of the same architecture and seed: {s['edge_auroc_random']:.3f})\n"
            if "edge_auroc" in s else "- edge AUROC: not computed (the data file holds no simulator truth)\n")
    return (f"# {card['backbone']['name']} pretrained by pertadapt\n\n"
            f"- objective: {card['objective']}\n"
            f"- data: {d['path']} (sha256 {d['sha256'][:16]}…), {d['cells']} cells: {d['n_train']} trained on, "
            f"{d['n_heldout']} held out\n"
            f"- genes: {card['genes']['n']} (order sha256 {card['genes']['sha256'][:16]}…, `genes.txt`)\n"
            f"- steps: {card['steps']} × {card['batch_size']} cells, seed {card['seed']}, "
            f"{card['seconds']:.1f} s\n"
            f"- held-out masked-value MSE: {s['heldout_masked_mse']:.4f} (per-gene mean predictor: "
            f"{s['mean_predictor_mse']:.4f}, ratio {s['heldout_masked_mse'] / s['mean_predictor_mse']:.3f})\n"
            f"{edge}"
            f"- pertadapt {card['provenance']['packages'].get('pertadapt')}, git {card['provenance']['git_sha']}\n\n"
            "Load it with `backbone: {name: " + card['backbone']['name'] + ", checkpoint: <this directory>}` or "
            "`pertadapt embed --backbone " + card['backbone']['name'] + " --checkpoint <this directory>`.\n")


def pretrain(cfg: PretrainConfig, out: str | Path, *, resume: bool = False, data_file: Path | None = None,
             progress: bool = True) -> PretrainResult:
    """Pretrain ``cfg``'s backbone and write its checkpoint and model card into ``out``.

    Parameters
    ----------
    cfg
        The pretraining config.
    out
        Output directory (created); with ``resume`` it must hold ``resume/`` of an interrupted run of ``cfg``.
    resume
        Continue from ``out/resume/``.
    data_file
        The ``.h5ad`` to read instead of ``cfg.data`` (``data.path`` or the simulator preset).
    progress
        Show a progress bar (rich) on the terminal.

    Raises
    ------
    ConfigError
        ``--resume`` without a checkpoint, a file without control cells, too few cells.
    """
    t0 = time.perf_counter()
    out = Path(out)
    path = Path(data_file) if data_file is not None else ensure_data_file(cfg)
    cells = read_cells(path, cfg.data.cells, counts=cfg.objective.read_depth == "rda")
    split = split_cells(cells.x.shape[0], cfg.data.heldout_frac, cfg.data.heldout_seed)
    model = _build_network(cfg, cells.genes)
    engine = build_engine(model, cfg)
    lead = engine.rank == 0
    resume_dir = out / RESUME_DIR
    if resume:
        state = engine.load(require_checkpoint(resume_dir if has_checkpoint(resume_dir) else None, resume_dir))
        if state.get("config_sha256") != _config_sha256(cfg):
            raise ConfigError(f"--resume: {resume_dir} was written by another pretrain config (or data file); "
                              "resume with the config and overrides of the interrupted run")
        start, losses = int(state["step"]), [float(v) for v in state["losses"]]
        log.info("resuming %s at step %d of %d", out, start, cfg.steps)
    else:
        if (out / MODEL_CARD_JSON).exists() or has_checkpoint(resume_dir):
            raise ConfigError(f"--out: {out} already holds a pretraining; use --resume or another directory")
        start, losses = 0, []
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    engine.gather(None)  # every rank has checked the directory before rank 0 writes into it
    logger = open_logger(mode=cfg.logging.wandb, rank=engine.rank, project=cfg.logging.project,
                         group=cfg.logging.group, name=cfg.name, directory=out, config=config_to_dict(cfg))
    log.info("pretraining %s on %d %s cells × %d genes of %s (%d held out), %d steps",
             cfg.backbone.name, split.train.size, cfg.data.cells, len(cells.genes), path, split.heldout.size, cfg.steps)
    try:
        result = _train_and_write(cfg, out, engine, model, cells, split, path, start, losses, logger, t0, progress)
    except BaseException:
        logger.finish({}, exit_code=1)
        raise
    logger.finish({f"pretrain/{k}": v for k, v in result.summary.items() if isinstance(v, int | float)})
    return result


def _train_and_write(cfg: PretrainConfig, out: Path, engine: Engine, model: MaskedValueModel, cells: CellMatrix,
                     split: Split, path: Path, start: int, losses: list[float], logger: RunLogger, t0: float,
                     progress: bool) -> PretrainResult:
    """The steps from ``start``, the held-out scores, the checkpoint and the model card (see :func:`pretrain`).

    With ``W`` ranks, rank ``r`` takes the ``r``-th of ``W`` equal slices of each step's cells; the step's loss
    is the mean over the ranks. Rank 0 alone scores and writes the checkpoint's files and the model card.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    mask_value = MASK_VALUES[cfg.backbone.name]
    schedule = LRSchedule(dataclasses.replace(cfg.optim, epochs=1), cfg.steps)
    resume_dir = out / RESUME_DIR
    micro = cfg.optim.micro_batch_size
    lead, share = engine.rank == 0, cfg.optim.batch_size // engine.world_size
    engine.train(True)
    columns = (TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not (progress and lead)) as bar:
        task = bar.add_task("steps", total=cfg.steps, completed=start, loss="-")
        for step in range(start, cfg.steps):
            engine.set_lr(schedule.lr(0, step))
            batch = _step_batch(cfg, cells, split.train, step, mask_value)
            mine = slice(engine.rank * share, (engine.rank + 1) * share)
            batch = batch.rows(mine).to(engine.device)
            total = 0.0
            for i in range(0, len(batch), micro):
                part = batch.rows(slice(i, i + micro))
                loss = masked_mse(engine.forward(part), part)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"pretraining: the loss is {float(loss)} at step {step}; lower optim.lr")
                engine.backward(loss)
                engine.step()
                total += loss.item()
            losses.append(sum(engine.gather(total)) / engine.world_size / cfg.accumulation_steps)
            bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            if (step + 1) % cfg.log_every == 0:
                logger.log({"pretrain/loss": losses[-1], "pretrain/lr": schedule.lr(0, step)}, step=step + 1)
                log.debug("step %d: loss %.4f", step + 1, losses[-1])
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                new = out / f".{RESUME_DIR}.new"
                if lead:
                    shutil.rmtree(new, ignore_errors=True)
                engine.gather(None)
                # the checkpoint format's client state (``epoch``, ``best_epoch``, ``best``) counts steps here
                engine.save(new, {"epoch": step + 1, "best_epoch": step + 1, "best": losses[-1], "step": step + 1,
                                  "losses": losses, "config_sha256": _config_sha256(cfg)})
                engine.gather(None)
                if lead:
                    replace_dir(new, resume_dir)
    engine.train(False)
    if not lead:
        engine.gather(None)  # rank 0 scores and writes
        return PretrainResult(out, {}, {}, model)
    scores = heldout_scores(model, cells, split, cfg.objective.mask_ratio, mask_value, cfg.data.heldout_seed)
    random_model = _build_network(cfg, cells.genes)
    scores.update(edge_scores(model, random_model, cells, split, cfg.objective.edge_cells, mask_value))
    if cells.edges is None:
        log.info("%s holds no simulator truth: edge_auroc is not computed", path)
    seconds = time.perf_counter() - t0
    _save_backbone(model.backbone, out, cells.genes)
    card = {
        "format": "pertadapt-pretrained/1",
        "backbone": config_to_dict(cfg)["backbone"],
        "objective": _objective_text(cfg, mask_value),
        "data": {"path": str(path), "sha256": node_sha256_file(path), "cells": cfg.data.cells,
                 "n_train": int(split.train.size), "n_heldout": int(split.heldout.size),
                 "heldout_frac": cfg.data.heldout_frac, "heldout_seed": cfg.data.heldout_seed},
        "genes": {"n": len(cells.genes), "sha256": sha256_bytes("\n".join(cells.genes)), "file": "genes.txt"},
        "steps": cfg.steps, "batch_size": cfg.optim.batch_size, "seed": cfg.seed, "seconds": seconds,
        "loss_curve": losses, "scores": scores, "config": config_to_dict(cfg),
        "provenance": provenance({}),
    }
    atomic_write_json(out / MODEL_CARD_JSON, card)
    atomic_write_text(out / MODEL_CARD_MD, _model_card_md(card))
    shutil.rmtree(resume_dir, ignore_errors=True)
    summary = summary_of(card)
    engine.gather(None)
    log.info("pretrained %s in %.1f s: held-out masked MSE %.4f vs mean predictor %.4f%s → %s", cfg.backbone.name,
             seconds, scores["heldout_masked_mse"], scores["mean_predictor_mse"],
             f", edge AUROC {scores['edge_auroc']:.3f} (random {scores['edge_auroc_random']:.3f})"
             if "edge_auroc" in scores else "", out)
    return PretrainResult(out, card, summary, model)


def summary_of(card: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` figures of a model card: ``backbone``, the held-out and edge scores, ``steps``, ``seconds``."""
    return {"backbone": card["backbone"]["name"], **card["scores"], "steps": card["steps"], "seconds": card["seconds"]}


def read_model_card(directory: Path) -> dict[str, Any] | None:
    """The model card of a pretrained checkpoint directory, or ``None`` when it has none.

    Raises
    ------
    CheckpointError
        When ``model_card.json`` exists but is not a JSON object.
    """
    path = Path(directory) / MODEL_CARD_JSON
    if not path.is_file():
        return None
    return read_json_object(path, "a pretrained checkpoint directory")


def pretrained_checkpoint(config: str | Path, data_file: Path, overrides: Sequence[str] = ()) -> Path:
    """The checkpoint of ``config``'s FM pretrained on ``data_file``: made once, then reused from the cache.

    The cache entry is ``cache_dir()/pretrained/<key>/`` with ``key`` the SHA-256 of the data file's hash, the
    pertadapt version and the resolved config (its ``data.path``, ``name`` and ``logging`` left out). Callers serialise on a file
    lock, so concurrent callers pretrain once; the entry is built in a temporary directory and renamed.

    Parameters
    ----------
    config
        A pretrain config (``pretrain_demo.yaml``).
    data_file
        The ``.h5ad`` to pretrain on (overrides the config's data).
    overrides
        Dotted overrides of the config.

    Returns
    -------
    Path
        The checkpoint directory (loads through ``backbone.checkpoint``; holds ``model_card.json``).
    """
    from pertadapt import __version__

    data_file = Path(data_file)
    cfg = load_pretrain_config(config, [*overrides, f"data.path={data_file}"])
    key = sha256_bytes(f"{node_sha256_file(data_file)}|{__version__}|{_config_sha256(cfg, data_path=False)}")
    root = cache_dir() / "pretrained"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with exclusive_lock(root / f"{key}.lock"):
        if read_model_card(final) is not None:
            log.info("reusing the pretrained %s checkpoint %s (data %s)", cfg.backbone.name, final, data_file)
            return final
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed caller (this key's builders hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        log.info("pretraining the %s FM of %s on %s (once; cached as %s)", cfg.backbone.name, config, data_file, final)
        if cfg.engine.name == "deepspeed":  # several workers: Ray Train (train.worker imports this module)
            from pertadapt.train.worker import launch_pretrain

            launch_pretrain(cfg, tmp)
        else:
            pretrain(cfg, tmp, data_file=data_file, progress=False)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final
