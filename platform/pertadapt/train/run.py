"""One run end to end on this process (and its peers, under DeepSpeed): the function every launcher calls.

``pertadapt train`` calls it directly (torch engine) or through Ray Train workers; a Tune trial
calls it through :mod:`pertadapt.train.worker`. Baseline models take the same path, minus the engine.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pertadapt.baselines import fit_baseline
from pertadapt.config.load import config_to_dict
from pertadapt.config.schema import RunConfig
from pertadapt.data.simulate import score_file_against_truth
from pertadapt.data.summaries import write_predictions
from pertadapt.eval import compute_metrics
from pertadapt.models.build import build_loss, build_model
from pertadapt.train.engine import build_engine
from pertadapt.train.loop import train
from pertadapt.train.setup import RunData, prepare_run_data, provenance, write_json

__all__ = ["run", "seed_everything"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]


def seed_everything(seed: int) -> None:
    """Seed Python and torch (model initialisation varies with the run seed; NumPy uses explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _write_run_files(cfg: RunConfig, run_dir: Path, rd: RunData, world_size: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    write_json(run_dir / "provenance.json", provenance({
        **rd.hashes, "world_size": world_size, "n_genes": len(rd.data.genes), "n_perturbation_genes":
        len(rd.pert_vocab), "split": {"train": rd.split.train, "val": rd.split.val, "test": rd.split.test,
                                      "subgroups": rd.split.subgroups, "seed": rd.split.seed}}))


def _run_baseline(cfg: RunConfig, rd: RunData) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    d = rd.data
    train_means = {c: d.mean_expression(d.cells_of([c])) for c in rd.split.train}
    ctrl = rd.test.ctrl_mean
    model = fit_baseline(cfg.model.name, train_means, ctrl, linear_k=cfg.model.linear_k,
                         linear_ridge=cfg.model.linear_ridge, gene_names=d.genes)
    out: dict[str, float] = {}
    preds: dict[str, np.ndarray] = {}
    for prefix, conds, groups in (("val", rd.split.val, rd.split.val_subgroups),
                                  ("test", rd.split.test, rd.split.subgroups)):
        conds = [c for c in conds if c != "ctrl"]
        pred = model.predict(conds)
        truth = {c: d.mean_expression(d.cells_of([c])) for c in conds}
        out.update(compute_metrics(pred, truth, ctrl, {c: d.de_idx[c] for c in conds}, subgroups=groups).flat(prefix))
        preds = pred
    return out, preds


def run(cfg: RunConfig, run_dir: Path, *, report: Report = lambda m: None, resume: bool = False) -> dict[str, Any]:
    """Train (or fit a baseline), test the best epoch, write the run directory, return final metrics.

    Parameters
    ----------
    cfg
        The validated run config.
    run_dir
        Self-describing output directory: ``config.yaml``, ``provenance.json`` (git SHA, versions, data,
        gene-order and GO-mask hashes, world size), ``metrics.jsonl``, ``final_metrics.json``,
        ``test_predictions.h5ad``, ``ckpt/``.
    report
        Called on every rank with each epoch's metrics.
    resume
        Continue from ``run_dir/ckpt/last``.

    Returns
    -------
    dict
        Final val/test metrics (flat names such as ``test_mse_de``) and ``best_epoch``.
    """
    seed_everything(cfg.seed)
    rd = prepare_run_data(cfg)
    if cfg.model.name != "pertadapt":
        metrics, preds = _run_baseline(cfg, rd)
        rank, world = 0, 1
    else:
        seed_everything(cfg.seed)
        model = build_model(cfg, rd.inputs)
        engine = build_engine(model, cfg)
        rank, world = engine.rank, engine.world_size
        if rank == 0:
            _write_run_files(cfg, run_dir, rd, world)
        result = train(cfg, engine, rd.train, rd.val, rd.test, build_loss(cfg, rd.inputs), run_dir, report,
                       resume=resume)
        metrics, preds = result["metrics"], result["test_predictions"]
    if rank == 0:
        truth = score_file_against_truth(rd.data_path, preds)
        if truth is not None:  # simulated data: distance to the noise-free truth, not only to noisy means
            metrics.update({f"test_truth_{k}": v for k, v in truth.items()})
        if cfg.model.name != "pertadapt":
            _write_run_files(cfg, run_dir, rd, world)
        conds = sorted(preds)
        write_predictions(run_dir / "test_predictions.h5ad", conds, np.stack([preds[c] for c in conds]),
                          list(rd.data.genes))
        write_json(run_dir / "final_metrics.json", metrics)
    return metrics
