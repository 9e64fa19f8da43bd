"""Which FM weights a run uses, and ``backbone.pretrain`` resolved to the checkpoint it pretrains.

Every run records its FM weights in ``provenance.json`` (:func:`backbone_weights`): ``none`` (no FM: FM off,
or a baseline), ``random`` (``tiny``, or a named FM with ``random_init``) or ``pretrained`` (a checkpoint,
with the digest of its weights and, for one written by ``pertadapt pretrain``, the summary of its model
card). The sweep's ``results.csv`` carries the label (``fm_weights``) and the words (``backbone_weights``),
and the report names every arm's FM weights from them.

``backbone.pretrain: CONFIG`` means "this FM's weights come from pretraining CONFIG's FM on this run's data
file". :func:`resolve_pretrain` turns it into ``backbone.checkpoint`` (the directory
:func:`~pertadapt.train.pretrain.pretrained_checkpoint` returns: pretrained once per data file and config,
cached, under a lock) and ``backbone.checkpoint_sha256`` (the digest of its weights, so a trial's config hash
follows the weights). ``pertadapt train`` resolves it in :func:`pertadapt.train.worker.launch`; the sweep
driver resolves every trial's once per (pretrain config, data file) before any trial is queued, so
concurrent trials never pretrain in parallel. A dry run does not pretrain: it plans the declared sizes.

A ``backbone.checkpoint`` on an object store (a URI: where a sweep whose ``--storage`` is one puts the
checkpoints its driver pretrained, :func:`pertadapt.sweep.storage.stage_checkpoint`) is loaded from a
node-local copy (:func:`local_checkpoint`): fetched once per node, checked against
``backbone.checkpoint_sha256`` before it is kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from pertadapt import remote
from pertadapt.config.components import CheckpointedBackbone
from pertadapt.config.errors import ConfigError
from pertadapt.config.schema import RunConfig
from pertadapt.files import cache_dir, sha256_bytes, sha256_file

__all__ = ["WEIGHT_SUFFIXES", "backbone_weights", "check_pretrain", "checkpoint_sha256", "fetch_checkpoint",
           "local_checkpoint", "pretrain_of", "resolve_pretrain"]

log = logging.getLogger(__name__)

#: Files of a checkpoint directory that hold weights (``model.safetensors``, ``pytorch_model.bin``, the shards
#: of either, scFoundation's ``models.ckpt``); the others (config, genes, model card) describe them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")
#: Fields of an FM block that say how the run uses the FM or where its weights come from, not what it is:
#: the pretrain config's backbone must equal the run's in every other field.
_USE_FIELDS = ("finetune", "last_k", "lora_rank", "activation_checkpointing", "embedding_cache", "cache_dtype",
               "checkpoint", "pretrain", "checkpoint_sha256", "random_init")


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint's weights.

    Parameters
    ----------
    checkpoint
        A weights file (its own SHA-256, as ``sha256sum`` prints it), or a directory: the SHA-256 of the
        ``name:sha256`` lines of its :data:`WEIGHT_SUFFIXES` files, sorted by name.

    Raises
    ------
    ConfigError
        Neither a file nor a directory holding a weights file.
    """
    path = Path(checkpoint)
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []
    if not files:
        raise ConfigError(f"backbone.checkpoint: {path} is not a weights file nor a directory holding one "
                          f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files))


def _check_digest(checkpoint: str | Path, expected: str, what: str, meaning: str) -> str:
    """:func:`checkpoint_sha256` of ``checkpoint``, refused unless it is ``expected``.

    Raises
    ------
    ConfigError
        Naming ``what`` (the checkpoint as the config or the store names it), both digests and ``meaning``.
    """
    sha = checkpoint_sha256(checkpoint)
    if sha != expected:
        raise ConfigError(f"backbone.checkpoint_sha256: the weights in {what} have SHA-256 {sha}, not {expected}: "
                          f"{meaning}")
    return sha


def fetch_checkpoint(uri: str, sha256: str) -> Path:
    """The node-local copy of the checkpoint directory ``uri`` on an object store, whose weights have the
    SHA-256 ``sha256``: fetched once per node (:func:`pertadapt.remote.localize_tree`) into
    ``$PERTADAPT_CACHE/remote/checkpoints/<sha256>/``, kept only when its weights have that digest.

    Raises
    ------
    ConfigError
        ``uri`` holds no checkpoint, or the store cannot be read; the downloaded weights have another digest
        (the store's object was changed or corrupted: nothing is kept on the node).
    """

    def check(local: Path) -> None:
        _check_digest(local, sha256, uri, "refused, nothing kept on this node (the object on the store was changed "
                      f"or corrupted; delete {uri} and run the sweep again to upload it again)")

    try:
        return remote.localize_tree(uri, cache_dir() / "remote" / "checkpoints" / sha256, check=check)
    except (FileNotFoundError, remote.StorageError) as e:
        raise ConfigError(f"backbone.checkpoint: {e}") from e


def _on_this_node(b: CheckpointedBackbone) -> str:
    """``b.checkpoint`` as a path on this node: one on an object store is its node-local copy."""
    uri = str(b.checkpoint)
    if not remote.is_uri(uri):
        return uri
    assert b.checkpoint_sha256 is not None  # CheckpointedBackbone refuses a URI without it
    return str(fetch_checkpoint(uri, b.checkpoint_sha256))


def local_checkpoint(cfg: RunConfig) -> RunConfig:
    """``cfg`` whose ``backbone.checkpoint`` is a path on this node: one on an object store replaced by its
    node-local copy (:func:`fetch_checkpoint`); any other config as it is."""
    b = cfg.backbone
    if cfg.is_baseline or not isinstance(b, CheckpointedBackbone) or not remote.is_uri(b.checkpoint):
        return cfg
    return dataclasses.replace(cfg, backbone=dataclasses.replace(b, checkpoint=_on_this_node(b)))


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """Where a ``pertadapt pretrain`` model card says the weights come from: the architecture, the data (path,
    SHA-256, which cells, how many trained on), the genes, the steps and the held-out scores."""
    data, genes = card.get("data") or {}, card.get("genes") or {}
    out = {"backbone": card.get("backbone"), "data_path": data.get("path"), "data_sha256": data.get("sha256"),
           "cells": data.get("cells"), "n_train_cells": data.get("n_train"), "n_heldout_cells": data.get("n_heldout"),
           "n_genes": genes.get("n"), "steps": card.get("steps"), "batch_size": card.get("batch_size"),
           "scores": card.get("scores")}
    return {k: v for k, v in out.items() if v is not None}


def _architecture(block: Any, name: str) -> str:
    """``tiny (hidden 32, layers 1, heads 2)`` from a card's backbone block (the name alone without sizes)."""
    if not isinstance(block, dict):
        return name
    sizes = [f"{k.removesuffix('_size')} {block[k]}" for k in ("hidden_size", "layers", "heads") if k in block]
    return f"{block.get('name', name)} ({', '.join(sizes)})" if sizes else str(block.get("name", name))


def _pretrained_words(name: str, sha: str, card: dict[str, Any] | None, checkpoint: str) -> str:
    """A pretrained FM in words: its source data, cells, steps (from the card) and the weights digest."""
    if not card:
        return f"{name} checkpoint {checkpoint}; weights sha256 {sha[:12]}"
    s = _card_summary(card)
    cells = " ".join(str(x) for x in (s.get("n_train_cells"), s.get("cells")) if x is not None)
    data = f" of data sha256 {str(s['data_sha256'])[:12]}" if "data_sha256" in s else ""
    steps = f", {s['steps']} steps" if "steps" in s else ""
    return (f"{_architecture(s.get('backbone'), name)} pretrained on {cells or 'its'} cells{data}{steps}; "
            f"weights sha256 {sha[:12]}")


def backbone_weights(cfg: RunConfig) -> dict[str, Any]:
    """The run's FM weights, as ``provenance.json`` records them (``backbone_weights``).

    Returns
    -------
    dict
        ``fm``: ``none``, ``random`` or ``pretrained`` (:data:`~pertadapt.config.components.FM_WEIGHTS`);
        ``summary``: the same in words. A pretrained FM adds ``checkpoint`` (as the config names it: a path, or
        a URI on an object store), ``sha256`` (:func:`checkpoint_sha256`), ``local_copy`` for a checkpoint on
        an object store (the node-local copy loaded, :func:`local_checkpoint`) and, when the checkpoint has a
        model card, ``card`` (its source data, cells, steps and held-out scores).

    Raises
    ------
    ConfigError
        ``backbone.checkpoint_sha256`` is set and the checkpoint's weights have another digest (they changed
        since ``backbone.pretrain`` was resolved), or ``backbone.pretrain`` is not resolved.
    """
    b = cfg.backbone
    if cfg.is_baseline:
        return {"fm": "none", "summary": "none (baseline)"}
    if b.fm_weights == "none":
        return {"fm": "none", "summary": "none (FM off)"}
    if b.fm_weights == "random":
        return {"fm": "random", "summary": f"random {b.name} (random init)"}
    assert isinstance(b, CheckpointedBackbone)
    if b.checkpoint is None:
        raise ConfigError(f"backbone.pretrain: {b.pretrain!r} is not resolved to its checkpoint (resolve_pretrain)")
    path = Path(_on_this_node(b))
    sha = checkpoint_sha256(path) if b.checkpoint_sha256 is None else _check_digest(
        path, b.checkpoint_sha256, str(path), "the checkpoint changed since the config was resolved")
    from pertadapt.train.pretrain import read_model_card

    card = read_model_card(path if path.is_dir() else path.parent)
    record: dict[str, Any] = {"fm": "pretrained", "summary": _pretrained_words(b.name, sha, card, b.checkpoint),
                              "checkpoint": str(b.checkpoint), "sha256": sha}
    if str(path) != b.checkpoint:
        record["local_copy"] = str(path)
    if card:
        record["card"] = _card_summary(card)
    return record


def pretrain_of(cfg: RunConfig) -> str | None:
    """The ``backbone.pretrain`` config of a run whose FM weights come from it (``None``: none, or a baseline)."""
    b = cfg.backbone
    return b.pretrain if not cfg.is_baseline and isinstance(b, CheckpointedBackbone) else None


def check_pretrain(cfg: RunConfig) -> None:
    """Refuse a ``backbone.pretrain`` config whose FM is not the run's declared FM (nothing is pretrained).

    The run builds the checkpoint's architecture, so a pretrain config of other sizes would silently change
    the model (and make a random-FM arm of the declared sizes differ in more than its weights).

    Raises
    ------
    ConfigError
        Naming both files' values of every field that differs.
    """
    b = cfg.backbone
    if pretrain_of(cfg) is None:
        return
    from pertadapt.config.pretrain import load_pretrain_config

    theirs = load_pretrain_config(b.pretrain).backbone
    mine = {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.name not in _USE_FIELDS}
    other = {f.name: getattr(theirs, f.name) for f in dataclasses.fields(theirs) if f.name not in _USE_FIELDS}
    diff = [f"{k}: {other.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(mine) | set(other))
            if mine.get(k) != other.get(k)]
    if diff:
        raise ConfigError(f"backbone.pretrain: {b.pretrain} pretrains another FM than this run's backbone block "
                          f"declares ({'; '.join(diff)}); the two must match")


def resolve_pretrain(cfg: RunConfig, data_file: str | Path | None = None,
                     done: MutableMapping[tuple[str, str], tuple[str, str]] | None = None) -> RunConfig:
    """``cfg`` with ``backbone.pretrain`` replaced by the checkpoint it pretrains (unchanged without one).

    Parameters
    ----------
    cfg
        The run config.
    data_file
        The run's ``.h5ad`` (default: ``data.path``, or the simulator preset's cache file, which must exist).
    done
        (pretrain config, data file) → (checkpoint, weights SHA-256) of the pretrainings resolved so far:
        a sweep passes one mapping for all its trials, so each pair is resolved once.

    Returns
    -------
    RunConfig
        With ``backbone.checkpoint`` the pretrained checkpoint, ``backbone.checkpoint_sha256`` its digest.
    """
    b = cfg.backbone
    if pretrain_of(cfg) is None:
        return cfg
    assert isinstance(b, CheckpointedBackbone)
    if data_file is None:
        from pertadapt.data.presets import data_file_for

        data_file = data_file_for(cfg).path
    key = (str(b.pretrain), str(Path(data_file).resolve()))
    found = (done or {}).get(key)
    if found is None:
        check_pretrain(cfg)
        from pertadapt.train.pretrain import pretrained_checkpoint

        log.info("backbone.pretrain: the FM of %s, pretrained on %s (once per data file and config, cached)",
                 b.pretrain, data_file)
        directory = pretrained_checkpoint(b.pretrain, Path(data_file))
        found = (str(directory), checkpoint_sha256(directory))
        log.info("backbone.pretrain: %s → %s (weights sha256 %s)", b.pretrain, directory, found[1][:12])
        if done is not None:
            done[key] = found
    return dataclasses.replace(cfg, backbone=b.with_checkpoint(*found))
