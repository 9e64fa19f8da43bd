"""AIDO.Cell (GenBio AI ``cellfoundation``) as a PertAdapt backbone, loadable from the published HF layout.

Architecture (method.md §1.3, §12; ``genbio-ai/AIDO.Cell-{3M,10M,100M}``)
-------------------------------------------------------------------------
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
(method.md §9.3), so AIDO.Cell normalises a second time and its depth tokens come from ``Σ log1p``:
``input_mode="code"`` (default, reproduces published numbers). ``input_mode="intended"`` undoes the
data's log1p (``expm1``), applies AIDO.Cell's own ``log1p(x / Σx · 1e4)`` and takes the depth tokens
from the raw ``total_count`` — exactly AIDO.Cell's preprocessing of counts.

Checkpoint layout
-----------------
A directory with ``config.json`` (HF ``model_type: cellfoundation``; fields ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``max_position_embeddings`` = N,
``bin_num``, ``bin_alpha``, ``layer_norm_eps``, ``normalization_type``, ``add_linear_bias``,
``hidden_act: swiglu``, ``position_embedding_type: absolute``) and ``model.safetensors`` or
``pytorch_model.bin`` (optionally sharded with an ``*.index.json``). State-dict names are those of
``CellFoundationModel``, with or without the ``bert.`` prefix of the ``…ForMaskedLM`` wrappers (whose
``cls.*`` head is ignored). The gene vocabulary is read from ``genes.txt`` (one symbol per line) or
``OS_scRNA_gene_index.19264.tsv`` in the directory, else the bundled 19,264-gene list when ``N`` is
19,264.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AIDOCell",
    "AIDOCellConfig",
    "CheckpointError",
    "bundled_gene_vocab",
    "build_aido_cell",
    "check_state_dict",
    "check_vocabulary",
    "read_gene_file",
    "read_safetensors",
    "resolve_vocab",
    "write_safetensors",
]

log = logging.getLogger(__name__)

#: Number of read-depth tokens appended after the genes.
N_DEPTH_TOKENS = 2
#: Values above this are clipped (AIDO.Cell preprocessing).
CLIP_VALUE = 20.0
#: Floor of the depth tokens, in log10 units.
MIN_DEPTH = 5.0
#: File name of the gene vocabulary written next to our checkpoints.
GENES_FILE = "genes.txt"
_TSV_VOCAB = "OS_scRNA_gene_index.19264.tsv"
_INPUT_MODES = ("code", "intended")


class CheckpointError(ValueError):
    """A checkpoint that does not fit: wrong layout, parameter names/shapes or gene vocabulary."""


# ---------------------------------------------------------------------------------------------------
# gene vocabularies (shared with the scFoundation loader)
# ---------------------------------------------------------------------------------------------------


def bundled_gene_vocab() -> tuple[str, ...]:
    """The 19,264-gene input vocabulary of AIDO.Cell and scFoundation, in model order."""
    text = resources.files("pertadapt").joinpath("resources/fm_gene_vocab_19264.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_gene_file(directory: Path) -> tuple[str, ...] | None:
    """Gene vocabulary stored in a checkpoint directory, or ``None`` when it holds none.

    Reads ``genes.txt`` (one symbol per line) or the published ``OS_scRNA_gene_index.19264.tsv``
    (column ``gene_name``).
    """
    plain = directory / GENES_FILE
    if plain.is_file():
        return tuple(line.strip() for line in plain.read_text().splitlines() if line.strip())
    tsv = directory / _TSV_VOCAB
    if tsv.is_file():
        rows = [line.split("\t") for line in tsv.read_text().splitlines() if line.strip()]
        col = rows[0].index("gene_name")
        return tuple(r[col] for r in rows[1:])
    return None


def resolve_vocab(directory: Path, n_genes: int, what: str) -> tuple[str, ...]:
    """The gene vocabulary of a checkpoint with ``n_genes`` gene positions.

    Raises
    ------
    CheckpointError
        When the stored list has another length, or no list is stored and ``n_genes`` is not 19,264.
    """
    genes = read_gene_file(directory)
    if genes is None:
        genes = bundled_gene_vocab()
        if n_genes != len(genes):
            raise CheckpointError(f"{what}: the model has {n_genes} gene positions but {directory} holds no "
                                  f"{GENES_FILE}; only the bundled {len(genes)}-gene vocabulary is known")
    if len(genes) != n_genes:
        raise CheckpointError(f"{what}: the gene list has {len(genes)} genes but the model has {n_genes} "
                              "gene positions")
    return genes


def check_vocabulary(data_genes: Sequence[str], model_genes: Sequence[str], what: str) -> None:
    """Require the data's gene order to equal a checkpoint's vocabulary.

    Raises
    ------
    CheckpointError
        Naming the lengths and the first mismatching positions (``index: data gene != model gene``).
    """
    data_genes, model_genes = tuple(data_genes), tuple(model_genes)
    if data_genes == model_genes:
        return
    bad = [f"{i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(data_genes, model_genes, strict=False))
           if a != b][:5]
    missing = [g for g in model_genes if g not in set(data_genes)][:5]
    raise CheckpointError(
        f"{what}: data genes ({len(data_genes)}) do not match the checkpoint vocabulary ({len(model_genes)}); "
        f"first mismatches (data != checkpoint): {bad or 'none in the common prefix'}; "
        f"checkpoint genes absent from the data: {missing or 'none'}")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Require ``state`` to have exactly the model's parameter/buffer names and shapes.

    Raises
    ------
    CheckpointError
        Naming missing and unexpected keys and every shape mismatch (checkpoint vs model).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (first: {missing[:5]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (first: {unexpected[:5]})")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:5]}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# safetensors (the format is small and documented; the package is not a dependency here)
# ---------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file: 8-byte little-endian header length, JSON header, raw data.

    Returns
    -------
    dict[str, torch.Tensor]
        Tensors on CPU with the stored dtypes and shapes.
    """
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = bytearray(raw[8 + n:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) \
            if end > begin else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"]).clone()
    return out


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a ``.safetensors`` file (``{"format": "pt"}`` metadata, 8-byte aligned header)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", _torch_load)):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(reader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _torch_load(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
        return cls(**{k: d[k] for k in names})

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


class _ValueEmbedding(nn.Module):
    """Auto-discretisation of a scalar value into a softmax mixture of ``bin_num`` learned bins."""

    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.bin_alpha = cfg.bin_alpha
        self.linear1 = nn.Linear(1, cfg.bin_num)
        self.linear2 = nn.Linear(cfg.bin_num, cfg.bin_num)
        self.lookup_table = nn.Embedding(cfg.bin_num, cfg.hidden_size)
        self.mask_embedding = nn.Embedding(1, cfg.hidden_size)
        self.pad_embedding = nn.Embedding(1, cfg.hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` values → ``(B, L, hidden)`` token embeddings."""
        h = F.leaky_relu(self.linear1(values[..., None]), 0.1)
        h = self.bin_alpha * h + self.linear2(h)
        return torch.softmax(h, dim=-1) @ self.lookup_table.weight


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


class _Encoder(nn.Module):
    def __init__(self, cfg: AIDOCellConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(AIDOCellLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln = _norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` → ``(B, L, d)`` after every block and the final norm."""
        for layer in self.layer:
            h = layer(h)
        return self.ln(h)


class AIDOCell(nn.Module):
    """AIDO.Cell encoder implementing the :class:`~pertadapt.models.backbones.base.Backbone` protocol.

    Parameters
    ----------
    config
        Architecture; ``config.max_position_embeddings`` must equal ``len(genes)``.
    genes
        Gene vocabulary in input order (``N`` symbols).
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
        self.gene_embedding = _ValueEmbedding(config)
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

    def model_input(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        """The ``(B, N + 2)`` sequence the encoder sees: gene values then two depth tokens, clipped at 20.

        Parameters
        ----------
        x_ctrl
            ``(B, N)`` log1p-normalised expression.
        total_count
            ``(B,)`` raw UMI totals (used by ``input_mode="intended"`` only).
        """
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

    def encode(self, x_ctrl: torch.Tensor, total_count: torch.Tensor) -> torch.Tensor:
        """Embed control cells gene by gene.

        Parameters
        ----------
        x_ctrl
            ``(B, N)`` log1p-normalised expression in :attr:`genes` order.
        total_count
            ``(B,)`` raw UMI totals.

        Returns
        -------
        torch.Tensor
            ``(B, N, hidden_size)`` last hidden states with the two depth tokens dropped.
        """
        return self.forward_tokens(self.model_input(x_ctrl, total_count))[:, :-N_DEPTH_TOKENS]

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
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: no config.json (expected an AIDO.Cell HF checkpoint directory)")
        cfg = AIDOCellConfig.from_json_dict(json.loads(config_path.read_text()))
        genes = resolve_vocab(directory, cfg.max_position_embeddings, f"aido_cell checkpoint {directory}")
        model = cls(cfg, genes, input_mode=input_mode)
        state = _strip_hf_prefix(_read_hf_weights(directory))
        check_state_dict(model, state, f"aido_cell checkpoint {directory}")
        model.load_state_dict(state)
        log.info("loaded AIDO.Cell (%d layers, hidden %d, %d genes) from %s", cfg.num_hidden_layers,
                 cfg.hidden_size, len(genes), directory)
        return model

    def save_pretrained_dir(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (``CellFoundationModel`` names) and ``genes.txt``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_json_dict(), indent=2) + "\n")
        write_safetensors(directory / "model.safetensors", self.state_dict())
        (directory / GENES_FILE).write_text("\n".join(self.genes or ()) + "\n")


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
    if checkpoint is None:
        vocab = tuple(genes) if genes is not None else bundled_gene_vocab()
        cfg = AIDOCellConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=math.ceil(2.5 * hidden_size), max_position_embeddings=len(vocab))
        return AIDOCell(cfg, vocab, input_mode=input_mode)
    model = AIDOCell.from_pretrained_dir(checkpoint, input_mode=input_mode)
    if genes is not None:
        check_vocabulary(genes, model.genes or (), f"aido_cell checkpoint {checkpoint}")
    return model
