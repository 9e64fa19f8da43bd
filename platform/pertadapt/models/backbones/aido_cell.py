"""AIDO.Cell (GenBio AI ``cellfoundation``) as a PertAdapt backbone, loadable from the published HF layout.

Architecture (modelgenerator 0.1.3 ``cellfoundation``; ``genbio-ai/AIDO.Cell-{3M,10M,100M}``)
---------------------------------------------------------------------------------------------
* Input: the ``N`` gene values followed by two read-depth tokens, each ``max(log10 Σx, 5)``; every
  value is clipped at 20.
* Value embedding ``gene_embedding``: ``Linear(1→bin_num)`` → LeakyReLU(0.1) → residual
  ``Linear(bin_num→bin_num)`` (``α·h + W h``) → softmax over ``bin_num`` soft bins → weighted sum of
  the ``lookup_table`` rows. Plus a learned ``position_embedding`` with ``N + 2`` rows (one per gene
  and depth token).
* Bidirectional pre-norm encoder: ``h += dense(attn(RMSNorm(h)))``, ``h += down(silu(gate(·)) * up(·))``
  on ``RMSNorm(h)``; a final RMSNorm ``encoder.ln``.

Differences from the shipped code, on purpose
---------------------------------------------
* Attention runs over **genes** with :func:`torch.nn.functional.scaled_dot_product_attention` on every
  device. The shipped module needs flash-attn, and its no-flash-attn fallback attends across heads
  (genes never interact); that fallback is not reproduced.
* The model runs in the dtype it is cast to (fp32 by default); the shipped wrapper casts to bf16.
* ``mask_embedding``/``pad_embedding`` exist for the checkpoint layout only: masked (-1) or padded (-2)
  inputs never occur when embedding whole cells (all values are ≥ 0).

Input modes
-----------
PertAdapt's reference feeds the **log1p-normalised** control cell to this backbone as if it were counts
(its ``bf_model`` drops ``total_count`` and passes the rest, cast to bf16, to ``GenBioCellFoundation``),
so AIDO.Cell normalises a second time and its depth tokens come from ``Σ log1p``:
``input_mode="code"`` (default, reproduces published numbers). ``input_mode="intended"`` undoes the
data's log1p (``expm1``), applies AIDO.Cell's own ``log1p(x / Σx · 1e4)`` and takes the depth tokens
from the raw ``total_count`` — exactly AIDO.Cell's preprocessing of counts.

Checkpoint layout
-----------------
A directory with ``config.json`` (HF ``model_type: cellfoundation``; fields ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings`` = N,
``bin_num``, ``bin_alpha``, ``layer_norm_eps``, ``normalization_type``, ``add_linear_bias``,
``hidden_act: swiglu``, ``position_embedding_type: absolute``) and ``model.safetensors`` or
``pytorch_model.bin`` (optionally sharded with an ``*.index.json``), read with the ``safetensors``
package or ``torch.load(weights_only=True)`` — a ``.bin`` holding anything beyond tensors is refused,
never unpickled. State-dict names are those of
``CellFoundationModel``, with or without the ``bert.`` prefix of the ``…ForMaskedLM`` wrappers (whose
``cls.*`` head is ignored). The gene vocabulary is read from ``genes.txt`` (one symbol per line) or
``OS_scRNA_gene_index.19264.tsv`` in the directory, else the bundled 19,264-gene list when ``N`` is
19,264.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pertadapt.config.components import AidoCellBackbone
from pertadapt.files import atomic_write_json
from pertadapt.models.backbones.checkpoint import (
    CheckpointError,
    build_or_load,
    load_checked_state,
    read_json_object,
    read_safetensors,
    read_torch_file,
    resolve_vocab,
    write_gene_file,
    write_safetensors,
)
from pertadapt.models.backbones.layers import (
    N_DEPTH_TOKENS,
    DepthTokenBackbone,
    LayerStack,
    SoftBinEmbedding,
    SoftBinNames,
)

__all__ = ["AIDOCell", "AIDOCellConfig", "AIDOCellLayer", "aido_cell_from_options", "build_aido_cell"]

log = logging.getLogger(__name__)

#: Values above this are clipped (AIDO.Cell preprocessing).
CLIP_VALUE = 20.0
#: Floor of the depth tokens, in log10 units.
MIN_DEPTH = 5.0
#: Published state-dict names of the value embedding ``gene_embedding``.
_VALUE_EMBEDDING_NAMES = SoftBinNames("linear1", "linear2", "lookup_table", "mask_embedding", "pad_embedding")
_INPUT_MODES = ("code", "intended")


# ---------------------------------------------------------------------------------------------------
# weight files (safetensors, or tensor-only torch pickles)
# ---------------------------------------------------------------------------------------------------


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index).

    Raises
    ------
    CheckpointError
        When no weight file is found, the index is unreadable, or a file is unreadable or unsafe.
    """
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", _read_bin)):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' of name -> shard file") from e
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(reader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _read_bin(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, read without unpickling arbitrary objects."""
    state = read_torch_file(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AIDOCellConfig:
    """The architecture fields of a published AIDO.Cell ``config.json`` (``model_type: cellfoundation``).

    ``max_position_embeddings`` is the number of genes ``N``; the model holds ``N + 2`` positions.
    Published sizes: 3M = 128/6/4/320, 10M = 256/8/8/640, 100M = 640/18/20/1664
    (hidden/layers/heads/intermediate).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 19264
    bin_num: int = 100
    bin_alpha: float = 1.0
    layer_norm_eps: float = 1e-5
    normalization_type: str = "RMSNorm"
    add_linear_bias: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                  f"{self.num_attention_heads}")
        if self.normalization_type not in ("RMSNorm", "LayerNorm"):
            raise CheckpointError(f"normalization_type {self.normalization_type!r} is not RMSNorm or LayerNorm")

    @classmethod
    def from_json_dict(cls, d: Mapping[str, object]) -> AIDOCellConfig:
        """Read a published ``config.json``; unsupported variants raise :class:`CheckpointError`."""
        checks = {"model_type": "cellfoundation", "hidden_act": "swiglu", "position_embedding_type": "absolute"}
        for key, want in checks.items():
            if d.get(key, want) != want:
                raise CheckpointError(f"config.json: {key}={d[key]!r} is not supported (expected {want!r})")
        names = [f for f in cls.__dataclass_fields__ if f in d]
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        absent = [k for k in required if k not in d]
        if absent:
            raise CheckpointError(f"config.json: missing fields {absent}")
        try:
            return cls(**{k: d[k] for k in names})
        except TypeError as e:
            raise CheckpointError(f"config.json: a field has the wrong type ({e})") from e

    def to_json_dict(self) -> dict[str, object]:
        """The published ``config.json`` content (with the fixed fields of the HF config class)."""
        return {"architectures": ["CellFoundationModel"], "model_type": "cellfoundation", **asdict(self),
                "hidden_act": "swiglu", "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "pad_token_id": -2, "mask_token_id": -1,
                "vocab_size": 16, "initializer_range": 0.02, "_use_flash_attention_2": True}


# ---------------------------------------------------------------------------------------------------
# modules (attribute names = published state-dict names)
# ---------------------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 and scaled by ``weight`` (no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` → ``(..., dim)``."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(cfg: AIDOCellConfig) -> nn.Module:
    if cfg.normalization_type == "RMSNorm":
        return _RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _SelfProjections(nn.Module):
    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        d, bias = cfg.hidden_size, cfg.add_linear_bias
        self.query = nn.Linear(d, d, bias=bias)
        self.key = nn.Linear(d, d, bias=bias)
        self.value = nn.Linear(d, d, bias=bias)


class _SelfOutput(nn.Module):
    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.add_linear_bias)


class _Attention(nn.Module):
    """Pre-norm multi-head self-attention over the token (gene) axis, with its residual."""

    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.ln = _norm(cfg)
        self.self = _SelfProjections(cfg)
        self.output = _SelfOutput(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` → ``(B, L, d)``."""
        b, n, d = h.shape
        x = self.ln(h)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, heads, L, d / heads)
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(split(self.self.query(x)), split(self.self.key(x)),
                                             split(self.self.value(x)))
        return h + self.output.dense(ctx.transpose(1, 2).reshape(b, n, d))


class _SwiGLU(nn.Module):
    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        d, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.add_linear_bias
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` → ``(B, L, d)``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AIDOCellLayer(nn.Module):
    """One pre-norm encoder block: attention then SwiGLU MLP, each with a residual."""

    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.ln = _norm(cfg)
        self.mlp = _SwiGLU(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` → ``(B, L, d)``."""
        h = self.attention(h)
        return h + self.mlp(self.ln(h))


class _Encoder(LayerStack):
    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(AIDOCellLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln = _norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` → ``(B, L, d)`` after every block and the final norm."""
        return self.ln(self.run_layers(self.layer, h))


class AIDOCell(DepthTokenBackbone):
    """AIDO.Cell encoder implementing the :class:`~pertadapt.models.backbones.base.Backbone` protocol.

    Parameters
    ----------
    config
        Architecture; ``config.max_position_embeddings`` must equal ``len(genes)``.
    genes
        The ``N`` gene symbols of the vocabulary, in input order (one position each).
    input_mode
        ``"code"`` (reference behaviour, default) or ``"intended"``; see the module docstring.
    """

    def __init__(self, config: AIDOCellConfig, genes: Sequence[str], *, input_mode: str = "code") -> None:
        super().__init__()
        if len(genes) != config.max_position_embeddings:
            raise CheckpointError(f"aido_cell: {len(genes)} genes but max_position_embeddings="
                                  f"{config.max_position_embeddings}")
        if input_mode not in _INPUT_MODES:
            raise ValueError(f"aido_cell input_mode {input_mode!r} is not one of {', '.join(_INPUT_MODES)}")
        self.config = config
        self.genes: tuple[str, ...] | None = tuple(genes)
        self.hidden_size = config.hidden_size
        self.input_mode = input_mode
        self.gene_embedding = SoftBinEmbedding(config.bin_num, config.hidden_size, config.bin_alpha,
                                               _VALUE_EMBEDDING_NAMES)
        self.position_embedding = nn.Embedding(config.max_position_embeddings + N_DEPTH_TOKENS, config.hidden_size)
        self.encoder = _Encoder(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """HF-style init: N(0, 0.02) weights and zero biases (norm weights stay 1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()

    # -- Backbone protocol ------------------------------------------------------------------------

    def model_input(self, x_ctrl: torch.Tensor, total_count: torch.Tensor,
                    source_total: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, N + 2)`` sequence the encoder sees: gene values then two depth tokens, clipped at 20.

        Parameters
        ----------
        x_ctrl
            ``(B, N)`` log1p-normalised expression.
        total_count
            ``(B,)`` raw UMI totals (used by ``input_mode="intended"`` only).
        source_total
            Must be ``None``: which of AIDO.Cell's two depth tokens is the source depth is not published, so
            read-depth-aware inputs are refused (``objective.read_depth: rda`` is scFoundation's).

        Raises
        ------
        ValueError
            When ``source_total`` is given.
        """
        if source_total is not None:
            raise ValueError("aido_cell: a separate source read depth is not supported (its depth tokens' "
                             "target/source order is not published)")
        x = x_ctrl.float()
        if self.input_mode == "code":
            counts, depth_total = x, x.sum(dim=1)
        else:
            counts, depth_total = torch.expm1(x), total_count.float()
        size = counts.sum(dim=1, keepdim=True)
        values = torch.log1p(counts / size.clamp(min=torch.finfo(torch.float32).tiny) * 1e4)
        depth = torch.log10(depth_total).clamp(min=MIN_DEPTH)[:, None].expand(-1, N_DEPTH_TOKENS)
        return torch.cat([values, depth], dim=1).clamp(max=CLIP_VALUE)

    def forward_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Run the encoder on a prepared sequence.

        Parameters
        ----------
        values
            ``(B, N + 2)`` from :meth:`model_input`.

        Returns
        -------
        torch.Tensor
            ``(B, N + 2, hidden_size)`` last hidden states (depth tokens included).
        """
        dtype = self.position_embedding.weight.dtype
        h = self.gene_embedding(values.to(dtype)) + self.position_embedding.weight[: values.shape[1]]
        return self.encoder(h)

    def transformer_layers(self) -> list[nn.Module]:
        """The encoder blocks ``encoder.layer`` in order."""
        return list(self.encoder.layer)

    # -- checkpoints ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path, *, input_mode: str = "code") -> AIDOCell:
        """Load a checkpoint in the published HF layout from a local directory (no hub access).

        Raises
        ------
        CheckpointError
            When the config, the parameter names/shapes or the gene list do not fit.
        """
        directory = Path(directory)
        raw = read_json_object(directory / "config.json", "an AIDO.Cell HF checkpoint directory")
        cfg = AIDOCellConfig.from_json_dict(raw)
        genes = resolve_vocab(directory, cfg.max_position_embeddings, f"aido_cell checkpoint {directory}")
        model = cls(cfg, genes, input_mode=input_mode)
        load_checked_state(model, _strip_hf_prefix(_read_hf_weights(directory)), f"aido_cell checkpoint {directory}")
        log.info("loaded AIDO.Cell (%d layers, hidden %d, %d genes) from %s", cfg.num_hidden_layers,
                 cfg.hidden_size, len(genes), directory)
        return model

    def save_pretrained_dir(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (``CellFoundationModel`` names) and ``genes.txt``."""
        directory = Path(directory)
        atomic_write_json(directory / "config.json", self.config.to_json_dict())
        write_safetensors(directory / "model.safetensors", self.state_dict())
        write_gene_file(directory, self.genes or ())


def _strip_hf_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``bert.`` prefix of the HF task wrappers and their ``cls.*`` prediction head."""
    if not any(k.startswith("bert.") for k in state):
        return dict(state)
    head = [k for k in state if not k.startswith("bert.")]
    if head:
        log.debug("aido_cell: ignoring %d non-backbone keys (e.g. %s)", len(head), head[0])
    return {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}


def build_aido_cell(*, checkpoint: str | None, genes: Sequence[str] | None, hidden_size: int, layers: int,
                    heads: int, input_mode: str = "code") -> AIDOCell:
    """Registry builder for ``backbone.name: aido_cell``.

    Parameters
    ----------
    checkpoint
        Local HF-layout directory, or ``None`` for a random init with the given sizes.
    genes
        The data's gene order; must equal the checkpoint vocabulary (``None`` = bundled vocabulary for a
        random init, no check for a checkpoint).
    hidden_size, layers, heads
        Sizes of a random init (intermediate size ``2.5 × hidden``, as published); a checkpoint's own
        config wins over them.
    input_mode
        ``"code"`` or ``"intended"``.

    Raises
    ------
    CheckpointError
        Naming the first gene mismatches, or a layout/shape problem of the checkpoint.
    """
    def random_init(vocab: tuple[str, ...]) -> AIDOCell:
        cfg = AIDOCellConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=math.ceil(2.5 * hidden_size), max_position_embeddings=len(vocab))
        return AIDOCell(cfg, vocab, input_mode=input_mode)

    return build_or_load(checkpoint, genes, random_init=random_init, what="aido_cell",
                         load=lambda path: AIDOCell.from_pretrained_dir(path, input_mode=input_mode))


def aido_cell_from_options(options: AidoCellBackbone, *, genes: Sequence[str] | None, width: int) -> AIDOCell:
    """Registry builder for ``backbone: {name: aido_cell, ...}`` (see :func:`build_aido_cell`; ``width`` unused)."""
    return build_aido_cell(checkpoint=options.checkpoint, genes=genes, hidden_size=options.hidden_size,
                           layers=options.layers, heads=options.heads, input_mode=options.input_mode)
