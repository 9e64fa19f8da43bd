"""The sweep's embedding tables on a local Ray cluster: sharded over the workers, the bytes of a one-process
build, each row once; a shard killed for real (SIGKILL of its worker) leaves no table and the next build succeeds."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pertadapt import remote
from pertadapt.config import load_run_config
from pertadapt.sweep.tables import SHARD_TASK, build_sweep_tables, tables_uri
from pertadapt.train.embed_cache import table_source

REPO = Path(__file__).resolve().parents[2]
SMALL = ["backbone.hidden_size=16", "backbone.heads=2", "model.hidden_size=16", "model.head_hidden=32",
         "adapter.heads=2", "adapter.ffn_dim=8", "data.control_pool=64", "eval.batch_size=16"]

pytestmark = pytest.mark.ray


def _smoke(demo_h5ad: Path, *overrides: str):
    """configs/smoke.yaml on the demo data, sized down (:data:`SMALL`), plus ``overrides``."""
    return load_run_config(REPO / "configs" / "smoke.yaml", [f"data.path={demo_h5ad}", *SMALL, *overrides])


def _one_process(cfg, root: Path) -> bytes:
    source = table_source(cfg, root=root)
    source.cache.write(source.backbone, source.data, source.pool, batch_size=cfg.eval.batch_size,
                       device=torch.device("cpu"))
    return source.cache.path.read_bytes()


def _shard_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if f"ray::{SHARD_TASK}" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.usefixtures("no_leftover_ray")
def test_tables_are_built_once_sharded_and_a_killed_shard_leaves_none(demo_h5ad: Path, tmp_path: Path, s3_store: str,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import ray

    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))  # before Ray: its workers inherit it
    cfg = _smoke(demo_h5ad)
    seeds = [_smoke(demo_h5ad, f"seed={s}") for s in (1, 1)]  # two trials of one key (the second shares its table)
    slow = _smoke(demo_h5ad, "eval.batch_size=1", "backbone.cache_dtype=float16")
    tables = tmp_path / "cache" / "fm_embeddings"
    ray.init(num_cpus=3, _node_ip_address="127.0.0.2", log_to_driver=False)
    try:
        caplog.set_level(logging.INFO, logger="pertadapt.sweep.tables")
        store = f"{s3_store}/tables-test"  # an object store: shards on the driver's node, the table uploaded once
        built = build_sweep_tables([cfg, *seeds], store)
        assert len(built) == 1  # one key, one table
        assert remote.size(remote.join(tables_uri(store), built[0].name)) == built[0].stat().st_size
        assert "3 shard(s)" in caplog.text
        assert "3/3 shards, 64/64 rows" in caplog.text
        assert built[0].read_bytes() == _one_process(cfg, tmp_path / "one")
        assert build_sweep_tables([cfg], str(tmp_path / "storage")) == built  # already built: opened, not rebuilt
        assert "already built" in caplog.text

        outcome: dict[str, BaseException] = {}

        def build() -> None:
            try:
                build_sweep_tables([slow], str(tmp_path / "storage"))
            except BaseException as e:  # noqa: BLE001  (asserted below)
                outcome["error"] = e

        thread = threading.Thread(target=build)
        thread.start()
        deadline = time.time() + 40
        while not (victims := _shard_processes()) and time.time() < deadline:
            assert thread.is_alive(), outcome
            time.sleep(0.05)
        assert victims, "no shard task seen running"
        os.kill(victims[0].pid, signal.SIGKILL)
        thread.join(timeout=60)
        assert isinstance(outcome.get("error"), ray.exceptions.RayError), outcome
        assert sorted(p.name for p in tables.iterdir() if not p.name.endswith(".lock")) == sorted(
            [built[0].name, built[0].with_suffix(".json").name])  # no table, no temporary file of the killed build
        again = build_sweep_tables([slow], str(tmp_path / "storage"))  # the next build starts afresh
        assert again[0].read_bytes() == _one_process(slow, tmp_path / "one")
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("no_leftover_ray")
def test_a_driver_node_that_offers_ray_no_cpu_still_builds_the_table(demo_h5ad: Path, tmp_path: Path, s3_store: str,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import ray

    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))  # before Ray: its workers inherit it
    cfg = _smoke(demo_h5ad)
    ray.init(num_cpus=0, _node_ip_address="127.0.0.2", log_to_driver=False)  # a cluster head's usual setting
    try:
        caplog.set_level(logging.INFO, logger="pertadapt.sweep.tables")
        store = f"{s3_store}/tables-no-cpu"  # an object store: the table is built on the driver's node
        (built,) = build_sweep_tables([cfg], store)
        assert "the driver's node offers Ray no CPU; building there in one task" in caplog.text
        assert "1/1 shards, 64/64 rows" in caplog.text
        assert built.read_bytes() == _one_process(cfg, tmp_path / "one")
        assert remote.size(remote.join(tables_uri(store), built.name)) == built.stat().st_size
    finally:
        ray.shutdown()
