"""The typed, frozen schema of one run.

Every run — a ``pertadapt train`` call, one arm × seed of an ablation, one Optuna sample — is a
:class:`RunConfig`. YAML files and ``key=value`` overrides are merged onto it by
:mod:`pertadapt.config.load`; unknown keys and wrong types are rejected there, and the
cross-field checks in each ``__post_init__`` run before anything expensive starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pertadapt.config.components import (
    BACKBONE_OPTIONS,
    CACHE_DTYPES,
    EMBEDDING_CACHE_MODES,
    FINETUNE_MODES,
    GENE_SPACES,
    LOSS_OPTIONS,
    MODEL_OPTIONS,
    AdaptiveLoss,
    BackboneOptions,
    LossOptions,
    ModelOptions,
    PertAdaptNetwork,
    TinyBackbone,
)
from pertadapt.config.errors import ConfigError
from pertadapt.config.errors import check as _check
from pertadapt.config.errors import check_choice as _choice
from pertadapt.config.metrics import SUBGROUPS, is_metric_name, metric_names, select_mode

__all__ = [
    "BACKBONES",
    "BASELINE_MODELS",
    "CACHE_DTYPES",
    "EMBEDDING_CACHE_MODES",
    "CLIP_MODES",
    "ENGINES",
    "FINETUNE_MODES",
    "GO_SOURCES",
    "LOSSES",
    "MASKS",
    "MODELS",
    "OPTIMIZERS",
    "PA_OFF_MODES",
    "PERT_GRAPH_GENES",
    "SCHEDULES",
    "SPLIT_KINDS",
    "SUBGROUPS",
    "is_metric_name",
    "AdapterConfig",
    "BackboneOptions",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "GOConfig",
    "LoggingConfig",
    "LossOptions",
    "ModelOptions",
    "OptimConfig",
    "RunConfig",
]

#: Closed vocabularies of names. The registries in ``models``/``baselines``/``go``/``train`` are dicts
#: keyed by exactly these names (one sync test per registry checks it), so the schema rejects an
#: unknown name before anything is built. The components (model, backbone, loss) are named by their
#: registries in :mod:`pertadapt.config.components`; these tuples are their built-in names.
MODELS = MODEL_OPTIONS.names()
BASELINE_MODELS = tuple(n for n in MODELS if MODEL_OPTIONS.options(n).is_baseline)
BACKBONES = BACKBONE_OPTIONS.names()
LOSSES = LOSS_OPTIONS.names()
MASKS = ("go", "none", "random_degree_matched")
#: What the model is with ``adapter.enabled: false`` (see :class:`AdapterConfig`).
PA_OFF_MODES = ("decoder", "sum")
ENGINES = ("torch", "deepspeed")
#: ``optim.name``: the optimiser (``train.engine.OPTIMIZERS``).
OPTIMIZERS = ("adam", "adamw", "sgd")
#: ``optim.schedule``: the learning-rate schedule (``train.schedule.SCHEDULES``).
SCHEDULES = ("step", "cosine", "constant")
#: Where gradient value clipping acts (see :class:`OptimConfig`).
CLIP_MODES = ("accumulated", "per_micro_batch")
GO_SOURCES = ("bundled", "debian", "obo")
#: Genes of the perturbation encoder's GO graph (see :class:`GOConfig`).
PERT_GRAPH_GENES = ("all", "targets")
#: Condition split kinds (GEARS).
SPLIT_KINDS = ("simulation", "single")


@dataclass(frozen=True)
class DataConfig:
    """Where the cells come from and how conditions are split.

    ``path`` is a prepared ``.h5ad`` (see ``pertadapt data prepare``); when it is ``None`` the
    simulator preset ``simulate_preset`` is generated (seeded by ``simulate_seed``) and cached.
    """

    path: str | None = None
    simulate_preset: str = "demo"
    simulate_seed: int = 0
    split: str = "simulation"
    train_gene_frac: float = 0.75
    combo_seen2_train_frac: float = 0.75
    #: Split seed; ``None`` uses the run seed (the paper runs seeds 1..5 on splits).
    split_seed: int | None = None
    n_de: int = 20
    #: What to do with conditions whose genes lack GO annotations: ``drop`` (warn) or ``fail``.
    missing_go: str = "drop"
    #: Keep the expression matrix on disk and read each batch's rows on demand (bounded memory); only
    #: ``obs``/``var``/``uns`` are loaded, no layer.
    backed: bool = False
    #: Control cells perturbed cells are paired with: a seeded subset of this many (``None`` = all). The
    #: frozen-FM embedding cache holds exactly these cells; the pairing draws from them with or without it.
    control_pool: int | None = None
    #: Seed of the control pool's draw (not the run seed, so that every seed and arm shares one cache).
    control_pool_seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.split", self.split, SPLIT_KINDS)
        _choice("data.missing_go", self.missing_go, ("drop", "fail"))
        _check("data.train_gene_frac", 0.0 < self.train_gene_frac < 1.0, "a fraction in (0, 1)", self.train_gene_frac)
        _check("data.combo_seen2_train_frac", 0.0 <= self.combo_seen2_train_frac <= 1.0, "a fraction in [0, 1]",
               self.combo_seen2_train_frac)
        _check("data.n_de", self.n_de > 0, "a positive integer", self.n_de)
        _check("data.simulate_seed", self.simulate_seed >= 0, "a non-negative integer", self.simulate_seed)
        _check("data.control_pool", self.control_pool is None or self.control_pool >= 1, "an integer >= 1 or null",
               self.control_pool)
        _check("data.control_pool_seed", self.control_pool_seed >= 0, "a non-negative integer",
               self.control_pool_seed)


@dataclass(frozen=True)
class GOConfig:
    """Gene Ontology source and the two GO-derived structures (perturbation graph, attention mask)."""

    #: ``bundled`` (real human GO table shipped with the package), ``debian`` or ``obo``.
    source: str = "bundled"
    obo: str | None = None
    gaf: str | None = None
    aspects: tuple[str, ...] = ("BP", "MF", "CC")
    propagate: bool = False
    graph_threshold: float = 0.1
    graph_top_k: int = 20
    mask_threshold: float = 0.1
    #: Nodes of the perturbation encoder's GO graph (its vocabulary P): ``all`` = every gene with GO
    #: annotations in the source, the dataset's targets indexed into it (reference, so that an unseen
    #: target borrows from GO neighbours that were never perturbed); ``targets`` = the dataset's targets only.
    pert_graph_genes: str = "all"

    def __post_init__(self) -> None:
        _choice("go.source", self.source, GO_SOURCES)
        _choice("go.pert_graph_genes", self.pert_graph_genes, PERT_GRAPH_GENES)
        for a in self.aspects:
            _choice("go.aspects", a, ("BP", "MF", "CC"))
        if self.source == "obo" and (self.obo is None or self.gaf is None):
            raise ConfigError("go.obo / go.gaf: both are required when go.source is 'obo'")
        _check("go.graph_top_k", self.graph_top_k > 0, "a positive integer", self.graph_top_k)
        _check("go.graph_threshold", 0.0 <= self.graph_threshold < 1.0, "a value in [0, 1)", self.graph_threshold)
        _check("go.mask_threshold", 0.0 <= self.mask_threshold < 1.0, "a value in [0, 1)", self.mask_threshold)


@dataclass(frozen=True)
class AdapterConfig:
    """The perturbation adapter (PA) with its GO attention mask (AM).

    With ``enabled: false`` the PA's own options (``attention_mask``, ``layers``, ``heads``, ``ffn_dim``,
    ``chunk_size``, ``attention_impl``) are not used: no mask is built and nothing attends.
    """

    enabled: bool = True
    #: What the model is with the PA off: ``decoder`` = the FM-baseline (GEARS) decoder over the gene
    #: embeddings, the paper's "PA off" (its FM-only rows are its FM baselines); ``sum`` = ``H = E + p``
    #: straight into the gene head (an extra control).
    off_mode: str = "decoder"
    attention_mask: str = "go"
    layers: int = 1
    heads: int = 8
    #: FFN bottleneck width (paper: 512 -> 256 -> 512).
    ffn_dim: int = 256
    #: Where the perturbation embedding is added: ``all`` gene tokens (paper) or only ``perturbed`` ones.
    inject: str = "all"
    #: Queries per chunk in the masked attention (bounds memory; never an N x N tensor).
    chunk_size: int = 2048
    #: Masked attention path: ``chunked`` (dense SDPA per query chunk), ``sparse`` (only the allowed pairs' work) or ``auto``.
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        _choice("adapter.attention_mask", self.attention_mask, MASKS)
        _choice("adapter.off_mode", self.off_mode, PA_OFF_MODES)
        _choice("adapter.attention_impl", self.attention_impl, ("chunked", "sparse", "auto"))
        _choice("adapter.inject", self.inject, ("all", "perturbed"))
        _check("adapter.layers", self.layers > 0, "a positive integer", self.layers)
        _check("adapter.heads", self.heads > 0, "a positive integer", self.heads)
        _check("adapter.ffn_dim", self.ffn_dim > 0, "a positive integer", self.ffn_dim)
        _check("adapter.chunk_size", self.chunk_size > 0, "a positive integer", self.chunk_size)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (paper: Adam + StepLR 0.5/epoch); ``batch_size`` cells per step."""

    #: ``adam`` (paper; L2 weight decay added to the gradient), ``adamw`` (decoupled weight decay) or ``sgd``.
    name: str = "adam"
    lr: float = 0.01
    weight_decay: float = 5e-4
    #: SGD momentum (``optim.name: sgd`` only).
    momentum: float = 0.0
    #: ``step`` (× ``step_gamma`` every epoch, paper), ``cosine`` (from ``lr`` to 0 over every optimiser step
    #: after the warmup) or ``constant``.
    schedule: str = "step"
    step_gamma: float = 0.5
    #: Linear warmup from ``lr / warmup`` to ``lr`` over the first optimiser steps: ``warmup_steps`` steps,
    #: or ``warmup_epochs`` whole epochs (at most one of them non-zero); the schedule starts after it.
    warmup_epochs: int = 0
    warmup_steps: int = 0
    epochs: int = 20
    batch_size: int = 32
    micro_batch_size: int = 4
    #: Gradient value clipping (``None`` = off); paper: 1.0.
    clip_value: float | None = 1.0
    #: ``accumulated`` (reference): clamp the accumulated gradient to ``[-clip_value, clip_value]`` after
    #: every micro-step's backward, as ``clip_grad_value_`` after each backward does; ``per_micro_batch``:
    #: clamp each micro-batch's own contribution, so the accumulated gradient may reach
    #: ``accumulation_steps × clip_value``.
    clip_mode: str = "accumulated"
    #: Cap on optimiser steps per epoch (``None`` = the whole training set).
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        _check("optim.lr", self.lr > 0, "a positive float", self.lr)
        _check("optim.epochs", self.epochs >= 1, "an integer >= 1", self.epochs)
        _check("optim.micro_batch_size", self.micro_batch_size >= 1, "an integer >= 1", self.micro_batch_size)
        _check("optim.batch_size", self.batch_size >= self.micro_batch_size,
               "an integer >= optim.micro_batch_size", self.batch_size)
        _check("optim.weight_decay", self.weight_decay >= 0, "a non-negative float", self.weight_decay)
        _check("optim.step_gamma", 0.0 < self.step_gamma <= 1.0, "a factor in (0, 1]", self.step_gamma)
        _choice("optim.name", self.name, OPTIMIZERS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _check("optim.momentum", 0.0 <= self.momentum < 1.0, "a value in [0, 1)", self.momentum)
        if self.momentum and self.name != "sgd":
            raise ConfigError(f"optim.momentum: only the sgd optimiser has a momentum option (optim.name is "
                              f"{self.name!r}); remove it or set optim.name=sgd")
        _check("optim.warmup_epochs", self.warmup_epochs >= 0, "an integer >= 0", self.warmup_epochs)
        _check("optim.warmup_steps", self.warmup_steps >= 0, "an integer >= 0", self.warmup_steps)
        if self.warmup_epochs and self.warmup_steps:
            raise ConfigError("optim.warmup_epochs / optim.warmup_steps: give one of them, not both")
        _check("optim.clip_value", self.clip_value is None or self.clip_value > 0, "a positive float or null",
               self.clip_value)
        _choice("optim.clip_mode", self.clip_mode, CLIP_MODES)
        _check("optim.max_steps_per_epoch", self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
               "an integer >= 1 or null", self.max_steps_per_epoch)


@dataclass(frozen=True)
class EngineConfig:
    """How training is distributed: plain torch (one process) or DeepSpeed over N Ray Train workers."""

    name: str = "torch"
    workers: int = 1
    #: DeepSpeed JSON with parallelism/precision knobs only (batch sizes come from ``optim``).
    deepspeed_config: str = "zero2.json"
    cpus_per_worker: float = 1.0
    #: Train on GPUs (NCCL, one process per GPU); implied by ``gpus_per_worker > 0``.
    use_gpu: bool = False
    #: GPUs per worker (default: 1 when ``use_gpu``, else 0).
    gpus_per_worker: float = 0.0
    #: Ray accelerator type a worker must run on (e.g. ``H100``); ``None`` = any.
    accelerator_type: str | None = None
    #: Worker placement: ``pack`` (as few nodes as possible) or ``spread`` (one per node where possible).
    placement: str = "pack"
    #: Ray Train worker-group restarts (from the latest checkpoint) after a worker or node failure.
    max_failures: int = 2

    def __post_init__(self) -> None:
        _choice("engine.name", self.name, ENGINES)
        _check("engine.workers", self.workers >= 1, "an integer >= 1", self.workers)
        _check("engine.max_failures", self.max_failures >= 0, "an integer >= 0", self.max_failures)
        _check("engine.cpus_per_worker", self.cpus_per_worker > 0, "a positive number", self.cpus_per_worker)
        _check("engine.gpus_per_worker", self.gpus_per_worker >= 0, "a non-negative number", self.gpus_per_worker)
        _choice("engine.placement", self.placement, ("pack", "spread"))
        if self.name == "torch" and self.workers != 1:
            raise ConfigError("engine.workers: the 'torch' engine runs one process; use engine.name=deepspeed")

    @property
    def gpus(self) -> float:
        """GPUs each worker asks Ray for."""
        return self.gpus_per_worker or (1.0 if self.use_gpu else 0.0)

    @property
    def on_gpu(self) -> bool:
        """Whether training runs on CUDA devices."""
        return self.gpus > 0


@dataclass(frozen=True)
class EvalConfig:
    """Model selection, evaluation batch size and the control cells behind each predicted condition mean."""

    select_metric: str = "val_mse_de"
    #: ``min`` or ``max``; ``null``: from the metric's direction (:mod:`pertadapt.config.metrics`): ``min`` for
    #: errors (``val_mse_de``), ``max`` for correlations (``val_pearson_delta``).
    select_mode: str | None = None
    batch_size: int = 64
    #: Control cells each validation condition's mean prediction averages over, per cell type: a fixed subset
    #: of the control pool drawn with ``controls_seed`` (the same for every epoch, arm and run seed), or
    #: ``null`` = the whole pool. The default keeps per-epoch validation of Norman at the paper's settings
    #: under 25 % of an epoch's training FLOPs (docs/evaluation.md).
    val_controls: int | None = 500
    #: As ``val_controls``, for the test conditions of the final evaluation (its pairing noise is reported
    #: as ``test_pairing_noise_mse_de``). The default keeps Norman's final evaluation under one epoch.
    test_controls: int | None = 1000
    #: Seed of the evaluation control subsets; not the run seed, so every run of a sweep sees the same ones.
    controls_seed: int = 0
    #: Evaluation forwards in ``fp32`` or ``bf16`` (autocast, on CUDA only; fp32 elsewhere).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check("eval.select_metric", is_metric_name(self.select_metric, "val"),
               "a validation metric: val_<metric> or val_<subgroup>_<metric> with metric one of "
               f"{', '.join(metric_names())}", self.select_metric)
        if self.select_mode is not None:  # None: set from the metric's direction by RunConfig
            _choice("eval.select_mode", self.select_mode, ("min", "max"))
        _check("eval.batch_size", self.batch_size > 0, "a positive integer", self.batch_size)
        for key, value in (("eval.val_controls", self.val_controls), ("eval.test_controls", self.test_controls)):
            _check(key, value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                   "an integer >= 1 or null (the whole control pool)", value)
        _check("eval.controls_seed", self.controls_seed >= 0, "a non-negative integer", self.controls_seed)
        _choice("eval.precision", self.precision, ("fp32", "bf16"))


@dataclass(frozen=True)
class LoggingConfig:
    """Where runs go and how they are tracked."""

    out_dir: str = "runs"
    #: W&B mode: ``auto`` (``$WANDB_MODE``, else online with an API key, else offline), ``offline``,
    #: ``online`` or ``disabled``.
    wandb: str = "auto"
    project: str = "pertadapt"
    group: str | None = None

    def __post_init__(self) -> None:
        _choice("logging.wandb", self.wandb, ("auto", "offline", "online", "disabled"))


@dataclass(frozen=True)
class RunConfig:
    """One run: every section plus the seed (model init, control pairing and, by default, the split)."""

    name: str = "run"
    seed: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    go: GOConfig = field(default_factory=GOConfig)
    #: Components (:mod:`pertadapt.config.components`): each block's ``name`` picks its option dataclass.
    model: ModelOptions = field(default_factory=PertAdaptNetwork)
    backbone: BackboneOptions = field(default_factory=TinyBackbone)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossOptions = field(default_factory=AdaptiveLoss)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """Cross-section checks: everything a run would find out later is found out here."""
        if self.eval.select_mode is None:  # here, not in EvalConfig: its default instance never sees the metric
            object.__setattr__(self, "eval", replace(self.eval, select_mode=select_mode(self.eval.select_metric)))
        _check("name", bool(self.name) and "/" not in self.name and ".." not in self.name,
               "a non-empty name without '/' or '..'", self.name)
        _check("model.gene_space", self.model.gene_space in GENE_SPACES, f"one of {', '.join(GENE_SPACES)}",
               self.model.gene_space)
        if self.is_baseline:
            return
        per_step = self.optim.micro_batch_size * self.engine.workers
        if self.optim.batch_size % per_step:
            raise ConfigError(f"optim.batch_size: {self.optim.batch_size} cells per step is not a multiple of "
                              f"optim.micro_batch_size × engine.workers = {self.optim.micro_batch_size} × "
                              f"{self.engine.workers} = {per_step}")
        if self.uses_fm_decoder and self.adapter.inject != "all":
            raise ConfigError(f"adapter.inject: {self.adapter.inject!r} has no meaning for the FM-baseline decoder "
                              "(adapter.enabled=false, adapter.off_mode=decoder), which adds the perturbation to "
                              "every gene; use 'all' or adapter.off_mode=sum")
        if self.adapter.enabled and self.model.hidden_size % self.adapter.heads:
            raise ConfigError(f"adapter.heads: {self.adapter.heads} does not divide the adapter width "
                              f"model.hidden_size = {self.model.hidden_size}")
        if self.engine.name == "deepspeed":
            from pertadapt.config.deepspeed import read_deepspeed_json

            read_deepspeed_json(self.engine.deepspeed_config)

    @property
    def split_seed(self) -> int:
        """The seed of the condition split (``data.split_seed`` or the run seed)."""
        return self.seed if self.data.split_seed is None else self.data.split_seed

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each worker (``batch_size / (micro_batch_size × workers)``)."""
        return self.optim.batch_size // (self.optim.micro_batch_size * self.engine.workers)

    @property
    def loss_scale(self) -> float:
        """Factor on the loss before backward (``loss.scale``; the engines read it)."""
        return self.loss.scale

    @property
    def is_baseline(self) -> bool:
        """Whether the model is one of the simple baselines (fit on condition means; no engine, no Ray)."""
        return self.model.is_baseline

    @property
    def unused_sections(self) -> tuple[str, ...]:
        """Sections whose knobs this run never reads: a baseline (fit on condition means) trains no network,
        so its backbone, adapter, loss, optimiser and engine are set but unused."""
        return ("backbone", "adapter", "loss", "optim", "engine") if self.is_baseline else ()

    @property
    def uses_fm_decoder(self) -> bool:
        """Whether the network is the FM-baseline (GEARS) decoder: PA off with ``adapter.off_mode: decoder``."""
        return not self.is_baseline and not self.adapter.enabled and self.adapter.off_mode == "decoder"

    @property
    def uses_ray_train(self) -> bool:
        """Whether the run trains on Ray Train workers (DeepSpeed engine) rather than in-process."""
        return not self.is_baseline and self.engine.name == "deepspeed"
