"""Everything a run needs, built from its config: data, split, GO structures, datasets, provenance.

This is where the data and GO layers meet the models: arrays go in, no model sees a path.
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.data.coexpression import training_coexpression
from pertadapt.data.conditions import condition_genes
from pertadapt.data.dataset import PairedCells, PerturbData, draw_control_pool, read_perturb_data
from pertadapt.data.presets import data_file_for
from pertadapt.data.splits import ConditionSplit, split_conditions
from pertadapt.files import node_sha256_file, sha256_bytes
from pertadapt.models.build import ModelInputs
from pertadapt.train.loop import EvalSet

__all__ = ["RunData", "ensure_data_file", "gene_order_sha256", "model_data", "prepare_run_data", "provenance"]

log = logging.getLogger(__name__)


def ensure_data_file(cfg: RunConfig) -> Path:
    """The run's ``.h5ad``: ``data.path``, or the simulator preset generated once into the cache.

    Simulating runs numba's parallel kernels (through scanpy), whose OpenMP layer sets the process-wide
    thread count, which torch shares, to every core: torch's count is put back, so a run that simulated its
    data trains and evaluates on the same number of threads, with the same float reductions and therefore
    the same metrics, as a run that found the file made.
    """
    out, to_simulate = data_file_for(cfg)
    if to_simulate:
        from pertadapt.data.io import write_h5ad_atomic
        from pertadapt.data.simulate import simulate

        log.info("simulating preset %r (seed %d) → %s", cfg.data.simulate_preset, cfg.data.simulate_seed, out)
        threads = torch.get_num_threads()
        try:
            write_h5ad_atomic(simulate(cfg.data.simulate_preset, seed=cfg.data.simulate_seed), out)
        finally:
            torch.set_num_threads(threads)
    return out


@dataclass(frozen=True)
class RunData:
    """Data-derived inputs of one run.

    Attributes
    ----------
    data
        Arrays of the prepared dataset over the model genes (``model.gene_space``: its measured genes, or
        every gene of the file).
    split
        Condition split.
    pert_vocab
        The perturbation encoder's vocabulary P (sorted, ``go.pert_graph_genes``): the targets with GO
        annotations (conditions of the others were dropped) and, with ``all``, every other annotated gene.
    inputs
        Arrays for the model builder (genes, GO graph, GO mask, control mean and, for the FM-baseline
        decoder, the co-expression graph).
    train, val, test
        Paired cells of each split.
    hashes
        ``data_sha256``, ``gene_order_sha256`` (of the model genes: it keys the embedding cache on the gene
        space), ``go_mask_sha256``, ``go_source`` and
        ``coexpress_sha256`` (``none`` unless the FM-baseline decoder is used).
    data_path
        The ``.h5ad`` the data came from.
    measured
        The view of ``data`` over its measured genes, where the model genes also hold zero-filled ones
        (``vocabulary`` space); ``None`` when ``data`` is already over the measured genes only.
    """

    data: PerturbData
    split: ConditionSplit
    pert_vocab: tuple[str, ...]
    inputs: ModelInputs
    train: PairedCells
    val: EvalSet
    test: EvalSet
    hashes: dict[str, str]
    data_path: Path
    measured: PerturbData | None = None


def gene_order_sha256(genes: tuple[str, ...]) -> str:
    """SHA-256 of the model genes' order (``gene_order_sha256`` of a run's hashes)."""
    return sha256_bytes("\n".join(genes))


def model_data(cfg: RunConfig) -> tuple[Path, PerturbData, PerturbData, PerturbData]:
    """The run's data file and its arrays: ``(path, full, measured, data)``: every gene of the file, its
    measured genes, and the model genes (``model.gene_space``: one of the two)."""
    path = ensure_data_file(cfg)
    full = read_perturb_data(path, n_de=cfg.data.n_de, backed=cfg.data.backed)
    measured = full.measured_only()
    return path, full, measured, measured if cfg.model.gene_space == "measured" else full


def _mask_arrays(cfg: RunConfig, ann, genes: tuple[str, ...]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    from pertadapt.go import cached_go_mask

    if not cfg.adapter.enabled or cfg.adapter.attention_mask == "none":
        return None, None, "none"
    mask = cached_go_mask(ann, genes, threshold=cfg.go.mask_threshold, kind=cfg.adapter.attention_mask,
                         seed=cfg.seed)
    csr = mask.csr
    return csr.indptr.astype(np.int64), csr.indices.astype(np.int64), mask.sha256


def prepare_run_data(cfg: RunConfig) -> RunData:
    """Load the data, split its conditions, build the GO graph and mask (and, for the FM-baseline decoder,
    the training cells' co-expression graph), and pair the cells."""
    from pertadapt.go import cached_gene_graph, has_go, load_annotations, perturbation_vocabulary

    path, full, measured, data = model_data(cfg)
    log.info("model.gene_space=%s: %d model genes (%d measured of the file's %d)", cfg.model.gene_space,
             len(data.genes), len(measured.genes), len(full.genes))
    ann = load_annotations(cfg.go.source, obo=cfg.go.obo, gaf=cfg.go.gaf, aspects=tuple(cfg.go.aspects),
                           propagate=cfg.go.propagate)
    targets = sorted({g for c in data.conditions for g in condition_genes(c)})
    missing = [g for g, ok in zip(targets, has_go(ann, targets), strict=True) if not ok]
    if missing:
        if cfg.data.missing_go == "fail":
            raise ConfigError(f"data.missing_go=fail: perturbation targets without GO annotation: {missing} "
                              "(set data.missing_go=drop to drop their conditions)")
        log.warning("dropping conditions of %d targets without GO annotation: %s", len(missing), missing[:10])
    keep = [c for c in data.conditions if not set(condition_genes(c)) & set(missing)]
    split = split_conditions(keep, cfg.data.split, seed=cfg.split_seed,
                             train_gene_frac=cfg.data.train_gene_frac,
                             combo_seen2_train_frac=cfg.data.combo_seen2_train_frac)
    pert_vocab = perturbation_vocabulary(ann, [g for g in targets if g not in set(missing)], cfg.go.pert_graph_genes)
    graph = cached_gene_graph(ann, pert_vocab, threshold=cfg.go.graph_threshold, top_k=cfg.go.graph_top_k)
    indptr, indices, mask_hash = _mask_arrays(cfg, ann, data.genes)
    data_hash = node_sha256_file(path)  # once per node, not once per rank and trial
    coexpress, coexpress_hash = (None, None, None), "none"
    if cfg.uses_fm_decoder:
        co = training_coexpression(data, split.train, data_sha256=data_hash, top_k=cfg.model.coexpress_top_k,
                                   threshold=cfg.model.coexpress_threshold)
        coexpress, coexpress_hash = (co.src, co.dst, co.weight), co.sha256
    subset = data.columns is not None
    inputs = ModelInputs(data.genes, len(pert_vocab), graph.src, graph.dst, graph.weight, indptr, indices,
                         data.ctrl_mean.astype(np.float32), *coexpress, input_genes=full.genes if subset else None,
                         gene_idx=data.columns if subset else None)
    also_measured = None if measured is data else measured  # vocabulary space with zero-filled genes
    seed = cfg.seed
    pool = draw_control_pool(data, cfg.data.control_pool, cfg.data.control_pool_seed)  # one pool for all splits
    train = PairedCells(data, split.train, pert_vocab, seed=seed, n_de=cfg.data.n_de, pool=pool)
    ev = cfg.eval  # the evaluation subsets: seeded by eval.controls_seed, not the run seed
    val = EvalSet(PairedCells.for_evaluation(data, split.val, pert_vocab, seed=seed + 1, n_de=cfg.data.n_de,
                                             controls=ev.val_controls, controls_seed=ev.controls_seed, pool=pool),
                  split.val_subgroups, split.train, also_measured)
    test = EvalSet(PairedCells.for_evaluation(data, split.test, pert_vocab, seed=seed + 2, n_de=cfg.data.n_de,
                                              controls=ev.test_controls, controls_seed=ev.controls_seed, pool=pool),
                   split.subgroups, split.train, also_measured)
    hashes = {"data_sha256": data_hash, "gene_order_sha256": gene_order_sha256(data.genes),
              "go_mask_sha256": mask_hash, "go_source": ann.source, "coexpress_sha256": coexpress_hash}
    return RunData(data, split, pert_vocab, inputs, train, val, test, hashes, path, also_measured)


def _git_sha() -> str:
    try:  # the checkout this package runs from (an installed wheel has none: "unknown")
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(extra: dict[str, object]) -> dict[str, object]:
    """Git SHA, package versions and the given hashes, for the run directory's provenance."""
    pkgs = {}
    for name in ("pertadapt", "torch", "deepspeed", "ray", "optuna", "wandb", "anndata", "scanpy", "numpy"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = None
    return {"git_sha": _git_sha(), "packages": pkgs, **extra}
