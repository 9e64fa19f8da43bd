"""scFoundation (xTrimoGene ``mae_autobin``) as a PertAdapt backbone, loadable from the published ``models.ckpt``.

Architecture (modelgenerator 0.1.3 ``scfoundation``; biomap-research/scFoundation ``model/pretrainmodels``)
-----------------------------------------------------------------------------------------------------------
* Input sequence: the ``N`` log1p-normalised gene values followed by two depth tokens
  ``T = S = log10(total_count)`` (``bin_set=autobin_resolution_append``, ``highres=0``), length
  ``seq_len = N + 2``. Read-depth-aware pretraining gives ``S`` the total of the down-sampled input cell.
* ``token_emb`` (auto-discretisation): ``Linear(1→bin_num)`` → LeakyReLU(0.1) → residual
  ``Linear(bin_num→bin_num)`` → softmax → weighted sum of ``bin_num`` bin embeddings; ``emb_pad`` fills
  padding slots. ``pos_emb`` is a gene-ID embedding with ``seq_len + 1`` rows (the last = padding).
* Encoder (``nn.TransformerEncoderLayer``-style, post-norm, ReLU, FFN 4×, dropout 0.1) on the
  **non-zero** tokens only (ascending gene order, padded per batch), then ``encoder.norm``.
* Decoder input: ``token_emb`` of **all** tokens, with the encoder outputs scattered back into the
  non-zero positions, plus ``pos_emb`` again, then ``decoder_embed`` (enc_dim → dec_dim); a pre-norm
  Performer (FAVOR+ softmax-kernel attention, GELU FFN 4×) and ``decoder.norm``; then the model's
  ``norm``. The embedding is that output without the two depth tokens; ``to_final`` is kept for the
  layout only (the reference sets it to ``None``).

Differences from the shipped code, on purpose
---------------------------------------------
* FAVOR+ is implemented exactly (non-causal, the stored ``projection_matrix``), except that the key
  stabiliser ``max`` is taken per cell instead of over the whole batch, so a cell's embedding does not
  depend on its batch-mates (the max cancels except for the kernel's ``1e-4`` epsilon).
* Random features are never redrawn (``calls_since_last_redraw`` is kept only for the layout); the
  reference redraws every 1,000 training calls, which never happens with the paper's frozen backbone.
* The loader runs on CPU (the original calls ``.cuda()``) and reads the checkpoint with
  ``torch.load(weights_only=True)`` only: a file holding other pickled objects is refused.

Checkpoint layout
-----------------
``models.ckpt`` (a file, or a directory holding it) is a ``torch.save`` dict; the entry ``gene`` is
``{"config": {"model": "mae_autobin", "model_config": {"mae_autobin": {...}}, "dataset_config":
{"rnaseq": {...}}}, "state_dict": {"model.<name>": tensor}}``. The merged config holds ``seq_len``,
``n_class``, ``bin_num``, ``bin_alpha``, ``pad_token_id``, ``mask_token_id`` and ``encoder``/``decoder``
dicts (``hidden_dim``, ``depth``, ``heads``, ``dim_head``, ``module_type``). Published sizes: encoder
768/12 layers/12 heads, decoder 512/6/8, dim_head 64, ``seq_len`` 19,266. The vocabulary is
``genes.txt`` beside the file, else the bundled 19,264 genes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pertadapt.config.components import ScFoundationBackbone
from pertadapt.files import atomic_write
from pertadapt.models.backbones.checkpoint import (
    CheckpointError,
    build_or_load,
    load_checked_state,
    read_torch_file,
    resolve_vocab,
    write_gene_file,
)
from pertadapt.models.backbones.layers import (
    N_DEPTH_TOKENS,
    DepthTokenBackbone,
    LayerStack,
    SoftBinEmbedding,
    SoftBinNames,
)

__all__ = ["SCFoundation", "SCFoundationConfig", "build_scfoundation", "scfoundation_from_options"]

log = logging.getLogger(__name__)

CKPT_FILE = "models.ckpt"
#: Entry of ``models.ckpt`` holding the gene-expression model.
CKPT_KEY = "gene"
_KERNEL_EPS = 1e-4
#: Published state-dict names of the value embedding ``token_emb``.
_TOKEN_EMBEDDING_NAMES = SoftBinNames("mlp", "mlp2", "emb", "emb_mask", "emb_pad")


@dataclass(frozen=True)
class SCFoundationConfig:
    """Architecture of an scFoundation ``mae_autobin`` model (fields of the published config).

    ``seq_len`` counts the genes plus the two depth tokens. ``nb_features`` (FAVOR+ random features)
    defaults to ``int(dim_head · ln dim_head)`` as in the reference.
    """

    seq_len: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    decoder_dim_head: int
    bin_num: int = 100
    bin_alpha: float = 1.0
    n_class: int = 104
    pad_token_id: int = 103
    mask_token_id: int = 102
    encoder_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder_dim % self.encoder_heads:
            raise CheckpointError(f"scfoundation: encoder hidden_dim {self.encoder_dim} is not divisible by "
                                  f"{self.encoder_heads} heads")

    @property
    def nb_features(self) -> int:
        """FAVOR+ random features per decoder head."""
        return int(self.decoder_dim_head * math.log(self.decoder_dim_head))

    @classmethod
    def from_checkpoint_config(cls, config: Mapping[str, object]) -> SCFoundationConfig:
        """Read the ``config`` entry of a published checkpoint (``model_config`` merged with ``dataset_config``).

        Raises
        ------
        CheckpointError
            For another model type, other encoder/decoder modules, or missing fields.
        """
        try:
            model_type = config["model"]
            merged = {**config["model_config"][model_type], **config.get("dataset_config", {}).get("rnaseq", {})}
            enc, dec = merged["encoder"], merged["decoder"]
            if model_type != "mae_autobin" or enc["module_type"] != "transformer" or dec["module_type"] != "performer":
                raise CheckpointError(f"scfoundation: unsupported model {model_type!r} with encoder "
                                      f"{enc['module_type']!r} / decoder {dec['module_type']!r} (expected "
                                      "mae_autobin, transformer, performer)")
            return cls(seq_len=merged["seq_len"], encoder_dim=enc["hidden_dim"], encoder_depth=enc["depth"],
                       encoder_heads=enc["heads"], decoder_dim=dec["hidden_dim"], decoder_depth=dec["depth"],
                       decoder_heads=dec["heads"], decoder_dim_head=dec.get("dim_head", 64),
                       bin_num=merged["bin_num"], bin_alpha=merged.get("bin_alpha", 1.0),
                       n_class=merged["n_class"], pad_token_id=merged["pad_token_id"],
                       mask_token_id=merged["mask_token_id"])
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"scfoundation: checkpoint config lacks field {e}") from e

    def to_checkpoint_config(self) -> dict[str, object]:
        """The published ``config`` entry (everything under ``model_config.mae_autobin``)."""
        return {"model": "mae_autobin", "dataset_config": {"rnaseq": {}}, "model_config": {"mae_autobin": {
            "model": "mae_autobin", "seq_len": self.seq_len, "n_class": self.n_class, "bin_num": self.bin_num,
            "bin_alpha": self.bin_alpha, "pad_token_id": self.pad_token_id, "mask_token_id": self.mask_token_id,
            "encoder": {"hidden_dim": self.encoder_dim, "depth": self.encoder_depth, "heads": self.encoder_heads,
                        "dim_head": self.encoder_dim // self.encoder_heads, "module_type": "transformer"},
            "decoder": {"hidden_dim": self.decoder_dim, "depth": self.decoder_depth, "heads": self.decoder_heads,
                        "dim_head": self.decoder_dim_head, "module_type": "performer"}}}}


# ---------------------------------------------------------------------------------------------------
# modules (attribute names = published state-dict names)
# ---------------------------------------------------------------------------------------------------


class _PackedSelfAttention(nn.Module):
    """Multi-head self-attention with a packed ``in_proj`` (``nn.MultiheadAttention`` parameter names)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)`` with ``(B, L)`` bool key validity → ``(B, L, dim)``."""
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # a row with no valid key (an all-zero cell) attends to itself instead of producing NaN
        mask = key_valid[:, None, None, :] | ~key_valid.any(dim=1)[:, None, None, None]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, n, d))


class _EncoderLayer(nn.Module):
    """Post-norm transformer block (``nn.TransformerEncoderLayer`` defaults: ReLU, FFN 4×, dropout)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = _PackedSelfAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)`` → ``(B, L, dim)``."""
        x = self.norm1(x + self.drop(self.self_attn(x, key_valid)))
        return self.norm2(x + self.drop(self.linear2(self.drop(F.relu(self.linear1(x))))))


class _Encoder(LayerStack):
    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            _EncoderLayer(cfg.encoder_dim, cfg.encoder_heads, cfg.encoder_dropout) for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(cfg.encoder_dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """``(B, M, enc_dim)`` non-zero tokens (``(B, M)`` validity) → ``(B, M, enc_dim)``."""
        return self.norm(self.run_layers(self.transformer_encoder, x, key_valid))


def orthogonal_random_features(nb_features: int, dim_head: int, generator: torch.Generator | None = None
                               ) -> torch.Tensor:
    """FAVOR+ projection: stacked orthogonal blocks with Gaussian row norms.

    Returns
    -------
    torch.Tensor
        ``(nb_features, dim_head)``.
    """
    blocks = []
    for _ in range(math.ceil(nb_features / dim_head)):
        q, _ = torch.linalg.qr(torch.randn(dim_head, dim_head, generator=generator))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:nb_features]
    return torch.randn(nb_features, dim_head, generator=generator).norm(dim=1)[:, None] * rows


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Non-causal FAVOR+ (positive softmax-kernel random features) attention, linear in length.

    Parameters
    ----------
    q, k, v
        ``(B, H, L, e)``.
    projection
        ``(m, e)`` random features.

    Returns
    -------
    torch.Tensor
        ``(B, H, L, e)`` ≈ ``softmax(q kᵀ / √e) v``.
    """
    scale = q.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    proj = projection.to(q.dtype)

    def parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (scale * x) @ proj.T, (x * x).sum(-1, keepdim=True) * (scale * scale / 2)

    qd, qn = parts(q)
    kd, kn = parts(k)
    qf = ratio * (torch.exp(qd - qn - qd.amax(dim=-1, keepdim=True)) + _KERNEL_EPS)
    kf = ratio * (torch.exp(kd - kn - kd.amax(dim=(1, 2, 3), keepdim=True)) + _KERNEL_EPS)
    denom = torch.einsum("bhlm,bhm->bhl", qf, kf.sum(dim=-2))
    context = torch.einsum("bhlm,bhle->bhme", kf, v)
    return torch.einsum("bhlm,bhme->bhle", qf, context) / denom[..., None]


class _FastAttention(nn.Module):
    """Holds the FAVOR+ ``projection_matrix`` buffer (``(nb_features, dim_head)``)."""

    def __init__(self, nb_features: int, dim_head: int) -> None:
        super().__init__()
        self.register_buffer("projection_matrix", orthogonal_random_features(nb_features, dim_head))


class _PerformerAttention(nn.Module):
    """Performer self-attention: biased q/k/v projections, FAVOR+, output projection."""

    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__()
        inner = cfg.decoder_heads * cfg.decoder_dim_head
        self.heads = cfg.decoder_heads
        self.fast_attention = _FastAttention(cfg.nb_features, cfg.decoder_dim_head)
        self.to_q = nn.Linear(cfg.decoder_dim, inner)
        self.to_k = nn.Linear(cfg.decoder_dim, inner)
        self.to_v = nn.Linear(cfg.decoder_dim, inner)
        self.to_out = nn.Linear(inner, cfg.decoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dec_dim)`` → ``(B, L, dec_dim)``."""
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        out = favor_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
                              self.fast_attention.projection_matrix)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim)
        self.w2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)`` → ``(B, L, dim)``."""
        return self.w2(F.gelu(self.w1(x)))


class _Holder(nn.Module):
    """``fn`` container reproducing the reference's ``Chunk(fn)`` level of the parameter path."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``fn``."""
        return self.fn(x)


class _PreNorm(nn.Module):
    """``x ↦ fn(LayerNorm(x))`` (the residual is added by the block)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dim)`` → ``(B, L, dim)``."""
        return self.fn(self.norm(x))


class PerformerBlock(nn.ModuleList):
    """``[PreNorm(attention), PreNorm(FFN)]`` with residuals (state-dict indices ``0`` and ``1``)."""

    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__([_PreNorm(cfg.decoder_dim, _PerformerAttention(cfg)),
                          _PreNorm(cfg.decoder_dim, _Holder(_FeedForward(cfg.decoder_dim)))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dec_dim)`` → ``(B, L, dec_dim)``."""
        attn, ff = self[0], self[1]
        x = x + attn(x)
        return x + ff(x)


class _Net(nn.Module):
    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PerformerBlock(cfg) for _ in range(cfg.decoder_depth))


class _Performer(LayerStack):
    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__()
        self.net = _Net(cfg)
        # layout only: the reference's redraw counter (projections are never redrawn here)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dec_dim)`` through every Performer block in order."""
        return self.run_layers(self.net.layers, x)


class _Decoder(nn.Module):
    def __init__(self, cfg: SCFoundationConfig) -> None:
        super().__init__()
        self.performer = _Performer(cfg)
        self.norm = nn.LayerNorm(cfg.decoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, dec_dim)`` → ``(B, L, dec_dim)``: the Performer, then the final norm."""
        return self.norm(self.performer(x))


class SCFoundation(DepthTokenBackbone):
    """scFoundation encoder–decoder implementing the :class:`~pertadapt.models.backbones.base.Backbone` protocol.

    Parameters
    ----------
    config
        Architecture; ``config.seq_len`` must equal ``len(genes) + 2``.
    genes
        Gene vocabulary in input order (``N`` symbols).
    """

    def __init__(self, config: SCFoundationConfig, genes: Sequence[str]) -> None:
        super().__init__()
        if len(genes) + N_DEPTH_TOKENS != config.seq_len:
            raise CheckpointError(f"scfoundation: {len(genes)} genes but seq_len={config.seq_len} "
                                  f"(expected genes + {N_DEPTH_TOKENS})")
        self.config = config
        self.genes: tuple[str, ...] | None = tuple(genes)
        self.hidden_size = config.decoder_dim
        self.token_emb = SoftBinEmbedding(config.bin_num, config.encoder_dim, config.bin_alpha,
                                          _TOKEN_EMBEDDING_NAMES)
        self.pos_emb = nn.Embedding(config.seq_len + 1, config.encoder_dim)
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.decoder_embed = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.norm = nn.LayerNorm(config.decoder_dim)
        # layout only: the pretraining value head (the reference sets it to None for embeddings)
        self.to_final = nn.Linear(config.decoder_dim, 1)

    @staticmethod
    def model_input(x_ctrl: torch.Tensor, total_count: torch.Tensor,
                    source_total: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` log1p values and ``(B,)`` raw totals → ``(B, N + 2)`` sequence ``[x, T, S]``.

        ``T = log10(total_count)`` (the target depth) and ``S = log10(source_total)`` (the depth of the input
        cell: a down-sampled copy in read-depth-aware pretraining); without ``source_total``, ``S = T``.
        """
        target = torch.log10(total_count.to(x_ctrl.dtype))
        source = target if source_total is None else torch.log10(source_total.to(x_ctrl.dtype))
        return torch.cat([x_ctrl, target[:, None], source[:, None]], dim=1)

    def forward_tokens(self, seq: torch.Tensor) -> torch.Tensor:
        """Run encoder (non-zero tokens) and decoder (all tokens).

        Parameters
        ----------
        seq
            ``(B, L)`` values from :meth:`model_input` (``L = seq_len``).

        Returns
        -------
        torch.Tensor
            ``(B, L, decoder_dim)`` normalised decoder outputs (depth tokens included).
        """
        seq = seq.to(self.pos_emb.weight.dtype)
        return self.encode_gathered(seq, *self.nonzero_tokens(seq))

    @staticmethod
    def nonzero_tokens(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the encoder's tokens come from: ``(B, M)`` positions of each cell's non-zero values first
        (ascending; ``M`` = the batch's most non-zeros) and ``(B, M)`` which of them are real."""
        nonzero = seq > 0
        n_nonzero = nonzero.sum(dim=1)
        width = int(n_nonzero.max())
        order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :width]  # non-zeros first, ascending
        valid = torch.arange(width, device=seq.device)[None, :] < n_nonzero[:, None]
        return order, valid

    def encode_gathered(self, seq: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Encoder over the gathered non-zero tokens, decoder over all: ``(B, L)`` sequence, ``(B, M)`` from
        :meth:`nonzero_tokens` → ``(B, L, decoder_dim)``."""
        enc = torch.where(valid[..., None], self.token_emb(seq.gather(1, order)), self.token_emb.pad_row)
        enc = enc + self.pos_emb(torch.where(valid, order, self.config.seq_len))
        enc = self.encoder(enc, valid)
        dec = self.token_emb(seq).masked_scatter((seq > 0)[..., None], enc[valid])
        dec = self.decoder_embed(dec + self.pos_emb.weight[: seq.shape[1]])
        return self.norm(self.decoder(dec))

    def transformer_layers(self) -> list[nn.Module]:
        """Encoder blocks then Performer decoder blocks, in execution order."""
        return [*self.encoder.transformer_encoder, *self.decoder.performer.net.layers]

    # -- checkpoints ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> SCFoundation:
        """Load the ``gene`` model of a published ``models.ckpt`` (a file, or a directory holding it).

        The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
        arbitrary pickled objects.

        Parameters
        ----------
        path
            ``models.ckpt`` or its directory; a ``genes.txt`` beside it overrides the bundled vocabulary.

        Raises
        ------
        CheckpointError
            When the file is unreadable or holds other objects, or the layout, parameter names/shapes or
            the gene list do not fit.
        """
        path = Path(path)
        file = path / CKPT_FILE if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"scfoundation: {file} does not exist")
        raw = read_torch_file(file)
        if not isinstance(raw, Mapping) or CKPT_KEY not in raw:
            keys = list(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise CheckpointError(f"scfoundation: {file} has no {CKPT_KEY!r} entry (found {keys})")
        entry = raw[CKPT_KEY]
        if not (isinstance(entry, Mapping) and isinstance(entry.get("config"), Mapping)
                and isinstance(entry.get("state_dict"), Mapping)):
            raise CheckpointError(f"scfoundation: {file}: entry {CKPT_KEY!r} must map 'config' and 'state_dict' "
                                  "to dicts")
        cfg = SCFoundationConfig.from_checkpoint_config(entry["config"])
        genes = resolve_vocab(file.parent, cfg.seq_len - N_DEPTH_TOKENS, f"scfoundation checkpoint {file}")
        model = cls(cfg, genes)
        state = {k.removeprefix("model."): v for k, v in entry["state_dict"].items()}
        load_checked_state(model, state, f"scfoundation checkpoint {file}")
        log.info("loaded scFoundation (encoder %d×%d, decoder %d×%d, %d genes) from %s", cfg.encoder_depth,
                 cfg.encoder_dim, cfg.decoder_depth, cfg.decoder_dim, len(genes), file)
        return model

    def save_pretrained_dir(self, directory: str | Path) -> None:
        """Write ``models.ckpt`` in the published layout and ``genes.txt`` into ``directory``."""
        directory = Path(directory)
        state = {f"model.{k}": v.detach().clone() for k, v in self.state_dict().items()}
        ckpt = {CKPT_KEY: {"config": self.config.to_checkpoint_config(), "state_dict": state}}
        atomic_write(directory / CKPT_FILE, lambda p: torch.save(ckpt, p))
        write_gene_file(directory, self.genes or ())


def build_scfoundation(*, checkpoint: str | None, genes: Sequence[str] | None, hidden_size: int, layers: int,
                       heads: int) -> SCFoundation:
    """Registry builder for ``backbone.name: scfoundation``.

    Parameters
    ----------
    checkpoint
        ``models.ckpt`` or its directory, or ``None`` for a random init.
    genes
        The data's gene order; must equal the checkpoint vocabulary (``None`` = bundled vocabulary for a
        random init, no check for a checkpoint).
    hidden_size, layers, heads
        Random init: encoder and decoder width ``hidden_size``, ``layers`` encoder blocks and
        ``max(1, layers // 2)`` decoder blocks (the published 12:6 ratio), ``heads`` heads each.

    Raises
    ------
    CheckpointError
        Naming the first gene mismatches, or a layout/shape problem of the checkpoint.
    """
    def random_init(vocab: tuple[str, ...]) -> SCFoundation:
        cfg = SCFoundationConfig(seq_len=len(vocab) + N_DEPTH_TOKENS, encoder_dim=hidden_size, encoder_depth=layers,
                                 encoder_heads=heads, decoder_dim=hidden_size, decoder_depth=max(1, layers // 2),
                                 decoder_heads=heads, decoder_dim_head=hidden_size // heads)
        return SCFoundation(cfg, vocab)

    return build_or_load(checkpoint, genes, random_init=random_init, load=SCFoundation.from_pretrained_dir,
                         what="scfoundation")


def scfoundation_from_options(options: ScFoundationBackbone, *, genes: Sequence[str] | None,
                              width: int) -> SCFoundation:
    """Registry builder for ``backbone: {name: scfoundation, ...}`` (see :func:`build_scfoundation`)."""
    return build_scfoundation(checkpoint=options.checkpoint, genes=genes, hidden_size=options.hidden_size,
                              layers=options.layers, heads=options.heads)
