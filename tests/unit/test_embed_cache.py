"""Frozen-FM embedding cache: hit, miss, key parts, equality with recomputing, disk check, config, end to end."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.disks import small_tmpfs
from pertadapt.config import ConfigError, load_run_config
from pertadapt.data.dataset import PairedCells, draw_control_pool
from pertadapt.models import build_loss, build_model
from pertadapt.models.build import build_backbone_for
from pertadapt.train.embed_cache import (
    EmbeddingCache,
    cache_bytes,
    cache_key_parts,
    check_cache_space,
    fill_rows,
    open_or_build,
    prepare_embedding_cache,
    shard_ranges,
    table_source,
)
from pertadapt.train.run import run
from pertadapt.train.setup import RunData, prepare_run_data

REPO = Path(__file__).resolve().parents[2]
#: Small sizes: 64 pool cells of the demo data (240 genes), a 16-wide tiny backbone.
SMALL = ["backbone.hidden_size=16", "backbone.heads=2", "model.hidden_size=16", "model.head_hidden=32",
         "adapter.heads=2", "adapter.ffn_dim=8", "data.control_pool=64", "eval.batch_size=16"]


def _cfg(demo_h5ad: Path, *overrides: str):
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def rd(demo_h5ad: Path) -> RunData:
    return prepare_run_data(_cfg(demo_h5ad))


def _backbone(cfg, rd: RunData) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # as run() seeds before building the backbone
    return build_backbone_for(cfg, rd.inputs)


class _Forwards:
    """Counts forward calls of the tiny backbone (a real forward hook on its first transformer block)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.calls = 0
        backbone.transformer_layers()[0].register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


def _cache(cfg, rd: RunData, backbone: torch.nn.Module, root: Path, *, hashes: dict | None = None,
           pool: np.ndarray | None = None) -> EmbeddingCache:
    pool = rd.train.pool if pool is None else pool
    parts = cache_key_parts(cfg, hashes or rd.hashes, pool, backbone)
    return EmbeddingCache(parts, (len(pool), len(rd.data.genes), backbone.hidden_size), root)


def _build(cache: EmbeddingCache, backbone: torch.nn.Module, rd: RunData, pool: np.ndarray | None = None):
    return open_or_build(cache, backbone, rd.data, rd.train.pool if pool is None else pool, batch_size=16,
                         device=torch.device("cpu"))


def test_miss_builds_once_and_a_hit_reuses_the_file(demo_h5ad: Path, rd: RunData, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    forwards = _Forwards(backbone)
    cache = _cache(cfg, rd, backbone, tmp_path)
    table, hit, seconds = _build(cache, backbone, rd)
    assert (hit, forwards.calls, table.shape) == (False, 4, (64, 240, 16))  # 64 pool cells / 16 per batch
    assert seconds > 0
    assert cache.nbytes == 64 * 240 * 16 * 4 == cache.path.stat().st_size - 128
    stat = cache.path.stat()
    again, hit, seconds = _build(_cache(cfg, rd, backbone, tmp_path), backbone, rd)
    assert (hit, seconds, forwards.calls) == (True, 0.0, 4)  # no backbone forward on a hit
    after = cache.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    np.testing.assert_array_equal(again, table)
    meta = json.loads(cache.path.with_suffix(".json").read_text())
    assert meta["key"] == cache.key
    assert meta["pool"]["n_cells"] == 64


def test_table_rows_are_the_backbone_embeddings_of_the_pool(demo_h5ad: Path, rd: RunData, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    table, _, _ = _build(_cache(cfg, rd, backbone, tmp_path), backbone, rd)
    cells = rd.train.pool[[0, 33, 63]]
    with torch.no_grad():
        want = backbone.encode(torch.from_numpy(rd.data.rows(cells).toarray()),
                               torch.from_numpy(rd.data.total_count[cells])).numpy()
    np.testing.assert_allclose(table[[0, 33, 63]], want, rtol=1e-5, atol=1e-6)


def _variant(demo_h5ad: Path, rd: RunData, part: str) -> tuple[object, dict, np.ndarray]:
    """Config, data hashes and pool with one key part changed."""
    hashes, pool = dict(rd.hashes), rd.train.pool
    overrides = {"weights": ["seed=2"], "backbone_config": ["backbone.heads=4"],
                 "dtype": ["backbone.cache_dtype=float16"],
                 "pool_size": ["data.control_pool=63"], "pool_seed": ["data.control_pool_seed=5"]}.get(part, [])
    cfg = _cfg(demo_h5ad, *overrides)
    if part == "data":
        hashes["data_sha256"] = "0" * 64
    elif part == "gene_order":
        hashes["gene_order_sha256"] = "1" * 64
    elif part.startswith("pool"):
        pool = draw_control_pool(rd.data, cfg.data.control_pool, cfg.data.control_pool_seed)
    return cfg, hashes, pool


@pytest.mark.parametrize("part", ["weights", "data", "gene_order", "backbone_config", "pool_size", "pool_seed",
                                  "dtype"])
def test_each_key_part_gives_another_file(demo_h5ad: Path, rd: RunData, tmp_path: Path, part: str) -> None:
    base_cfg = _cfg(demo_h5ad)
    base = _cache(base_cfg, rd, _backbone(base_cfg, rd), tmp_path)
    cfg, hashes, pool = _variant(demo_h5ad, rd, part)
    backbone = _backbone(cfg, rd)
    other = _cache(cfg, rd, backbone, tmp_path, hashes=hashes, pool=pool)
    assert other.path != base.path
    changed = {k for k in base.parts if base.parts[k] != other.parts[k]}
    expected = {"weights": {"weights_sha256"}, "data": {"data_sha256"}, "gene_order": {"gene_order_sha256"},
                "backbone_config": {"backbone"}, "pool_size": {"pool"}, "pool_seed": {"pool"}, "dtype": {"dtype"}}
    assert changed == expected[part]  # heads: same weights (shapes and init), another computation


def test_a_changed_key_part_is_a_miss_and_never_reads_the_old_table(demo_h5ad: Path, rd: RunData,
                                                                     tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    _build(_cache(cfg, rd, backbone, tmp_path), backbone, rd)
    cfg2 = _cfg(demo_h5ad, "seed=2")  # other random weights
    backbone2 = _backbone(cfg2, rd)
    forwards = _Forwards(backbone2)
    table2, hit, _ = _build(_cache(cfg2, rd, backbone2, tmp_path), backbone2, rd)
    assert not hit
    assert forwards.calls == 4
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_low_precision_storage(demo_h5ad: Path, rd: RunData, tmp_path: Path) -> None:
    full = _cfg(demo_h5ad)
    ref, _, _ = _build(_cache(full, rd, _backbone(full, rd), tmp_path), _backbone(full, rd), rd)
    for name, stored, rtol in (("float16", np.float16, 1e-3), ("bfloat16", np.uint16, 8e-3)):
        cfg = _cfg(demo_h5ad, f"backbone.cache_dtype={name}")
        backbone = _backbone(cfg, rd)
        cache = _cache(cfg, rd, backbone, tmp_path)
        table, _, _ = _build(cache, backbone, rd)
        assert table.dtype == stored
        assert cache.nbytes == ref.nbytes // 2
        model = build_model(cfg, rd.inputs, backbone=backbone, embeddings=table)
        batch = rd.train.batch(np.arange(4))
        got = model.backbone.encode(batch.x_ctrl, batch.total_count, batch.ctrl_idx)
        want = torch.from_numpy(np.asarray(ref[batch.ctrl_idx.numpy()]))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_concurrent_builders_of_one_key_build_once(demo_h5ad: Path, rd: RunData, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbones = [_backbone(cfg, rd) for _ in range(3)]
    counters = [_Forwards(b) for b in backbones]
    results: list[tuple[np.ndarray, bool, float]] = [None] * 3  # type: ignore[list-item]

    def build(i: int) -> None:
        results[i] = _build(_cache(cfg, rd, backbones[i], tmp_path), backbones[i], rd)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[1] for r in results) == [False, True, True]
    assert sum(c.calls for c in counters) == 4
    for r in results:
        np.testing.assert_array_equal(r[0], results[0][0])
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _loss_and_grads(model: torch.nn.Module, cfg, rd: RunData, items: np.ndarray):
    model.train()
    batch = rd.train.batch(items)
    pred = model(batch)
    loss = build_loss(cfg, rd.inputs)(pred, batch).total
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return pred.detach(), loss.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_outputs_loss_and_gradients_equal_with_and_without_the_cache(demo_h5ad: Path, rd: RunData,
                                                                     tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    table, _, _ = _build(_cache(cfg, rd, backbone, tmp_path), backbone, rd)
    torch.manual_seed(cfg.seed)
    cached = build_model(cfg, rd.inputs, backbone=build_backbone_for(cfg, rd.inputs), embeddings=table)
    torch.manual_seed(cfg.seed)
    plain = build_model(cfg, rd.inputs)
    assert not any(n.startswith("backbone.") for n in cached.state_dict())  # the FM is not held
    assert {n for n, p in cached.named_parameters()} == {n for n, p in plain.named_parameters() if p.requires_grad}
    items = np.flatnonzero(~np.isin(rd.train.cells, rd.train.pool))[:8]  # perturbed and out-of-pool control cells
    p1, l1, g1 = _loss_and_grads(cached, cfg, rd, items)
    p0, l0, g0 = _loss_and_grads(plain, cfg, rd, items)
    assert _rel(p1, p0) <= 1e-5
    assert _rel(l1, l0) <= 1e-5
    assert g0.keys() == g1.keys()
    assert len(g0) > 10
    assert max(_rel(g1[n], g0[n]) for n in g0) <= 1e-5
    cached.eval()
    plain.eval()
    with torch.no_grad():  # eval mode (BatchNorm running statistics): the same
        batch = rd.val.cells.batch(np.arange(8))
        assert _rel(cached(batch), plain(batch)) <= 1e-5


def test_control_pool_is_a_seeded_subset_shared_by_pairing(demo_h5ad: Path, rd: RunData) -> None:
    ctrl = rd.data.control_cells
    pool = draw_control_pool(rd.data, 64, 0)
    assert len(pool) == 64
    assert np.all(np.diff(pool) > 0)
    assert np.isin(pool, ctrl).all()
    np.testing.assert_array_equal(pool, rd.train.pool)
    assert not np.array_equal(draw_control_pool(rd.data, 64, 1), pool)
    np.testing.assert_array_equal(draw_control_pool(rd.data, None, 0), ctrl)
    cells = rd.train
    assert np.isin(cells.pair, pool).all()
    np.testing.assert_array_equal(pool[cells.pair_pool_idx], cells.pair)
    in_pool = np.isin(cells.cells, pool)
    np.testing.assert_array_equal(cells.pair[in_pool & np.isin(cells.cells, ctrl)],
                                  cells.cells[in_pool & np.isin(cells.cells, ctrl)])  # pool controls: x = y
    everything = PairedCells(rd.data, rd.split.train, rd.pert_vocab, seed=1, n_de=20)
    explicit = PairedCells(rd.data, rd.split.train, rd.pert_vocab, seed=1, n_de=20, pool=ctrl)
    np.testing.assert_array_equal(everything.pair, explicit.pair)  # no pool = every control, as before
    batch = explicit.batch(np.arange(5))
    np.testing.assert_array_equal(ctrl[batch.ctrl_idx.numpy()], explicit.pair[:5])


def test_check_cache_space_names_the_bytes_the_free_space_and_the_ways_out(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert check_cache_space(tmp_path / "not" / "yet", (4, 8, 16), "float32") == cache_bytes(4, 8, 16) == 2048
    assert cache_bytes(4, 8, 16, "bfloat16") == cache_bytes(4, 8, 16, "float16") == 1024
    pool = 2 * free // (4 * 4) + 1
    with pytest.raises(ConfigError, match=r"backbone\.embedding_cache: .*needs .* \(.*pool \d+ .*data\.control_pool") as e:
        check_cache_space(tmp_path, (pool, 4, 4), "float32")
    msg = str(e.value)
    assert f"needs {pool * 64} bytes" in msg
    assert "bytes (" in msg
    assert " free" in msg
    assert "backbone.cache_dtype=bfloat16" in msg
    assert "backbone.embedding_cache=off" in msg
    with pytest.raises(ConfigError, match=r"backbone\.cache_dtype: expected one of float32"):
        cache_bytes(1, 1, 1, "int8")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (a full disk for the 983 kB float32 table of SMALL); unmounted afterwards."""
    with small_tmpfs(tmp_path, "512k") as disk:
        yield disk


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_a_full_disk_is_refused_before_the_build_and_leaves_no_file(demo_h5ad: Path, rd: RunData,
                                                                    small_disk: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    forwards = _Forwards(backbone)
    cache = _cache(cfg, rd, backbone, small_disk / "fm")
    assert cache.nbytes == 983040 > 512 * 1024
    with pytest.raises(ConfigError, match=r"needs 983040 bytes .* has \d+ bytes .* free.*cache_dtype=bfloat16"):
        _build(cache, backbone, rd)
    assert forwards.calls == 0
    assert _files(small_disk) == []


def test_the_cache_file_is_preallocated_so_a_full_disk_fails_cleanly(demo_h5ad: Path, rd: RunData,
                                                                      small_disk: Path) -> None:
    cfg = _cfg(demo_h5ad)
    backbone = _backbone(cfg, rd)
    forwards = _Forwards(backbone)
    cache = _cache(cfg, rd, backbone, small_disk)
    with pytest.raises(ConfigError, match=r"backbone\.embedding_cache: .*needs 983040 bytes"):  # past the check
        cache.write(backbone, rd.data, rd.train.pool, batch_size=16, device=torch.device("cpu"))
    assert forwards.calls == 0  # refused before any backbone forward
    assert _files(small_disk) == []  # no partial table, no temporary file
    assert shutil.disk_usage(small_disk).used == 0


def test_auto_never_recomputes_silently_when_the_cache_does_not_fit(demo_h5ad: Path, rd: RunData,
                                                                    small_disk: Path) -> None:
    for mode in ("auto", "on"):
        cfg = _cfg(demo_h5ad, f"backbone.embedding_cache={mode}")
        with pytest.raises(ConfigError, match=r"backbone\.embedding_cache=off"):
            prepare_embedding_cache(cfg, rd.data, rd.hashes, rd.train.pool, _backbone(cfg, rd), root=small_disk)
    half = _cfg(demo_h5ad, "backbone.cache_dtype=bfloat16")  # the first way out the message names: it fits
    table, info = prepare_embedding_cache(half, rd.data, rd.hashes, rd.train.pool, _backbone(half, rd),
                                          root=small_disk)
    assert info["used"]
    assert info["bytes"] == 491520
    assert table.shape == (64, 240, 16)
    off = _cfg(demo_h5ad, "backbone.embedding_cache=off")  # the other: recompute, knowingly
    assert prepare_embedding_cache(off, rd.data, rd.hashes, rd.train.pool, _backbone(off, rd),
                                   root=small_disk)[0] is None


def test_prepare_records_what_was_used(demo_h5ad: Path, rd: RunData, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path))
    cfg = _cfg(demo_h5ad)
    table, info = prepare_embedding_cache(cfg, rd.data, rd.hashes, rd.train.pool, _backbone(cfg, rd))
    assert table.shape == (64, 240, 16)
    assert info["used"]
    assert not info["hit"]
    assert Path(info["path"]).parent == tmp_path / "fm_embeddings"
    assert info["bytes"] == table.nbytes
    assert prepare_embedding_cache(cfg, rd.data, rd.hashes, rd.train.pool, _backbone(cfg, rd))[1]["hit"]
    off = _cfg(demo_h5ad, "backbone.embedding_cache=off")
    assert prepare_embedding_cache(off, rd.data, rd.hashes, rd.train.pool, _backbone(off, rd)) == (
        None, {"used": False, "reason": "backbone.embedding_cache=off"})
    tuned = _cfg(demo_h5ad, "backbone.finetune=full")  # auto: a fine-tuned FM is recomputed
    assert prepare_embedding_cache(tuned, rd.data, rd.hashes, rd.train.pool, _backbone(tuned, rd))[0] is None


@pytest.mark.parametrize(("overrides", "needle"), [
    (["backbone.finetune=full"], r"backbone\.embedding_cache: 'on' needs a frozen"),
    (["backbone.finetune=lora"], r"backbone\.embedding_cache: 'on' needs a frozen"),
    (["backbone.name=learned"], r"backbone\.embedding_cache: not an option of backbone 'learned'")])
def test_cache_on_needs_a_frozen_fm(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, [*overrides, "backbone.embedding_cache=on"])
    assert not load_run_config(None, overrides).backbone.wants_embedding_cache  # auto: off


def test_cache_options_are_validated(tmp_path: Path) -> None:
    assert load_run_config(None).backbone.wants_embedding_cache  # auto + frozen tiny FM
    assert not load_run_config(None, ["backbone.embedding_cache=off"]).backbone.wants_embedding_cache
    (tmp_path / "c.yaml").write_text("backbone: {embedding_cache: on}\n")  # YAML 1.1 reads a bare on as true
    assert load_run_config(tmp_path / "c.yaml").backbone.embedding_cache == "on"
    for bad, key in (("backbone.embedding_cache=sometimes", "backbone.embedding_cache"),
                     ("backbone.cache_dtype=int8", "backbone.cache_dtype"),
                     ("data.control_pool=0", "data.control_pool"),
                     ("data.control_pool_seed=-1", "data.control_pool_seed")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_run_config(None, [bad])


def test_training_with_the_cache_equals_training_without(demo_h5ad: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))
    base = ["optim.epochs=1", "optim.max_steps_per_epoch=2", "data.control_pool=null"]
    on = run(_cfg(demo_h5ad, *base, "backbone.embedding_cache=on"), tmp_path / "on")
    off = run(_cfg(demo_h5ad, *base, "backbone.embedding_cache=off"), tmp_path / "off")
    assert on.keys() == off.keys()
    for k, v in off.items():
        assert on[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    prov_on = json.loads((tmp_path / "on" / "provenance.json").read_text())["embedding_cache"]
    prov_off = json.loads((tmp_path / "off" / "provenance.json").read_text())["embedding_cache"]
    assert prov_on["used"]
    assert Path(prov_on["path"]).is_file()
    assert prov_on["shape"][0] == 400
    assert prov_off == {"used": False, "reason": "backbone.embedding_cache=off"}


def test_cache_benchmark_runs_small_and_agrees() -> None:
    from pertadapt.bench.train import run_cache_benchmark

    r = run_cache_benchmark(240, hidden_size=16, layers=1, heads=2, pool=32, steps=1, repeats=1)
    assert "CPU" in r["config"]
    assert r["max_rel_diff"] <= 1e-5
    assert r["max_metric_rel_diff"] <= 1e-5
    assert r["cache_bytes"] == 32 * 240 * 16 * 4
    assert r["backbone_params"] > 0
    assert r["speedup"] == r["recompute_epoch_s"] / r["cache_epoch_s"]


@pytest.mark.parametrize(("rows", "batch", "shards"), [(64, 16, 3), (64, 16, 8), (65, 16, 2), (5, 16, 4), (64, 1, 5)])
def test_shard_ranges_cover_every_row_once_on_batch_boundaries(rows: int, batch: int, shards: int) -> None:
    ranges = shard_ranges(rows, batch, shards)
    assert len(ranges) == min(shards, -(-rows // batch))
    assert [r for a, b in ranges for r in range(a, b)] == list(range(rows))  # contiguous, disjoint, complete
    assert all(a % batch == 0 for a, _ in ranges)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= batch + rows % batch  # balanced to a batch


def test_a_sharded_build_writes_each_row_once_and_the_bytes_of_a_one_process_build(
        demo_h5ad: Path, rd: RunData, tmp_path: Path) -> None:
    """Three shards (each its own ``r+`` memory map of the preallocated file) give the same bytes as one
    process; the backbone sees each pool row exactly once; the table appears only when the block ends."""
    cfg = _cfg(demo_h5ad, "eval.batch_size=8")
    source = table_source(cfg, root=tmp_path / "sharded")
    assert source.cache.key == _cache(cfg, rd, _backbone(cfg, rd), tmp_path).key  # the key the run computes
    one = table_source(cfg, root=tmp_path / "one")
    assert one.cache.write(one.backbone, one.data, one.pool, batch_size=8, device=torch.device("cpu"))
    seen: list[int] = []
    source.backbone.transformer_layers()[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with source.cache.building() as tmp:
        for a, b in shard_ranges(64, 8, 3):
            assert fill_rows(source, tmp, a, b, batch_size=8, device=torch.device("cpu")) == (a, b)
            assert not source.cache.path.exists()  # renamed only when every shard is done
    assert sum(seen) == 64
    assert len(seen) == 8
    assert source.cache.path.read_bytes() == one.cache.path.read_bytes()
    assert _files(tmp_path / "sharded") == sorted([source.cache.path.name, source.cache.path.with_suffix(".json").name])


def test_a_failed_shard_leaves_no_table_and_the_next_build_succeeds(demo_h5ad: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_h5ad)
    source = table_source(cfg, root=tmp_path)

    def half_build() -> None:
        with source.cache.building() as tmp:
            fill_rows(source, tmp, 0, 16, batch_size=16, device=torch.device("cpu"))
            raise RuntimeError("shard died")

    with pytest.raises(RuntimeError, match="shard died"):
        half_build()
    assert _files(tmp_path) == []
    assert source.cache.write(source.backbone, source.data, source.pool, batch_size=16, device=torch.device("cpu"))
    assert source.cache.open().shape == (64, 240, 16)
    assert table_source(load_run_config(None, ["backbone.embedding_cache=off"])) is None
