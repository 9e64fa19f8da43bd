"""An FM checkpoint on the sweep's object store (the ``s3_store`` endpoint): uploaded once under its weights'
SHA-256, fetched once per node into a node-local copy checked against that digest, and refused when the object
on the store is corrupted; where it lives is no part of a trial's identity; a path storage keeps the directory."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pertadapt import remote
from pertadapt.config import ConfigError, load_run_config
from pertadapt.config.load import config_hash
from pertadapt.sweep.storage import stage_checkpoint
from pertadapt.train.fm_weights import checkpoint_sha256, fetch_checkpoint, local_checkpoint

REPO = Path(__file__).resolve().parents[2]
FILES = ("MODEL_CARD.md", "config.json", "genes.txt", "model.safetensors", "model_card.json")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint directory as ``pertadapt pretrain`` leaves it, plus what is never uploaded (a
    pretraining's ``resume/`` folder, a hidden temporary file)."""
    d = tmp_path / "driver-cache" / "pretrained" / "abc"
    (d / "resume").mkdir(parents=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, d / "model.safetensors")
    (d / "config.json").write_text('{"hidden_size": 32}\n')
    (d / "genes.txt").write_text("G1\nG2\n")
    (d / "model_card.json").write_text('{"steps": 3}\n')
    (d / "MODEL_CARD.md").write_text("# card\n")
    (d / "resume" / "state.json").write_text("{}")
    (d / ".x.tmp").write_text("half")
    return d


@pytest.fixture
def prefix(s3_store: str) -> str:
    return remote.join(s3_store, f"ck-{uuid.uuid4().hex[:10]}")


def _fetches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetching ")]


def test_upload_then_fetch_gives_the_same_bytes_and_digest_once_per_node(
        checkpoint: Path, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pertadapt")
    sha = checkpoint_sha256(checkpoint)
    uri = stage_checkpoint(checkpoint, sha, prefix)
    assert uri == remote.join(prefix, "cache", "checkpoints", sha)  # content-addressed: its weights' digest
    assert remote.list_files(uri) == list(FILES)  # the checkpoint's files only
    uploads = [r for r in caplog.records if r.getMessage().startswith("FM checkpoint ")]
    assert len(uploads) == len(FILES)
    caplog.clear()
    assert stage_checkpoint(checkpoint, sha, prefix) == uri  # a resumed driver: the store has it, nothing goes up
    assert not [r for r in caplog.records if r.getMessage().startswith("FM checkpoint ")]

    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "node-b"))  # another node: its own cache
    got: list[Path] = []
    start = threading.Barrier(2)

    def fetch() -> None:
        start.wait()
        got.append(fetch_checkpoint(uri, sha))

    workers = [threading.Thread(target=fetch) for _ in range(2)]  # two trials (or ranks) of one node at once
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(got) == 2
    assert got[0] == got[1] == tmp_path / "node-b" / "remote" / "checkpoints" / sha
    assert _fetches(caplog) == [f"fetching {uri} → {got[0]}"]  # downloaded once, the other waited and reused it
    assert sorted(p.name for p in got[0].iterdir()) == list(FILES)
    assert all((got[0] / f).read_bytes() == (checkpoint / f).read_bytes() for f in FILES)
    assert checkpoint_sha256(got[0]) == sha
    assert fetch_checkpoint(uri, sha) == got[0]
    assert len(_fetches(caplog)) == 1  # a later trial on the node finds its copy


def test_a_corrupted_object_on_the_store_is_refused_naming_the_key_and_the_digest(
        checkpoint: Path, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = checkpoint_sha256(checkpoint)
    uri = stage_checkpoint(checkpoint, sha, prefix)
    weights = (checkpoint / "model.safetensors").read_bytes()
    flipped = weights[:-1] + bytes([weights[-1] ^ 0xFF])  # same size, one byte changed
    remote.write_bytes(remote.join(uri, "model.safetensors"), flipped)
    node = tmp_path / "node-c"
    monkeypatch.setenv("PERTADAPT_CACHE", str(node))
    with pytest.raises(ConfigError, match=rf"the weights in {uri} have SHA-256 [0-9a-f]{{64}}, not {sha}: refused"):
        fetch_checkpoint(uri, sha)
    copies = node / "remote" / "checkpoints"
    assert [p.name for p in copies.iterdir()] == [f"{sha}.lock"]  # nothing half-kept: the next try fetches again
    remote.write_bytes(remote.join(uri, "model.safetensors"), weights)  # repaired on the store
    assert checkpoint_sha256(fetch_checkpoint(uri, sha)) == sha
    with pytest.raises(ConfigError, match=rf"backbone.checkpoint: {prefix}/nothing: no such directory on its store"):
        fetch_checkpoint(remote.join(prefix, "nothing"), "0" * 64)
    with pytest.raises(ConfigError, match=rf"backbone.checkpoint: {uri} is on an object store; set "
                                          r"backbone.checkpoint_sha256"):  # refused when the config is read
        load_run_config(REPO / "configs" / "smoke.yaml", [f"backbone.checkpoint={uri}"])


def test_where_the_checkpoint_lives_is_no_part_of_the_trials_identity(
        checkpoint: Path, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = checkpoint_sha256(checkpoint)
    assert stage_checkpoint(checkpoint, sha, str(tmp_path / "shared")) == str(checkpoint)  # a path: as today
    uri = stage_checkpoint(checkpoint, sha, prefix)
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "node-d"))

    def cfg(where: str, digest: str | None = sha):
        extra = [] if digest is None else [f"backbone.checkpoint_sha256={digest}"]
        return load_run_config(REPO / "configs" / "smoke.yaml", [f"backbone.checkpoint={where}", *extra])

    on_store, in_cache = cfg(uri), cfg(str(checkpoint))
    here = local_checkpoint(on_store)
    assert here.backbone.checkpoint == str(tmp_path / "node-d" / "remote" / "checkpoints" / sha)
    assert local_checkpoint(in_cache) is in_cache  # a path is loaded where it is
    assert config_hash(on_store) == config_hash(in_cache) == config_hash(here)
    assert config_hash(cfg(uri, "0" * 64)) != config_hash(on_store)  # the hash follows the weights' digest
    assert config_hash(cfg(str(checkpoint), None)) != config_hash(cfg(str(tmp_path), None))  # no digest: the path
