"""One run end to end on this process (and its peers, under DeepSpeed): the function every launcher calls.

``pertadapt train``, a Ray Train worker and a Tune trial all end up in :func:`run`, with a logger (W&B on
rank 0, or the null logger) and an optional ``report`` hook (Ray Train / Tune reporting). Baseline models
take the same path, minus the engine. :func:`open_run_logger` is the one place a run's logger is opened.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertadapt.baselines import fit_baseline
from pertadapt.config.load import config_hash, config_to_dict
from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.data.keys import CONTROL
from pertadapt.data.simulate import read_sim_truth
from pertadapt.data.summaries import write_predictions
from pertadapt.eval import Metrics, pairing_noise_mse_de, score_against_truth
from pertadapt.models.build import build_backbone_for, build_loss, build_model
from pertadapt.report.logger import NullLogger, RunLogger
from pertadapt.report.wandb import open_logger
from pertadapt.rundir import RunDir
from pertadapt.train.checkpoint import Checkpoints, DirCheckpoints
from pertadapt.train.embed_cache import prepare_embedding_cache
from pertadapt.train.engine import Engine, build_engine
from pertadapt.train.fm_weights import backbone_weights, local_checkpoint
from pertadapt.train.loop import score_gene_spaces, train
from pertadapt.train.setup import RunData, prepare_run_data, provenance
from pertadapt.train.timeline import mark

__all__ = ["FINISHED_KEY", "build_run_engine", "open_run_logger", "run", "seed_everything"]

log = logging.getLogger(__name__)
Report = Callable[[dict[str, float]], None]
#: Key of the last report of a run that finished (Tune fills its own ``done`` into every result).
FINISHED_KEY = "run_finished"


def seed_everything(seed: int) -> None:
    """Seed Python and torch (model initialisation varies with the run seed; NumPy uses explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def open_run_logger(cfg: RunConfig, run: RunDir, *, rank: int = 0, name: str | None = None) -> RunLogger:
    """The run's logger: a W&B run on rank 0 (``logging.wandb``), the null logger elsewhere or when disabled."""
    return open_logger(mode=cfg.logging.wandb, rank=rank, project=cfg.logging.project, group=cfg.logging.group,
                       name=name or cfg.name, directory=run.path, config=config_to_dict(cfg))


def build_run_engine(cfg: RunConfig, rd: RunData, *, cache_root: Path | None = None) -> tuple[Engine, dict[str, Any]]:
    """Seed, build the model (the frozen FM replaced by its embedding cache when on) and its engine.

    The backbone is built first, as :func:`build_model` always does, so the seeded initialisation of the
    other parts is the same with or without the cache; a cache build leaves the RNG state as it was.

    Parameters
    ----------
    cfg, rd
        The run config and its data.
    cache_root
        Folder of the embedding tables (default ``$PERTADAPT_CACHE/fm_embeddings``).

    Returns
    -------
    tuple
        The engine, and the cache's provenance record (:func:`prepare_embedding_cache`).
    """
    seed_everything(cfg.seed)
    backbone = build_backbone_for(local_checkpoint(cfg), rd.inputs)  # a checkpoint on a store: this node's copy
    table, cache_info = prepare_embedding_cache(cfg, rd.data, rd.hashes, rd.train.pool, backbone, root=cache_root)
    model = build_model(cfg, rd.inputs, backbone=backbone, embeddings=table)
    del backbone  # with the cache, nothing holds the frozen backbone any more
    return build_engine(model, cfg), cache_info


#: Set by the Ray Train worker (``train.worker``) so that a rank can say where it runs.
NODE_ID_ENV, NODE_IP_ENV = "PERTADAPT_RAY_NODE_ID", "PERTADAPT_RAY_NODE_IP"


def rank_placement(rank: int, device: object) -> dict[str, object]:
    """Where this rank runs: ``rank``, ``local_rank``, ``node_id``, ``node_ip``, ``hostname``, ``device``."""
    return {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "node_id": os.environ.get(NODE_ID_ENV, "local"),
            "node_ip": os.environ.get(NODE_IP_ENV, "127.0.0.1"), "hostname": socket.gethostname(),
            "device": str(device)}


def _write_run_files(cfg: RunConfig, run: RunDir, rd: RunData, ranks: list[dict[str, object]],
                     weights: dict[str, Any], embedding_cache: dict[str, Any] | None = None) -> None:
    run.write_config(config_to_dict(cfg))
    run.write_provenance(provenance({
        **rd.hashes, "data_path": str(rd.data_path), "config_hash": config_hash(cfg),
        "backbone_weights": weights, "embedding_cache": embedding_cache or {"used": False},
        "world_size": len(ranks), "ranks": ranks,
        "n_genes": len(rd.data.genes), "gene_space": cfg.model.gene_space,
        "n_perturbation_genes": len(rd.pert_vocab),
        "split": {"train": rd.split.train, "val": rd.split.val, "test": rd.split.test,
                  "subgroups": rd.split.subgroups, "seed": rd.split.seed}}))


def _run_baseline(cfg: RunConfig, rd: RunData) -> tuple[int, Metrics, Metrics, dict[str, np.ndarray]]:
    d = rd.data
    means = d.condition_means
    model = fit_baseline(cfg.model, {c: means[c] for c in rd.split.train}, d.ctrl_mean, gene_names=d.genes)
    scored = []
    for conds, es in ((rd.split.val, rd.val), (rd.split.test, rd.test)):
        # the models' control cells (eval.val_controls, eval.test_controls): no arm gains from control sampling
        shift = {c: m - d.ctrl_mean for c, m in es.cells.control_means().items()}
        pred = model.predict([c for c in conds if c != CONTROL], control_shift=shift)
        scored.append((score_gene_spaces(pred, d, rd.measured, subgroups=es.subgroups, reference=rd.split.train),
                       pred))
    (val, _), (test, preds) = scored
    return 0, val, test, preds


def _pairing_noise(rd: RunData) -> dict[str, float]:
    """``val_pairing_noise_mse_de`` and ``test_pairing_noise_mse_de``: what the drawn evaluation controls add to
    ``mse_de`` (:func:`~pertadapt.eval.pairing_noise_mse_de`; 0 with the whole pool)."""
    return {f"{name}_pairing_noise_mse_de": pairing_noise_mse_de(es.cells.control_means(), rd.data.ctrl_mean,
                                                                 rd.data.de_idx)
            for name, es in (("val", rd.val), ("test", rd.test))}


def _per_condition_csv(test: Metrics, truth: Metrics | None, subgroups: dict[str, list[str]]) -> str:
    """One row per test condition: ``condition, subgroup`` and every metric (``truth_*`` on simulated data)."""
    group_of = {c: g for g, members in subgroups.items() for c in members}
    rows = []
    for cond, values in sorted(test.per_perturbation.items()):
        row: dict[str, Any] = {"condition": cond, "subgroup": group_of.get(cond, ""), **values}
        if truth is not None:
            row.update({f"truth_{k}": v for k, v in truth.per_perturbation[cond].items()})
        rows.append(row)
    cols = ["condition", "subgroup", *sorted({k for r in rows for k in r} - {"condition", "subgroup"})]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run(cfg: RunConfig, run_dir: RunDir | Path, *, logger: RunLogger | None = None, report: Report | None = None,
        resume: bool = False, checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """Train (or fit a baseline), test the best epoch, write the run directory, return final metrics.

    Parameters
    ----------
    cfg
        The validated run config.
    run_dir
        The self-describing run directory (a path: a :class:`~pertadapt.rundir.RunDir` there): the resolved
        config, its provenance (git SHA, versions, data, gene-order and GO-mask hashes, config hash, world
        size, whether the frozen-FM embedding cache was used and its key and path), the epoch history, the
        final metrics, the per-condition metrics, the test predictions, the checkpoints and the measured CPU
        time (``cost.json``: every rank's process CPU time from this call's start to the end of evaluation,
        summed; rank 0's up to its last file; a baseline's fit and evaluation).
    logger
        Where epoch rows and the final summary go (rank 0's W&B run; the null logger by default).
    report
        Called on every rank with each epoch's row and, last, the final metrics with ``run_finished = 1``
        (Ray Train / Tune reporting).
    resume
        Continue from the run directory's last checkpoint (refused with a :class:`ConfigError` when there is
        none).
    checkpoints
        Where checkpoints go (Ray Train storage on Ray Train workers); default the run directory's.

    Returns
    -------
    dict
        Final val/test metrics (flat names such as ``test_mse_de``) and ``best_epoch``.
    """
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    logger = logger or NullLogger()
    hook = report or (lambda m: None)
    rdir = RunDir.at(run_dir)

    def on_epoch(row: dict[str, float]) -> None:
        logger.log(row, step=int(row["epoch"]))
        log.info("epoch %d  train_loss %.4g  %s %.4g", row["epoch"], row["train_loss"], cfg.eval.select_metric,
                 row[cfg.eval.select_metric])
        hook(row)

    seed_everything(cfg.seed)
    weights = backbone_weights(cfg)  # a checkpoint whose weights changed since its digest was taken stops here
    try:
        rd = prepare_run_data(cfg)
    except ConfigError as e:  # e.g. a data path this node cannot see: say which node
        where = rank_placement(0, "cpu")
        raise ConfigError(f"{e} (on {where['hostname']}, Ray node {where['node_ip']} {where['node_id']})") from e
    if cfg.is_baseline:
        mark(rdir, "data_ready")
        mark(rdir, "model_ready")
        best_epoch, val, test, preds = _run_baseline(cfg, rd)
        mark(rdir, "train_end")
        rank, ranks, peers_cpu_s = 0, [rank_placement(0, "cpu")], [0.0]
    else:
        data_ready = time.time()
        engine, cache_info = build_run_engine(cfg, rd)
        rank = engine.rank
        ranks = engine.gather(rank_placement(rank, engine.device))
        store = checkpoints or DirCheckpoints(rdir, resume=resume)
        resumed = store.restore(engine)  # validated and loaded before anything in run_dir is written
        if rank == 0:
            _write_run_files(cfg, rdir, rd, ranks, weights, cache_info)
            mark(rdir, "data_ready", at=data_ready)
            mark(rdir, "model_ready")
        result = train(cfg, engine, rd.train, rd.val, rd.test, build_loss(cfg, rd.inputs), rdir, on_epoch,
                       checkpoints=store, resumed=resumed)
        best_epoch, val, test, preds = result.best_epoch, result.val, result.test, result.test_predictions
        peers_cpu_s = engine.gather(time.process_time() - cpu_start)  # every rank's, rank 0's counted at the end
    metrics: dict[str, Any] = {"best_epoch": best_epoch, **val.flat("val"), **test.flat("test"),
                               **_pairing_noise(rd)}
    if rank == 0:
        mark(rdir, "eval_end")
        scored = rd.data if rd.measured is None else rd.measured  # truth on the measured genes
        sim = read_sim_truth(rd.data_path, scored.genes)
        on_scored = preds if rd.measured is None else {c: p[rd.measured.columns] for c, p in preds.items()}
        truth = score_against_truth(on_scored, sim) if sim is not None else None
        if truth is not None:  # simulated data: distance to the noise-free truth, not only to noisy means
            metrics.update({f"test_truth_{k}": v for k, v in truth.overall.items()})
        if cfg.is_baseline:
            _write_run_files(cfg, rdir, rd, ranks, weights)
        conds = sorted(preds)
        write_predictions(rdir.predictions_file, conds, np.stack([preds[c] for c in conds]), list(rd.data.genes))
        rdir.write_per_condition(_per_condition_csv(test, truth, rd.split.subgroups))
        rdir.write_cost(cpu_s=sum(peers_cpu_s[1:]) + time.process_time() - cpu_start, processes=len(peers_cpu_s),
                        wall_s=time.perf_counter() - wall_start)
        rdir.write_final_metrics(metrics)
    logger.finish(metrics)
    if rank == 0:
        mark(rdir, "run_end")
    hook({**metrics, FINISHED_KEY: 1})
    return metrics
