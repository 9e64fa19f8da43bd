"""scFoundation backbone: published models.ckpt round trip, encoder/decoder semantics, mismatch errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pertadapt.models.backbones.base import Backbone
from pertadapt.models.backbones.checkpoint import CheckpointError
from pertadapt.models.backbones.scfoundation import (
    SCFoundation,
    build_scfoundation,
    favor_attention,
    orthogonal_random_features,
)

GENES = [f"GENE{i}" for i in range(30)]


def _model() -> SCFoundation:
    torch.manual_seed(0)
    return build_scfoundation(checkpoint=None, genes=GENES, hidden_size=32, layers=2, heads=4).eval()


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, len(GENES), generator=g) * 3
    x[x < 1.2] = 0.0  # sparse cells with different non-zero counts
    x[2, 5:] = 0.0
    return x, torch.tensor([2e3, 3e4, 150.0])


def test_published_names_and_protocol() -> None:
    m = _model()
    assert isinstance(m, Backbone)
    names = set(m.state_dict())
    for key in ("token_emb.mlp.weight", "token_emb.mlp2.weight", "token_emb.emb.weight", "token_emb.emb_mask.weight",
                "token_emb.emb_pad.weight", "pos_emb.weight",
                "encoder.transformer_encoder.1.self_attn.in_proj_weight",
                "encoder.transformer_encoder.0.self_attn.in_proj_bias",
                "encoder.transformer_encoder.0.self_attn.out_proj.weight", "encoder.transformer_encoder.0.linear1.weight",
                "encoder.transformer_encoder.0.linear2.bias", "encoder.transformer_encoder.0.norm1.weight",
                "encoder.transformer_encoder.0.norm2.bias", "encoder.norm.weight",
                "decoder.performer.net.layers.0.0.norm.weight",
                "decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix",
                "decoder.performer.net.layers.0.0.fn.to_q.bias", "decoder.performer.net.layers.0.0.fn.to_out.weight",
                "decoder.performer.net.layers.0.1.fn.fn.w1.weight", "decoder.performer.net.layers.0.1.fn.fn.w2.bias",
                "decoder.performer.calls_since_last_redraw", "decoder.norm.weight", "decoder_embed.weight",
                "norm.weight", "to_final.weight"):
        assert key in names, key
    assert m.pos_emb.weight.shape == (len(GENES) + 3, 32)  # seq_len + 1 (padding position)
    assert len(m.transformer_layers()) == 3  # 2 encoder + 1 decoder blocks


def test_encoder_layer_matches_torch_transformer_layer() -> None:
    """Our encoder block with the published names computes what nn.TransformerEncoderLayer does."""
    m = _model()
    ours = m.encoder.transformer_encoder[0]
    ref = nn.TransformerEncoderLayer(32, 4, 128, batch_first=True).eval()
    ref.load_state_dict({k.replace("drop.", ""): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    with torch.no_grad():
        got, want = ours(x, valid), ref(x, src_key_padding_mask=~valid)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_favor_approximates_softmax_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) * 0.5 for _ in range(3))
    approx = favor_attention(q, k, v, orthogonal_random_features(4096, 16, g))
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (approx - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_encode_shape_zero_genes_and_batch_independence() -> None:
    m = _model()
    x, total = _cells()
    e = m.encode(x, total)
    assert e.shape == (3, len(GENES), 32)
    assert bool(e.isfinite().all())
    # each cell alone gives its batch embedding (padding of the non-zero encoder input is inert)
    for i in range(3):
        torch.testing.assert_close(m.encode(x[i:i + 1], total[i:i + 1]), e[i:i + 1], atol=1e-5, rtol=1e-5)
    # the depth tokens enter the model
    assert not torch.allclose(m.encode(x, total * 10), e)
    # an all-zero cell with total 1 (no non-zero token at all) still embeds
    assert bool(m.encode(torch.zeros(1, len(GENES)), torch.tensor([1.0])).isfinite().all())


def test_save_load_roundtrip_identical(tmp_path) -> None:
    m = _model()
    x, total = _cells()
    m.save_pretrained_dir(tmp_path)
    raw = torch.load(tmp_path / "models.ckpt", weights_only=True)
    assert raw["gene"]["config"]["model"] == "mae_autobin"
    assert raw["gene"]["config"]["model_config"]["mae_autobin"]["decoder"]["module_type"] == "performer"
    assert all(k.startswith("model.") for k in raw["gene"]["state_dict"])
    for path in (tmp_path, tmp_path / "models.ckpt"):
        loaded = SCFoundation.from_pretrained_dir(path).eval()
        assert loaded.genes == tuple(GENES)
        assert torch.equal(loaded.encode(x, total), m.encode(x, total))


def test_bundled_vocabulary_when_no_gene_file() -> None:
    m = build_scfoundation(checkpoint=None, genes=None, hidden_size=8, layers=1, heads=2)
    assert len(m.genes) == 19264
    assert m.genes[0] == "A1BG"


def test_build_checks_gene_vocabulary(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    assert build_scfoundation(checkpoint=str(tmp_path), genes=GENES, hidden_size=8, layers=1, heads=1).hidden_size == 32
    wrong = ["TP53", *GENES[1:]]
    with pytest.raises(CheckpointError, match=r"0: 'TP53' != 'GENE0'.*absent from the data: \['GENE0'\]"):
        build_scfoundation(checkpoint=str(tmp_path), genes=wrong, hidden_size=8, layers=1, heads=1)


def test_shape_mismatch_and_layout_errors(tmp_path) -> None:
    m = _model()
    m.save_pretrained_dir(tmp_path)
    raw = torch.load(tmp_path / "models.ckpt", weights_only=True)
    raw["gene"]["state_dict"]["model.decoder_embed.weight"] = torch.zeros(16, 32)
    torch.save(raw, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"decoder_embed\.weight: checkpoint \(16, 32\) vs model \(32, 32\)"):
        SCFoundation.from_pretrained_dir(tmp_path)
    torch.save({"cell": raw["gene"]}, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"no 'gene' entry \(found \['cell'\]\)"):
        SCFoundation.from_pretrained_dir(tmp_path)
    raw["gene"]["config"]["model_config"]["mae_autobin"]["decoder"]["module_type"] = "performer_gau"
    torch.save(raw, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match="unsupported model"):
        SCFoundation.from_pretrained_dir(tmp_path)


class _Payload:
    """Unpickling this creates ``path``: stands for arbitrary code in a crafted checkpoint."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_checkpoint_refused_without_running_it(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    raw = torch.load(tmp_path / "models.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    raw["gene"]["config"]["extra"] = _Payload(marker)
    torch.save(raw, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"models\.ckpt: refused to load: it refers to io\.open"):
        SCFoundation.from_pretrained_dir(tmp_path)
    assert not marker.exists()
    del raw["gene"]["config"]["extra"]
    torch.save({"gene": {"config": raw["gene"]["config"]}}, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match="must map 'config' and 'state_dict' to dicts"):
        SCFoundation.from_pretrained_dir(tmp_path)
