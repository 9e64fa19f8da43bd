"""Components that own their options: the model (network or baseline), the backbone and the loss.

A component section of a run config (``model:``, ``backbone:``, ``loss:``) is one block whose ``name``
picks the component; the block's other keys are that component's own options, a frozen dataclass
registered here under the name::

    loss: {name: gears, gamma: 2.0, direction_lambda: 0.1, scale: 1.0}
    backbone: {name: learned}
    model: {name: baseline_linear, k: 10, ridge: 0.1}

:mod:`pertadapt.config.load` validates each block against its component's dataclass (unknown keys and
wrong types rejected, naming the component's valid keys); what a component *does* is registered by the
same name in ``models`` / ``baselines`` (a sync test checks both sides). A new component is its options
dataclass registered with :meth:`ComponentRegistry.register` plus its builder in the layer that runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from pertadapt.config.errors import ConfigError
from pertadapt.config.errors import check as _check
from pertadapt.config.errors import check_choice as _choice
from pertadapt.remote import is_uri

__all__ = [
    "BACKBONE_OPTIONS",
    "COMPONENTS",
    "FM_WEIGHTS",
    "GENE_SPACES",
    "LOSS_OPTIONS",
    "MODEL_OPTIONS",
    "AdaptiveLoss",
    "AidoCellBackbone",
    "BackboneOptions",
    "BaselineOptions",
    "CheckpointedBackbone",
    "ComponentOptions",
    "ComponentRegistry",
    "FoundationModelBackbone",
    "GearsLoss",
    "LearnedBackbone",
    "LinearBaseline",
    "LossOptions",
    "ModelOptions",
    "MseLoss",
    "PertAdaptNetwork",
    "PretrainedBackbone",
    "ScFoundationBackbone",
    "TinyBackbone",
]

FINETUNE_MODES = ("frozen", "last_k", "full", "lora")
#: ``backbone.embedding_cache``: ``auto`` = on for a frozen FM backbone, off otherwise.
EMBEDDING_CACHE_MODES = ("auto", "on", "off")
#: Storage dtypes of the frozen-FM embedding cache (``train.embed_cache.CACHE_DTYPES``).
CACHE_DTYPES = ("float32", "float16", "bfloat16")
#: Start of the head's per-gene output layer: ``xavier`` (the reference, GEARS's ``indv_w1``/``indv_b1``) or
#: ``zero`` (the model starts as no-change, Δ̂ = 0 on every gene; docs/quality.md).
HEAD_INITS = ("xavier", "zero")
#: Which FM weights a run uses (:attr:`BackboneOptions.fm_weights`): ``none`` (no FM: ``backbone.name: learned``,
#: or a baseline), ``random`` (``tiny``, or a named FM with ``random_init``) or ``pretrained`` (a checkpoint).
FM_WEIGHTS = ("none", "random", "pretrained")


@dataclass(frozen=True)
class ComponentOptions:
    """Base of every component's option block: ``name`` is the registry key that picks the component."""

    #: Keys this component does not have but a user may look for here → the key that sets that value.
    elsewhere: ClassVar[Mapping[str, str]] = {}

    name: str = ""


C = TypeVar("C", bound=ComponentOptions)


class ComponentRegistry(Generic[C]):
    """Name → option dataclass of one config section's components.

    Parameters
    ----------
    section
        The config section (``loss``, ``backbone``, ``model``), used in messages.
    base
        The class every registered option dataclass derives from.
    renamed
        Keys of the former flat section → (component, its key), named in the error for an old key.
    """

    def __init__(self, section: str, base: type[C], renamed: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.section, self.base = section, base
        self.renamed = dict(renamed or {})
        self._options: dict[str, type[C]] = {}

    def register(self, options: type[C]) -> type[C]:
        """Register a frozen option dataclass under its ``name`` default (usable as a class decorator).

        Raises
        ------
        ValueError
            When ``options`` is not a subclass of the section's base, has no ``name`` default, or the name
            is taken by another class.
        """
        if not (isinstance(options, type) and issubclass(options, self.base) and dataclasses.is_dataclass(options)):
            raise ValueError(f"{self.section}: {options!r} is not a {self.base.__name__} dataclass")
        name = next(f.default for f in dataclasses.fields(options) if f.name == "name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.section}: {options.__name__} needs a default for 'name' (its registry key)")
        if self._options.get(name, options) is not options:
            raise ValueError(f"{self.section}.name: {name!r} is already registered ({self._options[name].__name__})")
        self._options[name] = options
        return options

    def shared_keys(self) -> tuple[str, ...]:
        """Keys every component of the section has (the base's fields but ``name``): kept when ``name`` changes."""
        return tuple(f.name for f in dataclasses.fields(self.base) if f.name != "name")

    def names(self) -> tuple[str, ...]:
        """Registered component names, in registration order."""
        return tuple(self._options)

    def options(self, name: object) -> type[C]:
        """The option dataclass of ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
        if not isinstance(name, str) or name not in self._options:
            raise ConfigError(f"{self.section}.name: unknown {self.section} {name!r}; valid: "
                              f"{', '.join(sorted(self._options))}")
        return self._options[name]

    def keys(self, name: str) -> tuple[str, ...]:
        """The keys of component ``name``'s block (``name`` first)."""
        return tuple(f.name for f in dataclasses.fields(self.options(name)))

    def check_keys(self, name: str, block: Mapping[str, Any]) -> None:
        """Refuse a key that component ``name`` does not have, naming the new key of a renamed one.

        Raises
        ------
        ConfigError
            Naming ``<section>.<key>``, the component and its valid keys (or where a former key went).
        """
        valid = self.keys(name)
        for key in block:
            if key in valid:
                continue
            where = f"{self.section}.{key}"
            if key in self.renamed:
                owner, new = self.renamed[key]
                raise ConfigError(f"{where}: this key was renamed: use {self.section}.{new} (an option of "
                                  f"{self.section}.name={owner}, given in the {self.section} block as "
                                  f"{{name: {owner}, {new}: ...}})")
            others = [n for n in self._options if key in self.keys(n)]
            hint = f"; it is an option of {', '.join(others)}" if others else ""
            if key in self._options[name].elsewhere:
                hint += f"; for {self.section} {name!r} this is set by {self._options[name].elsewhere[key]}"
            raise ConfigError(f"{where}: not an option of {self.section} {name!r} (valid keys: "
                              f"{', '.join(valid)}){hint}")


# --- losses -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossOptions(ComponentOptions):
    """Base of every loss's block: ``scale`` multiplies the loss before backward (the reference uses 5.0)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        _check("loss.scale", self.scale > 0, "a positive float", self.scale)


LOSS_OPTIONS: ComponentRegistry[LossOptions] = ComponentRegistry(
    "loss", LossOptions, {"gears_gamma": ("gears", "gamma"), "gears_direction_lambda": ("gears", "direction_lambda")})


@LOSS_OPTIONS.register
@dataclass(frozen=True)
class AdaptiveLoss(LossOptions):
    """L_adapt: ``variant`` ``code`` (w_all = 2, as shipped) or ``intended`` (w_all = sg((L_DE + L_all) / L_all))."""

    name: str = "adaptive"
    variant: str = "code"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("loss.variant", self.variant, ("code", "intended"))


@LOSS_OPTIONS.register
@dataclass(frozen=True)
class MseLoss(LossOptions):
    """Plain mean squared error over all cells and genes."""

    name: str = "mse"


@LOSS_OPTIONS.register
@dataclass(frozen=True)
class GearsLoss(LossOptions):
    """GEARS autofocus (exponent ``2 + gamma``) + ``direction_lambda`` × direction loss."""

    name: str = "gears"
    gamma: float = 2.0
    direction_lambda: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("loss.gamma", self.gamma >= 0, "a non-negative float", self.gamma)
        _check("loss.direction_lambda", self.direction_lambda >= 0, "a non-negative float", self.direction_lambda)


# --- backbones ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneOptions(ComponentOptions):
    """Base of every backbone's block: what embeds the control cell gene by gene."""

    #: Whether the backbone is a foundation model (``learned`` = FM off: a trained per-gene embedding).
    is_foundation_model: ClassVar[bool] = False

    @property
    def weights_are_random(self) -> bool:
        """Whether the FM's weights are random (``tiny``, or a named FM with ``random_init``)."""
        return False

    @property
    def fm_weights(self) -> str:
        """Which FM weights the backbone has (:data:`FM_WEIGHTS`): ``none`` without an FM."""
        if not self.is_foundation_model:
            return "none"
        return "random" if self.weights_are_random else "pretrained"

    @property
    def is_frozen_foundation_model(self) -> bool:
        """Whether the backbone is an FM that does not train (its embeddings depend on the cell only)."""
        return False

    @property
    def wants_embedding_cache(self) -> bool:
        """Whether the frozen FM's embeddings are to be cached (see :class:`FoundationModelBackbone`)."""
        return False


BACKBONE_OPTIONS: ComponentRegistry[BackboneOptions] = ComponentRegistry("backbone", BackboneOptions)


@BACKBONE_OPTIONS.register
@dataclass(frozen=True)
class LearnedBackbone(BackboneOptions):
    """FM off: a trained ``N × model.hidden_size`` gene embedding (its width is ``model.hidden_size``)."""

    elsewhere: ClassVar[Mapping[str, str]] = {"hidden_size": "model.hidden_size"}

    name: str = "learned"


@dataclass(frozen=True)
class FoundationModelBackbone(BackboneOptions):
    """A transformer FM: its sizes, how it is fine-tuned and whether its frozen embeddings are cached."""

    is_foundation_model: ClassVar[bool] = True
    #: Width of the FM's embeddings (of a random init; a checkpoint's own config wins).
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    #: ``frozen`` (paper), ``last_k``, ``full`` or ``lora``.
    finetune: str = "frozen"
    #: Trailing blocks that train with ``finetune: last_k``.
    last_k: int = 1
    #: LoRA rank with ``finetune: lora``.
    lora_rank: int = 8
    #: Recompute each transformer block in the backward pass instead of keeping its activations
    #: (``torch.utils.checkpoint``): same outputs and gradients, far less memory when the FM trains.
    activation_checkpointing: bool = False
    #: Compute the frozen FM's per-gene embeddings of the control pool once and reuse them (every epoch,
    #: every trial with the same key): ``auto`` (on for a frozen FM), ``on`` or ``off``.
    embedding_cache: str = "auto"
    #: Storage dtype of that cache: ``float32`` (outputs equal to recomputing), ``float16`` or ``bfloat16``.
    cache_dtype: str = "float32"

    def __post_init__(self) -> None:
        _choice("backbone.finetune", self.finetune, FINETUNE_MODES)
        if self.embedding_cache in ("True", "False"):  # YAML 1.1 reads a bare on/off as a boolean
            object.__setattr__(self, "embedding_cache", "on" if self.embedding_cache == "True" else "off")
        _choice("backbone.embedding_cache", self.embedding_cache, EMBEDDING_CACHE_MODES)
        _choice("backbone.cache_dtype", self.cache_dtype, CACHE_DTYPES)
        if self.embedding_cache == "on" and not self.is_frozen_foundation_model:
            raise ConfigError(f"backbone.embedding_cache: 'on' needs a frozen foundation-model backbone "
                              f"(backbone.finetune=frozen), got backbone.name={self.name!r}, "
                              f"backbone.finetune={self.finetune!r}; use 'auto' or 'off'")
        _check("backbone.hidden_size", self.hidden_size > 0, "a positive integer", self.hidden_size)
        _check("backbone.heads", self.heads > 0 and self.hidden_size % self.heads == 0,
               "a positive divisor of backbone.hidden_size", self.heads)
        _check("backbone.layers", self.layers > 0, "a positive integer", self.layers)
        _check("backbone.last_k", self.last_k > 0, "a positive integer", self.last_k)
        _check("backbone.lora_rank", self.lora_rank > 0, "a positive integer", self.lora_rank)

    @property
    def weights_are_random(self) -> bool:
        return True

    @property
    def is_frozen_foundation_model(self) -> bool:
        return self.finetune == "frozen"

    @property
    def wants_embedding_cache(self) -> bool:
        """Whether ``embedding_cache`` asks for the cache (``on``, or ``auto`` with a frozen FM)."""
        return self.embedding_cache == "on" or (self.embedding_cache == "auto" and self.is_frozen_foundation_model)


@dataclass(frozen=True)
class CheckpointedBackbone(FoundationModelBackbone):
    """An FM that can load its weights: ``checkpoint`` (a directory or file), or ``pretrain`` (one made here).

    ``pretrain`` names a ``pertadapt pretrain`` config (a path relative to the file that sets it, then among
    the shipped configs): this FM's weights come from pretraining that config's FM on this run's data file.
    It is resolved to ``checkpoint`` (and ``checkpoint_sha256``) before the backbone is built, by ``pertadapt
    train`` and, once per (pretrain config, data file), by the sweep driver before any trial starts; the
    pretraining runs once and is cached (``train.pretrain.pretrained_checkpoint``). The pretrain config's
    backbone must declare this block's architecture. A dry run plans with the declared sizes.
    """

    #: A checkpoint directory or weights file, or a checkpoint directory on an object store (a URI, loaded from
    #: a node-local copy checked against ``checkpoint_sha256``, which it then needs).
    checkpoint: str | None = None
    #: A ``pertadapt pretrain`` config whose FM, pretrained on this run's data file, gives the weights.
    pretrain: str | None = None
    #: SHA-256 of the checkpoint's weights (``train.fm_weights.checkpoint_sha256``), set where ``pretrain`` is
    #: resolved: the weights loaded are checked against it, and a trial's identity (config hash) follows them.
    checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrain is not None and self.checkpoint is not None:
            raise ConfigError(f"backbone.pretrain: {self.pretrain!r}, but backbone.checkpoint is set too "
                              f"({self.checkpoint!r}); choose one (pretrain is resolved to the checkpoint it writes)")
        if self.checkpoint_sha256 is not None and self.checkpoint is None:
            raise ConfigError("backbone.checkpoint_sha256: set without backbone.checkpoint (it is the digest of "
                              "the checkpoint's weights)")
        if is_uri(self.checkpoint) and self.checkpoint_sha256 is None:
            raise ConfigError(f"backbone.checkpoint: {self.checkpoint} is on an object store; set "
                              "backbone.checkpoint_sha256 to the SHA-256 of its weights (its node-local copy is "
                              "named by it and checked against it)")

    @property
    def weights_are_random(self) -> bool:
        return self.checkpoint is None and self.pretrain is None

    def with_checkpoint(self, checkpoint: str, sha256: str) -> CheckpointedBackbone:
        """This block loading ``checkpoint`` (weights digest ``sha256``): what a resolved ``pretrain`` becomes."""
        return dataclasses.replace(self, checkpoint=checkpoint, pretrain=None, checkpoint_sha256=sha256)

    def with_random_weights(self) -> CheckpointedBackbone:
        """The same architecture with random weights (what a plan builds; the ``fm: random`` twin)."""
        return dataclasses.replace(self, checkpoint=None, pretrain=None, checkpoint_sha256=None)


@BACKBONE_OPTIONS.register
@dataclass(frozen=True)
class TinyBackbone(CheckpointedBackbone):
    """A small transformer FM: random init, or ``checkpoint`` = a directory written by ``pertadapt pretrain``
    (``config.json``, ``model.safetensors``, ``genes.txt``; its sizes win over ``hidden_size``/``layers``/
    ``heads`` and its genes must equal the data's gene order), or ``pretrain``."""

    name: str = "tiny"


@dataclass(frozen=True)
class PretrainedBackbone(CheckpointedBackbone):
    """An FM with published weights: ``checkpoint`` (or ``pretrain``) is required unless ``random_init`` asks
    for random weights."""

    #: Build the FM with random weights when no checkpoint is given. Without it, a missing ``checkpoint``
    #: is an error (a random "FM" must never pass for a real one).
    random_init: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint is None and self.pretrain is None and not self.random_init:
            raise ConfigError(f"backbone.checkpoint: the {self.name} backbone needs its pretrained weights "
                              "(a checkpoint directory, or backbone.pretrain: a pretrain config); set "
                              "backbone.random_init=true to run it with random weights on purpose (results are "
                              "then labelled 'random FM')")
        if self.random_init and (self.checkpoint is not None or self.pretrain is not None):
            which = "backbone.checkpoint" if self.checkpoint is not None else "backbone.pretrain"
            raise ConfigError(f"backbone.random_init: true, but {which} is set; choose one")

    def with_random_weights(self) -> PretrainedBackbone:
        return dataclasses.replace(self, checkpoint=None, pretrain=None, checkpoint_sha256=None, random_init=True)


@BACKBONE_OPTIONS.register
@dataclass(frozen=True)
class AidoCellBackbone(PretrainedBackbone):
    """AIDO.Cell; ``input_mode`` ``code`` (log1p data re-normalised as counts, as the reference) or ``intended``."""

    name: str = "aido_cell"
    input_mode: str = "code"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("backbone.input_mode", self.input_mode, ("code", "intended"))


@BACKBONE_OPTIONS.register
@dataclass(frozen=True)
class ScFoundationBackbone(PretrainedBackbone):
    """scFoundation."""

    name: str = "scfoundation"


# --- models: the PertAdapt network or a simple baseline ------------------------------------------------

@dataclass(frozen=True)
class ModelOptions(ComponentOptions):
    """Base of every model's block."""

    #: Whether the model is a simple baseline (fit on condition means; no engine, no Ray).
    is_baseline: ClassVar[bool] = False

    #: The genes the model predicts and is scored on (``GENE_SPACES``): ``measured`` = the data file's
    #: measured genes (``var['measured']``; the backbone still reads its whole vocabulary and its per-gene
    #: embeddings are gathered at the measured genes), ``vocabulary`` = every gene of the file, the
    #: zero-filled ones included (the reference's behaviour). Metrics are on the measured genes either
    #: way; a ``vocabulary`` run also reports its all-gene metrics as ``<split>_vocab_<metric>``.
    gene_space: str = "measured"


#: The choices of ``model.gene_space``.
GENE_SPACES = ("measured", "vocabulary")

MODEL_OPTIONS: ComponentRegistry[ModelOptions] = ComponentRegistry(
    "model", ModelOptions, {"linear_k": ("baseline_linear", "k"), "linear_ridge": ("baseline_linear", "ridge")})


@MODEL_OPTIONS.register
@dataclass(frozen=True)
class PertAdaptNetwork(ModelOptions):
    """The PertAdapt network (backbone, perturbation encoder, adapter, head)."""

    name: str = "pertadapt"
    #: Width D of gene tokens inside the adapter and head (paper: 512).
    hidden_size: int = 512
    #: Hidden width of the head's recovery MLP (paper: 2 x hidden), also in the FM-baseline decoder.
    head_hidden: int = 1024
    #: Initialisation of the head's per-gene output weights and biases (``HEAD_INITS``).
    head_init: str = "xavier"
    #: Co-expression graph of the FM-baseline decoder (PA off, ``adapter.off_mode: decoder``), built as
    #: GEARS does from the training cells: per gene its ``coexpress_top_k`` most co-expressed genes plus
    #: itself, kept where |Pearson r| > ``coexpress_threshold``.
    coexpress_top_k: int = 20
    coexpress_threshold: float = 0.4

    def __post_init__(self) -> None:
        _check("model.hidden_size", self.hidden_size > 0, "a positive integer", self.hidden_size)
        _check("model.head_hidden", self.head_hidden > 0, "a positive integer", self.head_hidden)
        _choice("model.head_init", self.head_init, HEAD_INITS)
        _check("model.coexpress_top_k", self.coexpress_top_k > 0, "a positive integer", self.coexpress_top_k)
        _check("model.coexpress_threshold", 0.0 <= self.coexpress_threshold < 1.0, "a value in [0, 1)",
               self.coexpress_threshold)


@dataclass(frozen=True)
class BaselineOptions(ModelOptions):
    """Base of the simple baselines' blocks."""

    is_baseline: ClassVar[bool] = True


@MODEL_OPTIONS.register
@dataclass(frozen=True)
class NoChangeBaseline(BaselineOptions):
    """Predicts the control mean."""

    name: str = "baseline_nochange"


@MODEL_OPTIONS.register
@dataclass(frozen=True)
class MeanBaseline(BaselineOptions):
    """Predicts the mean of the training perturbations."""

    name: str = "baseline_mean"


@MODEL_OPTIONS.register
@dataclass(frozen=True)
class AdditiveBaseline(BaselineOptions):
    """Adds the single perturbations' effects."""

    name: str = "baseline_additive"


@MODEL_OPTIONS.register
@dataclass(frozen=True)
class LinearBaseline(BaselineOptions):
    """Ridge-regularised bilinear model on ``k`` principal components (penalty ``ridge``)."""

    name: str = "baseline_linear"
    k: int = 10
    ridge: float = 0.1

    def __post_init__(self) -> None:
        _check("model.k", self.k > 0, "a positive integer", self.k)
        _check("model.ridge", self.ridge >= 0, "a non-negative float", self.ridge)


#: The component sections of a run config: section → its registry (``pertadapt.config.load`` reads it).
COMPONENTS: dict[str, ComponentRegistry[Any]] = {
    "model": MODEL_OPTIONS, "backbone": BACKBONE_OPTIONS, "loss": LOSS_OPTIONS}
