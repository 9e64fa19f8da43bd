"""What one trial costs before it runs: FLOPs, memory per worker, frozen-FM cache bytes and GPU-hours.

The model's own modules are built on the ``meta`` device (no memory, no compute) at the data's real
dimensions (read from the ``.h5ad`` header, :func:`pertadapt.data.header.read_header`) and run once on a
micro-batch:

* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: forward + backward of one training
  micro-batch (the recompute of checkpointed blocks included), a forward without gradients for
  evaluation, and the frozen FM's forward for building the embedding cache.
* Saved activations are the bytes autograd keeps for the backward pass, seen by
  ``torch.autograd.graph.saved_tensors_hooks``; a checkpointed block's inner tensors are hidden from
  those hooks by the checkpoint itself, which keeps only the block's input: that input is added per
  block (:func:`checkpointed_input_bytes`).
* Peak memory per worker = parameters + gradients + Adam's two moments (float32) + saved activations of
  one micro-batch + the GO mask (CSR indices at :data:`GO_MASK_DENSITY`, plus the boolean mask rows the
  chunked attention keeps, ``N²`` bytes). The plan assumes the GPU's attention path (``chunked``: dense
  scores, masked), whose FLOPs do not depend on the mask; the model is therefore traced without it.
* GPU-hours = (training + evaluation + cache-build FLOPs) / a stated throughput.

The ``naive`` path is the reference's: the FM recomputed every step (no cache), the vocabulary gene space,
whole-pool evaluation and the chunked attention.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from pertadapt.config.components import CheckpointedBackbone, FoundationModelBackbone, PretrainedBackbone
from pertadapt.config.schema import RunConfig
from pertadapt.data.conditions import condition_genes, is_control
from pertadapt.data.header import DataHeader
from pertadapt.data.splits import split_conditions
from pertadapt.models.backbones.layers import LayerStack
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.models.backbones.scfoundation import SCFoundation
from pertadapt.models.build import ModelInputs, build_backbone_for, build_model
from pertadapt.models.pertadapt_model import PertAdaptModel
from pertadapt.train.embed_cache import cache_bytes
from pertadapt.types import Batch

__all__ = ["DEFAULT_TFLOPS", "GO_MASK_DENSITY", "TrialCost", "checkpointed_input_bytes",
           "eval_controls", "model_step", "saved_bytes", "trained_cells", "trial_cost"]

#: Default throughput of the GPU-hour estimate: float32 (the engine's default precision) on one H100.
DEFAULT_TFLOPS = 30.0
#: GO attention-mask density assumed for its bytes (measured ≈ 8 % at 19,264 genes).
GO_MASK_DENSITY = 0.08
_GB = 1e9
_ADAM_STATES = 2


@dataclass(frozen=True)
class TrialCost:
    """The cost of one trial.

    Attributes
    ----------
    train_tflop
        Forward + backward of every cell each epoch trains on (:func:`trained_cells`), every epoch.
    eval_tflop
        Evaluation forwards: the validation set each epoch and at the end, and the test set once.
    cache_tflop
        Building the frozen-FM embedding cache (the FM's forward of every pool cell, once).
    cache_gb
        GB of that cache (pool × genes × FM width × dtype bytes); 0 without a cache.
    peak_gb_per_worker
        Parameters, gradients, Adam states, saved activations of a micro-batch and the GO mask.
    gpu_hours
        All the FLOPs above at the stated throughput.
    cache_bytes
        ``cache_gb`` exactly (:func:`pertadapt.train.embed_cache.cache_bytes`, as the build sizes it).
    """

    train_tflop: float
    eval_tflop: float
    cache_tflop: float
    cache_gb: float
    peak_gb_per_worker: float
    gpu_hours: float
    cache_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        """JSON-able, the floats rounded to 4 significant digits."""
        return {k: v if isinstance(v, int) else float(f"{v:.4g}") for k, v in dataclasses.asdict(self).items()}


def eval_controls(cfg: RunConfig, pool: int) -> tuple[int, int]:
    """Control cells each validation and each test condition is predicted from: ``eval.val_controls`` and
    ``eval.test_controls`` (``None``: the whole pool), at most the pool."""
    return tuple(pool if k is None else min(k, pool) for k in (cfg.eval.val_controls, cfg.eval.test_controls))


def trained_cells(cfg: RunConfig, n: int) -> int:
    """Cells one epoch trains on out of ``n`` training cells: whole steps of ``optim.batch_size`` (the loop drops
    a last partial step), at most ``optim.max_steps_per_epoch`` of them."""
    o = cfg.optim
    steps = n // o.batch_size
    return o.batch_size * (steps if o.max_steps_per_epoch is None else min(steps, o.max_steps_per_epoch))


def naive_config(cfg: RunConfig) -> RunConfig:
    """The reference's path for ``cfg``: FM recomputed every step, whole-pool evaluation, chunked attention."""
    b = cfg.backbone
    if isinstance(b, FoundationModelBackbone):
        b = dataclasses.replace(b, embedding_cache="off")
    return dataclasses.replace(cfg, backbone=b, eval=dataclasses.replace(cfg.eval, val_controls=None,
                                                                              test_controls=None),
                               adapter=dataclasses.replace(cfg.adapter, attention_impl="chunked"))


class _FMOverGenes(nn.Module):
    """An FM over its vocabulary whose output is restricted to the model's first ``n`` genes (the measured
    genes; a slice and a zero pad cost no FLOPs)."""

    def __init__(self, fm: nn.Module, n_vocab: int, n: int) -> None:
        super().__init__()
        self.fm, self.n_vocab, self.n = fm, n_vocab, n
        self.hidden_size, self.genes = fm.hidden_size, None

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x_ctrl, (0, self.n_vocab - self.n))
        return self.fm.encode(x, total_count)[:, :self.n]

    def transformer_layers(self) -> list[nn.Module]:
        return self.fm.transformer_layers()


def _fixed_nonzeros(fm: nn.Module, m: int) -> None:
    """Make scFoundation's encoder see ``m`` non-zero tokens per cell on any input (its own choice reads the
    values, which meta tensors do not have)."""
    if isinstance(fm, SCFoundation):
        fm.nonzero_tokens = lambda seq: (torch.zeros(seq.shape[0], m, dtype=torch.long, device=seq.device),
                                         torch.ones(seq.shape[0], m, dtype=torch.bool, device=seq.device))


class _CacheLookup(nn.Module):
    """The embedding cache's lookup: ``(B, N, D)`` rows, no FLOPs, no parameters."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size, self.genes = hidden_size, None

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        return x_ctrl.new_empty(*x_ctrl.shape, self.hidden_size)


class _PerturbationOutput(nn.Module):
    """Stands in for the perturbation encoder in the traced model: its ``(B, d)`` output as a leaf that needs
    a gradient (as the encoder's output does). The encoder itself is traced apart, on real tensors on the
    CPU (:func:`_perturbation_step`), since its graph look-ups depend on the indices' values."""

    def __init__(self, b: int, d: int) -> None:
        super().__init__()
        self.out = nn.Parameter(torch.zeros(b, d))

    def forward(self, pert_idx: torch.Tensor) -> torch.Tensor:
        return self.out


def _graph(n: int, per_node: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_node`` edges into every node of an ``n``-node graph (the GO and co-expression graphs' top-k)."""
    e = n * per_node
    return (np.arange(e, dtype=np.int64) % n, np.repeat(np.arange(n, dtype=np.int64), per_node),
            np.ones(e, np.float32))


def _inputs(cfg: RunConfig, n_genes: int, n_perts: int) -> ModelInputs:
    return ModelInputs(tuple(f"g{i}" for i in range(n_genes)), n_perts, *_graph(n_perts, cfg.go.graph_top_k),
                       None, None, np.zeros(n_genes, np.float32), *_graph(n_genes, cfg.model.coexpress_top_k))


def _batch(b: int, n: int, n_perts: int, device: torch.device) -> Batch:
    f = torch.zeros(b, n, device=device)
    long2 = torch.zeros(b, 2, dtype=torch.long, device=device)
    return Batch(x_ctrl=f, total_count=torch.full((b,), 1e4, device=device), y=f,
                 pert_idx=(torch.arange(2 * b) % n_perts).view(b, 2), pert_gene_pos=long2 - 1, cond_id=torch.zeros(b, dtype=torch.long, device=device),
                 is_ctrl=torch.zeros(b, dtype=torch.bool, device=device),
                 de_idx=torch.zeros(b, 20, dtype=torch.long, device=device),
                 nz_mask=torch.ones(b, n, dtype=torch.bool, device=device), ctrl_idx=None)


def model_step(cfg: RunConfig, n_genes: int, n_perts: int, *, cached: bool, device: str | torch.device = "meta",
               nonzeros: int | None = None, seed: int = 0) -> tuple[nn.Module, nn.Module, Batch]:
    """The trial's model (as :func:`~pertadapt.models.build.build_model` makes it) and a zero micro-batch.

    Parameters
    ----------
    cfg
        The trial's config; built without the attention mask (see the module docstring).
    n_genes
        ``N`` genes of the model (a pretrained FM still reads its whole vocabulary).
    n_perts
        Perturbation vocabulary size.
    cached
        Replace the frozen FM by the cache's lookup.
    nonzeros
        Non-zero values per cell that scFoundation's encoder sees (default ``n_genes``: every model gene).
    device
        ``meta`` for the plan, ``cpu`` for a real run of the same modules.

    Returns
    -------
    tuple
        The model on ``device`` with its perturbation encoder replaced by :class:`_PerturbationOutput`,
        that encoder (on the CPU) and a ``(optim.micro_batch_size, N)`` zero batch (``pert_idx`` all
        distinct double perturbations: the encoder's largest cost).
    """
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, attention_mask="none"))
    bcfg = cfg.backbone
    if isinstance(bcfg, CheckpointedBackbone):  # its sizes, random weights: a checkpoint is never read (nor
        cfg = dataclasses.replace(cfg, backbone=bcfg.with_random_weights())  # pretrained) for a plan
    inputs = _inputs(cfg, n_genes, n_perts)
    torch.manual_seed(seed)
    with torch.device(device):
        if isinstance(bcfg, PretrainedBackbone):
            fm = build_backbone(cfg.backbone, genes=None, width=cfg.model.hidden_size)
        else:
            fm = build_backbone_for(cfg, inputs)
    _fixed_nonzeros(fm, n_genes if nonzeros is None else nonzeros)
    backbone = _CacheLookup(fm.hidden_size) if cached else fm
    if not cached and isinstance(bcfg, PretrainedBackbone) and len(fm.genes) != n_genes:
        backbone = _FMOverGenes(fm, len(fm.genes), n_genes)
    # the rest is small and its graph set-up reads its edge arrays: built on the CPU, then moved
    model = build_model(cfg, inputs, backbone=backbone)
    b = cfg.optim.micro_batch_size
    perturbation, model.perturbation = model.perturbation, _PerturbationOutput(b, cfg.model.hidden_size)
    return model.to(device), perturbation, _batch(b, n_genes, n_perts, torch.device(device))


@contextmanager
def _saved_bytes_counter() -> Iterator[list[int]]:
    """Bytes of the distinct storages autograd saves inside the block (parameters excluded: counted apart)."""
    total = [0]
    seen: set[int] = set()
    params: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if isinstance(t, nn.Parameter):
            params.add(key)
        if key in seen or key in params:
            return t
        seen.add(key)
        total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def checkpointed_input_bytes(model: nn.Module) -> list[int]:
    """Register hooks that add up the inputs of checkpointed blocks (what the checkpoint keeps of each).

    Returns the list whose single element grows during the next forward; remove nothing: the hooks hold
    only this counter and the model is a throw-away plan model.
    """
    total = [0]
    for stack in model.modules():
        if isinstance(stack, LayerStack) and stack.checkpointing:
            for m in stack.children():
                for layer in (m if isinstance(m, nn.ModuleList) else [m]):
                    layer.register_forward_pre_hook(
                        lambda _m, args: total.__setitem__(0, total[0] + args[0].numel() * args[0].element_size())
                        if torch.is_grad_enabled() and args and args[0].requires_grad else None)
    return total


class _FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on ``meta`` tensors as a GPU runs it: the fused memory-efficient
    kernel, which keeps its output and log-sum-exp for the backward pass, not the ``L × L`` probabilities
    (on ``meta`` tensors PyTorch would take its math path). Used for the saved-activation bytes of a
    forward; other calls pass through.

    It also adds up the one thing that kernel computes beyond the math path's FLOPs (which
    :func:`step_flops` counts): its backward recomputes the scores, ``2·B·h·Lq·Lk·d`` FLOPs per call that
    needs a gradient (:attr:`recompute_flops`, torch's ``sdpa_backward_flop_count`` minus the math path's
    four matrix products).

    Calls made inside another overridable function are not seen (a mode is off within its handler): the
    ``tiny`` backbone's ``nn.MultiheadAttention`` stays on the math path and its probabilities are counted
    as saved, an over-estimate for that demo backbone only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recompute_flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if grad:
            self.recompute_flops += 2 * math.prod(q.shape) * k.shape[-2]
        if q.device.type != "meta":
            return func(*args, **kwargs)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        bias = None if mask is None else torch.zeros((), dtype=q.dtype, device=q.device).expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, grad)[0]


@contextmanager
def _data_independent() -> Iterator[None]:
    """On ``meta`` tensors a data-dependent op (``nonzero``, boolean indexing) assumes every element selected."""
    with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _call(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run the traced model, or the perturbation encoder traced apart."""
    return model(batch) if isinstance(model, PertAdaptModel) else model(batch.pert_idx)


def saved_bytes(model: nn.Module, batch: Batch) -> tuple[int, int]:
    """What one training forward of ``model`` (a :class:`PertAdaptModel`, or its perturbation encoder) on
    ``batch`` keeps for the backward pass.

    Returns
    -------
    tuple of int
        Saved bytes (attention as the fused kernel), and the FLOPs that kernel's backward adds to the math
        path's (:class:`_FusedAttention`).
    """
    model.train()
    extra = checkpointed_input_bytes(model)
    with torch.enable_grad(), _saved_bytes_counter() as total, _data_independent(), _FusedAttention() as attention:
        _call(model, batch)
    return total[0] + extra[0], attention.recompute_flops


def step_flops(model: nn.Module, batch: Batch, *, train: bool) -> int:
    """FLOPs counted by ``FlopCounterMode`` for one micro-batch: forward + backward (``train``) or a forward
    without gradients; attention on its math path (two matrix products forward, four backward)."""
    counter = FlopCounterMode(display=False)
    model.train(train)
    with counter, torch.set_grad_enabled(train), _data_independent():
        out = _call(model, batch)
        if train and out.requires_grad:
            out.sum().backward()
    return counter.get_total_flops()


def _fm_cache_flops(cfg: RunConfig, n_genes: int, n_perts: int, nonzeros: int) -> tuple[int, int]:
    """``(FLOPs per cell of the frozen FM's forward, FM width)``: what building its cache costs."""
    model, _, batch = model_step(cfg, n_genes, n_perts, cached=False, nonzeros=nonzeros)
    fm = model.backbone
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), _data_independent():
        fm.encode(batch.x_ctrl, batch.total_count)
    return counter.get_total_flops() // batch.x_ctrl.shape[0], fm.hidden_size


@dataclass(frozen=True)
class _StepCost:
    train_flops_per_cell: float
    eval_flops_per_cell: float
    fm_flops_per_cell: float
    fm_width: int
    param_bytes: int
    trainable_bytes: int
    saved_bytes: int


#: Traces already made in this process, by the sections a trace reads: trials that differ elsewhere (seed,
#: loss, learning rate) share one.
_STEPS: dict[tuple[str, int, int, int, bool], _StepCost] = {}


def _step_cost(cfg: RunConfig, n: int, n_perts: int, nonzeros: int, cached: bool) -> _StepCost:
    """Trace one micro-batch of ``cfg``'s model (forward + backward, forward alone, and the FM's forward for
    its cache) at ``n`` genes."""
    key = (repr((cfg.backbone, cfg.adapter, cfg.model, cfg.optim.micro_batch_size, cfg.go.graph_top_k)), n, n_perts,
           nonzeros, cached)
    if key in _STEPS:
        return _STEPS[key]
    fm_flops, fm_width = 0, 0
    if cached:
        fm_flops, fm_width = _fm_cache_flops(cfg, n, n_perts, nonzeros)
    model, perturbation, batch = model_step(cfg, n, n_perts, cached=cached, nonzeros=nonzeros)
    b = batch.x_ctrl.shape[0]
    parts = (model, perturbation)
    saved = [saved_bytes(m, batch) for m in parts]
    train = sum(step_flops(m, batch, train=True) for m in parts) + sum(r for _, r in saved)
    step = _StepCost(train / b, sum(step_flops(m, batch, train=False) for m in parts) / b, fm_flops, fm_width,
                     sum(p.numel() * p.element_size() for m in parts for p in m.parameters()),
                     sum(p.numel() * p.element_size() for m in parts for p in m.parameters() if p.requires_grad),
                     sum(a for a, _ in saved))
    _STEPS[key] = step
    return step


def trial_cost(cfg: RunConfig, header: DataHeader, *, tflops: float = DEFAULT_TFLOPS,
               naive: bool = False) -> TrialCost:
    """Plan one trial's cost at the data's real dimensions.

    Parameters
    ----------
    cfg
        The trial's config (a PertAdapt model; baselines cost nothing here).
    header
        The dataset's dimensions.
    tflops
        Sustained TFLOP/s of one GPU for the GPU-hour estimate.
    naive
        Plan the reference's path (:func:`naive_config`, vocabulary gene space).
    """
    if cfg.is_baseline:
        return TrialCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if naive:
        cfg = naive_config(cfg)
    n = header.n_genes if naive else header.n_measured
    conditions = list(header.cells_per_condition)
    n_perts = len({g for c in conditions for g in condition_genes(c)})
    split = split_conditions(conditions, cfg.data.split, seed=cfg.split_seed,
                             train_gene_frac=cfg.data.train_gene_frac,
                             combo_seen2_train_frac=cfg.data.combo_seen2_train_frac)
    train_cells = trained_cells(cfg, sum(header.cells_per_condition[c] for c in split.train))
    pool = header.n_controls if cfg.data.control_pool is None else min(cfg.data.control_pool, header.n_controls)
    k_val, k_test = eval_controls(cfg, pool)
    epochs = cfg.optim.epochs
    eval_cells = (k_val * (epochs + 1) * len([c for c in split.val if not is_control(c)])
                  + k_test * len([c for c in split.test if not is_control(c)]))
    nonzeros = min(header.nnz_per_cell, n) or n  # a header-only file: every model gene counted non-zero
    bcfg = cfg.backbone
    cached = isinstance(bcfg, FoundationModelBackbone) and bcfg.wants_embedding_cache
    step = _step_cost(cfg, n, n_perts, nonzeros, cached)
    cache_tflop, nbytes = 0.0, 0
    if cached:
        cache_tflop = step.fm_flops_per_cell * pool / 1e12
        nbytes = cache_bytes(pool, n, step.fm_width, bcfg.cache_dtype)
    train_tflop = step.train_flops_per_cell * train_cells * epochs / 1e12
    eval_tflop = step.eval_flops_per_cell * eval_cells / 1e12
    params, trainable, activations = step.param_bytes, step.trainable_bytes, step.saved_bytes
    mask = 0
    if cfg.adapter.enabled and cfg.adapter.attention_mask != "none" and not cfg.uses_fm_decoder:
        mask = math.ceil(GO_MASK_DENSITY * n * n) * 8 + (n + 1) * 8 + n * n
    peak = params + trainable * (1 + _ADAM_STATES) + activations + mask
    total = train_tflop + eval_tflop + cache_tflop
    return TrialCost(train_tflop, eval_tflop, cache_tflop, nbytes / _GB, peak / _GB, total / tflops / 3600, nbytes)
