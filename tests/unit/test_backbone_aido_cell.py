"""AIDO.Cell backbone: published HF layout round trip, input handling, mismatch errors."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors import safe_open

from pertadapt.models.backbones.aido_cell import AIDOCell, build_aido_cell
from pertadapt.models.backbones.base import Backbone
from pertadapt.models.backbones.checkpoint import CheckpointError, read_safetensors, write_safetensors

GENES = [f"GENE{i}" for i in range(40)]


def _model(**kw) -> AIDOCell:
    torch.manual_seed(0)
    return build_aido_cell(checkpoint=None, genes=GENES, hidden_size=32, layers=2, heads=4, **kw).eval()


def _cells() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    counts = torch.poisson(torch.rand(3, len(GENES), generator=g) * 4)
    total = counts.sum(1) * 1.5  # raw totals include genes outside the vocabulary
    return torch.log1p(counts / total[:, None] * 1e4), total


def test_published_names_and_protocol() -> None:
    m = _model()
    assert isinstance(m, Backbone)
    names = set(m.state_dict())
    for key in ("gene_embedding.linear1.weight", "gene_embedding.linear2.bias", "gene_embedding.lookup_table.weight",
                "gene_embedding.mask_embedding.weight", "gene_embedding.pad_embedding.weight",
                "position_embedding.weight", "encoder.layer.0.attention.ln.weight",
                "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.value.bias",
                "encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.ln.weight",
                "encoder.layer.1.mlp.gate_proj.weight", "encoder.layer.1.mlp.up_proj.weight",
                "encoder.layer.1.mlp.down_proj.weight", "encoder.ln.weight"):
        assert key in names, key
    assert m.position_embedding.weight.shape == (len(GENES) + 2, 32)
    assert len(m.transformer_layers()) == 2


def test_encode_shape_drops_depth_tokens_and_model_input() -> None:
    m = _model()
    x, total = _cells()
    assert m.encode(x, total).shape == (3, len(GENES), 32)
    seq = m.model_input(x, total)
    assert seq.shape == (3, len(GENES) + 2)
    # code mode: the log1p values are re-normalised as counts; depth = max(log10 Σx, 5) = 5 here
    expect = torch.log1p(x / x.sum(1, keepdim=True) * 1e4).clamp(max=20)
    torch.testing.assert_close(seq[:, :-2], expect)
    assert torch.all(seq[:, -2:] == 5.0)
    # intended mode: AIDO.Cell's preprocessing of the counts, depth tokens from the raw totals
    m.input_mode = "intended"
    seq = m.model_input(x, total * 1e3)
    torch.testing.assert_close(seq[:, -1], torch.log10(total * 1e3).clamp(min=5))
    counts = torch.expm1(x)
    torch.testing.assert_close(seq[:, :-2], torch.log1p(counts / counts.sum(1, keepdim=True) * 1e4), atol=1e-5,
                               rtol=1e-5)


def test_values_clipped_at_20() -> None:
    m = _model()
    x = torch.zeros(1, len(GENES))
    x[0, 0] = 1e25  # code mode: depth = log10(Σx) = 25 is clipped; the gene value log1p(1e4) is not
    seq = m.model_input(x, torch.tensor([1.0]))
    assert float(seq[0, 0]) == pytest.approx(math.log1p(1e4), rel=1e-6)
    assert seq[0, -2:].tolist() == [20.0, 20.0]
    x[0, 0] = 1.0  # small total: the depth tokens are floored at 5
    assert m.model_input(x, torch.tensor([1.0]))[0, -2:].tolist() == [5.0, 5.0]
    m.input_mode = "intended"
    huge = m.model_input(x, torch.tensor([1e30]))
    assert huge[0, -2:].tolist() == [20.0, 20.0]
    assert m.model_input(x, torch.tensor([1e7]))[0, -2:].tolist() == [pytest.approx(7.0), pytest.approx(7.0)]


def test_attention_mixes_genes() -> None:
    """Changing one gene's value changes other genes' embeddings (attention runs over genes)."""
    m = _model()
    x, total = _cells()
    y = x.clone()
    y[:, 0] += 2.0
    assert not torch.allclose(m.encode(x, total)[:, 1:], m.encode(y, total)[:, 1:])


def test_save_load_roundtrip_identical(tmp_path) -> None:
    m = _model()
    x, total = _cells()
    m.save_pretrained_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "cellfoundation"
    assert cfg["max_position_embeddings"] == len(GENES)
    assert cfg["hidden_act"] == "swiglu"
    assert cfg["normalization_type"] == "RMSNorm"
    loaded = AIDOCell.from_pretrained_dir(tmp_path).eval()
    assert loaded.genes == tuple(GENES)
    assert torch.equal(loaded.encode(x, total), m.encode(x, total))


def test_bert_prefix_and_bin_checkpoint(tmp_path) -> None:
    """The ...ForMaskedLM layout: ``bert.``-prefixed keys plus a ``cls.*`` head, as pytorch_model.bin."""
    m = _model()
    m.save_pretrained_dir(tmp_path)
    state = {f"bert.{k}": v for k, v in read_safetensors(tmp_path / "model.safetensors").items()}
    state["cls.predictions.decoder.weight"] = torch.zeros(1, 32)
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    x, total = _cells()
    assert torch.equal(AIDOCell.from_pretrained_dir(tmp_path).eval().encode(x, total), m.encode(x, total))


def test_model_safetensors_is_the_hf_layout(tmp_path) -> None:
    """model.safetensors holds every state-dict tensor under its own name, with HF's ``format: pt`` metadata."""
    m = _model()
    m.save_pretrained_dir(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(m.state_dict())
        w = f.get_tensor("encoder.layer.1.mlp.down_proj.weight")
    assert torch.equal(w, m.encoder.layer[1].mlp.down_proj.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "genes.txt", "model.safetensors"]


class _Payload:
    """Unpickling this creates ``path``: stands for arbitrary code in a crafted checkpoint."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_only_checkpoint_refused_without_running_it(tmp_path) -> None:
    m = _model()
    m.save_pretrained_dir(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**state, "bert.extra": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()  # the payload is real: plain unpickling runs it
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load: it refers to io\.open"):
        AIDOCell.from_pretrained_dir(tmp_path)
    assert not marker.exists()


def test_corrupt_weight_files_are_checkpoint_errors(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        AIDOCell.from_pretrained_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable torch checkpoint"):
        AIDOCell.from_pretrained_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        AIDOCell.from_pretrained_dir(tmp_path)


def test_build_checks_gene_vocabulary(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    model = build_aido_cell(checkpoint=str(tmp_path), genes=GENES, hidden_size=8, layers=1, heads=1)
    assert model.hidden_size == 32  # the checkpoint's config wins over the random-init sizes
    swapped = [*GENES[:3], GENES[4], GENES[3], *GENES[5:]]
    with pytest.raises(CheckpointError, match=r"3: 'GENE4' != 'GENE3'"):
        build_aido_cell(checkpoint=str(tmp_path), genes=swapped, hidden_size=8, layers=1, heads=1)
    with pytest.raises(CheckpointError, match=r"data genes \(39\).*vocabulary \(40\).*GENE39"):
        build_aido_cell(checkpoint=str(tmp_path), genes=GENES[:-1], hidden_size=8, layers=1, heads=1)


def test_shape_and_name_mismatch_errors(tmp_path) -> None:
    m = _model()
    m.save_pretrained_dir(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    state["encoder.layer.0.mlp.up_proj.weight"] = torch.zeros(7, 32)
    del state["encoder.ln.weight"]
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*encoder\.ln\.weight.*up_proj\.weight: checkpoint "
                                              r"\(7, 32\) vs model \(80, 32\)"):
        AIDOCell.from_pretrained_dir(tmp_path)


def test_gene_list_length_must_match_positions(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    (tmp_path / "genes.txt").write_text("\n".join(GENES[:-2]) + "\n")
    with pytest.raises(CheckpointError, match="38 genes but the model has 40 gene positions"):
        AIDOCell.from_pretrained_dir(tmp_path)
    (tmp_path / "genes.txt").unlink()
    with pytest.raises(CheckpointError, match="40 gene positions .* no genes.txt"):
        AIDOCell.from_pretrained_dir(tmp_path)


def test_unsupported_config_rejected(tmp_path) -> None:
    _model().save_pretrained_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["position_embedding_type"] = "rope"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="position_embedding_type='rope'"):
        AIDOCell.from_pretrained_dir(tmp_path)


def test_sharded_safetensors_checkpoint(tmp_path) -> None:
    """An HF sharded checkpoint (``model.safetensors.index.json`` + shards) loads to the same model."""
    m = _model()
    m.save_pretrained_dir(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: state[k] for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x, total = _cells()
    assert torch.equal(AIDOCell.from_pretrained_dir(tmp_path).eval().encode(x, total), m.encode(x, total))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors"):
        AIDOCell.from_pretrained_dir(tmp_path)


def test_non_tensor_entries_rejected(tmp_path) -> None:
    m = _model()
    m.save_pretrained_dir(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save({**state, "encoder.ln.weight": [1.0, 2.0]}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"entries that are not tensors: \['encoder\.ln\.weight'\]"):
        AIDOCell.from_pretrained_dir(tmp_path)
