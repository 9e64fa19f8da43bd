"""A table the sweep uploaded to its object store is fetched by a run on another node, not built again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pertadapt import remote
from pertadapt.config import load_run_config
from pertadapt.sweep.tables import _upload, tables_uri, use_sweep_tables
from pertadapt.train.embed_cache import TABLES_ENV, open_or_build, table_source

REPO = Path(__file__).resolve().parents[2]
SMALL = ["backbone.hidden_size=16", "backbone.heads=2", "model.hidden_size=16", "model.head_hidden=32",
         "adapter.heads=2", "adapter.ffn_dim=8", "data.control_pool=64", "eval.batch_size=16"]


def test_a_run_fetches_the_sweeps_uploaded_table_instead_of_building_it(demo_h5ad: Path, tmp_path: Path,
                                                                        s3_store: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *SMALL])
    built = table_source(cfg, root=tmp_path / "driver")
    assert built.cache.write(built.backbone, built.data, built.pool, batch_size=16, device=torch.device("cpu"))
    store = f"{s3_store}/fetch-test"
    _upload(built.cache, tables_uri(store))
    assert remote.size(remote.join(tables_uri(store), built.cache.path.name)) == built.cache.path.stat().st_size

    node = table_source(cfg, root=tmp_path / "node")  # another node: its own cache, the store named
    forwards: list[int] = []
    node.backbone.transformer_layers()[0].register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setenv(TABLES_ENV, "")  # restored (unset) after the test
    monkeypatch.delenv(TABLES_ENV)
    use_sweep_tables(str(tmp_path))  # a path storage names no store
    assert TABLES_ENV not in os.environ
    use_sweep_tables(store)
    table, hit, seconds = open_or_build(node.cache, node.backbone, node.data, node.pool, batch_size=16,
                                        device=torch.device("cpu"))
    assert (hit, seconds, forwards) == (True, 0.0, [])  # fetched, not built
    assert node.cache.path.read_bytes() == built.cache.path.read_bytes()
