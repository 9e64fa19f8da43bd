"""Checkpoints that load without unpickling: tensors in ``safetensors`` files, everything else JSON.

A checkpoint directory (a run directory's last or best checkpoint, or one epoch's checkpoint in Ray storage) holds

- ``state.json`` (rank 0): format tag, engine, world size, the loop's client state (``epoch``, ``best``,
  ``best_epoch``)
  and the name → shape of every trained tensor;
- ``trained.safetensors`` (rank 0): the trained state of the model — parameters with
  ``requires_grad`` and the buffers training updates — full and on CPU, never the frozen backbone
  (it is rebuilt from the config and its weights);
- ``rank<r>.json`` (every rank): that rank's RNG states (Python, NumPy, torch) and engine counters;
- engine files: ``optimizer.safetensors`` (torch engine) or ``ds/`` (DeepSpeed, written through
  :func:`save_tree` as well).

Arbitrary nested state (an optimiser's ``state_dict()``, DeepSpeed's ZeRO partitions) goes through
:func:`save_tree` / :func:`load_tree`: tensors become named safetensors entries and the structure a
JSON tree in the file's metadata; non-JSON leaves are allowed only through an explicit, closed list of
:class:`Codec` objects. Nothing on the load path unpickles. :func:`read_checkpoint` validates a whole
directory (files present, JSON parses, tensor names and shapes match the model) before anything is
loaded, so a run directory is never touched on behalf of a bad checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pertadapt.config.schema import ConfigError
from pertadapt.files import atomic_write, atomic_write_json
from pertadapt.rundir import RunDir

__all__ = ["FORMAT", "STATE_FILE", "CheckpointError", "Checkpoints", "Codec", "DirCheckpoints", "Loaded",
           "consolidated_state_dict", "get_rng_state", "has_checkpoint", "load_tree", "read_checkpoint", "read_json",
           "replace_dir", "require_checkpoint", "restore_model", "save_tree", "set_rng_state", "trained_state",
           "write_checkpoint"]

log = logging.getLogger(__name__)

#: Format tag written into ``state.json`` and every safetensors file's metadata.
FORMAT = "pertadapt-checkpoint/1"
STATE_FILE = "state.json"
TRAINED_FILE = "trained.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def rank_file(rank: int) -> str:
    """Per-rank JSON file name in a checkpoint directory."""
    return f"rank{rank}.json"


@dataclass(frozen=True)
class Codec:
    """How one allow-listed non-JSON type is written into, and rebuilt from, a checkpoint tree.

    Attributes
    ----------
    type
        The exact type (``type(obj) is type``) this codec handles.
    tag
        Stable name stored in the file.
    encode
        ``obj -> JSON value``.
    decode
        ``JSON value -> obj``.
    """

    type: type
    tag: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


_SCALARS = (bool, int, float, str, type(None))


def _encode(obj: Any, tensors: dict[str, torch.Tensor], codecs: Mapping[type, Codec]) -> Any:
    if type(obj) in codecs:
        c = codecs[type(obj)]
        return {"x": c.tag, "v": c.encode(obj)}
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"t": name}
    if type(obj) in _SCALARS:
        return obj
    if type(obj) in (dict, OrderedDict):
        if not all(type(k) in (str, int) for k in obj):
            raise TypeError(f"checkpoint: dict keys must be str or int, got {sorted({type(k).__name__ for k in obj})}")
        tag = "o" if type(obj) is OrderedDict else "d"
        return {tag: [[k, _encode(v, tensors, codecs)] for k, v in obj.items()]}
    if type(obj) in (list, tuple, torch.Size):
        tag = {list: "l", tuple: "u", torch.Size: "s"}[type(obj)]
        return {tag: [_encode(v, tensors, codecs) for v in obj]}
    raise TypeError(f"checkpoint: cannot store a {type(obj).__module__}.{type(obj).__qualname__} "
                    "(not a tensor, JSON value, container or allow-listed type)")


def _decode(node: Any, tensors: Callable[[str], torch.Tensor], codecs: Mapping[str, Codec]) -> Any:
    if type(node) in _SCALARS:
        return node
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError(f"unexpected tree node {str(node)[:60]!r}")
    if "x" in node:
        if node["x"] not in codecs:
            raise ValueError(f"type {node['x']!r} is not allow-listed")
        return codecs[node["x"]].decode(node.get("v"))
    (tag, value), = node.items()
    if tag == "t":
        return tensors(value)
    if tag in ("d", "o"):
        pairs = [(k, _decode(v, tensors, codecs)) for k, v in value]
        if not all(type(k) in (str, int) for k, _ in pairs):
            raise ValueError("dict keys must be str or int")
        return OrderedDict(pairs) if tag == "o" else dict(pairs)
    if tag in ("l", "u", "s"):
        items = [_decode(v, tensors, codecs) for v in value]
        return {"l": list, "u": tuple, "s": torch.Size}[tag](items)
    raise ValueError(f"unknown tree node tag {tag!r}")


def save_tree(path: Path, obj: Any, codecs: Iterable[Codec] = ()) -> None:
    """Write nested state (dicts, lists, tuples, tensors, JSON scalars, ``codecs`` types) to one safetensors file.

    Parameters
    ----------
    path
        Destination, written atomically.
    obj
        The state; tensors of any shape and dtype are stored as named entries (copied to CPU).
    codecs
        Allow-listed non-JSON types.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, {c.type: c for c in codecs})
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT, "tree": json.dumps(tree)}))


def _open_safetensors(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors checkpoint file ({e})") from None


def load_tree(path: Path, codecs: Iterable[Codec] = ()) -> Any:
    """Read what :func:`save_tree` wrote (no unpickling: a safetensors header, JSON and raw tensor bytes).

    Raises
    ------
    CheckpointError
        When the file is missing, not safetensors, not written by :func:`save_tree`, or malformed.
    """
    by_tag = {c.tag: c for c in codecs}
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "tree" not in meta:
            raise CheckpointError(f"{path}: not a {FORMAT} file (metadata format={meta.get('format')!r})")
        names = set(f.keys())

        def tensor(name: str) -> torch.Tensor:
            if name not in names:
                raise ValueError(f"tensor {name!r} is missing")
            return f.get_tensor(name)

        try:
            return _decode(json.loads(meta["tree"]), tensor, by_tag)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: malformed checkpoint tree ({e})") from None


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    with _open_safetensors(path) as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a {FORMAT} file")
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file when missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _frozen_prefix(model: nn.Module) -> str | None:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
        return "backbone."
    return None


def trained_names(model: nn.Module) -> list[str]:
    """State-dict keys training changes: parameters with ``requires_grad`` and buffers outside a frozen backbone."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = _frozen_prefix(model)
    buffers = {n for n, _ in model.named_buffers() if frozen is None or not n.startswith(frozen)}
    return [k for k in model.state_dict() if k in trainable or k in buffers]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name → CPU copy of every trained tensor of ``model`` (see :func:`trained_names`)."""
    sd = model.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True).contiguous() for k in trained_names(model)}


def expected_shapes(model: nn.Module, full_shapes: Mapping[str, Iterable[int]] | None = None) -> dict[str, list[int]]:
    """name → shape of the trained tensors (``full_shapes`` overrides partitioned ZeRO-3 parameter shapes)."""
    sd = model.state_dict()
    full = full_shapes or {}
    return {k: list(full.get(k, sd[k].shape)) for k in trained_names(model)}


def get_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy (global) and torch CPU RNG states, as JSON values.

    The platform draws NumPy numbers from explicit generators; the global state is kept for library code.
    """
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def write_checkpoint(directory: Path, *, rank: int, world_size: int, engine: str, client_state: Mapping[str, Any],
                     rank_state: Mapping[str, Any], trained: Mapping[str, torch.Tensor] | None) -> None:
    """Write the engine-independent files of a checkpoint (each rank calls it; rank 0 passes ``trained``).

    Parameters
    ----------
    directory
        Checkpoint directory (created).
    rank, world_size
        This process's rank and the number of ranks.
    engine
        ``engine.name`` (checked on load).
    client_state
        The loop's JSON state (``epoch``, ``best``, ``best_epoch``).
    rank_state
        This rank's JSON state: engine counters and ``files``, the engine files this rank wrote (paths
        relative to ``directory``, each a :func:`save_tree` file); its RNG states are added.
    trained
        Rank 0: name → full trained tensor of the model; other ranks: ``None``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / rank_file(rank), {**rank_state, "rank": rank, "rng": get_rng_state()})
    if trained is not None:
        atomic_write(directory / TRAINED_FILE,
                     lambda p: save_file(dict(trained), str(p), metadata={"format": FORMAT}))
        atomic_write_json(directory / STATE_FILE, {
            "format": FORMAT, "engine": engine, "world_size": world_size, "client_state": dict(client_state),
            "trained": {k: list(v.shape) for k, v in trained.items()}})


@dataclass(frozen=True)
class Loaded:
    """A validated checkpoint: the loop's client state, this rank's state, and the trained tensors."""

    client_state: dict[str, Any]
    rank_state: dict[str, Any]
    trained: dict[str, torch.Tensor]


def _check_state(directory: Path, state: dict[str, Any]) -> None:
    path = directory / STATE_FILE
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}")
    cs = state.get("client_state")
    if not (isinstance(cs, dict) and isinstance(cs.get("epoch"), int) and isinstance(cs.get("best_epoch"), int)
            and isinstance(cs.get("best"), int | float)):
        raise CheckpointError(f"{path}: client_state must hold integers 'epoch', 'best_epoch' and a number 'best'")
    if not isinstance(state.get("trained"), dict) or not isinstance(state.get("world_size"), int):
        raise CheckpointError(f"{path}: 'trained' (name → shape) and 'world_size' are required")


def _check_rank_state(directory: Path, rank: int, state: dict[str, Any]) -> None:
    path = directory / rank_file(rank)
    files = state.get("files")
    if not (isinstance(files, list) and all(isinstance(f, str) and f and ".." not in Path(f).parts
                                             and not Path(f).is_absolute() for f in files)):
        raise CheckpointError(f"{path}: 'files' must list the engine files (relative paths inside the checkpoint)")
    for name in files:
        _tensor_shapes(directory / name)  # present, safetensors, this format
    rng = state.get("rng")
    try:
        version, values, _ = rng["python"]
        kind, keys, *_ = rng["numpy"]
        ok = (isinstance(version, int) and len(values) == 625 and kind == "MT19937" and len(keys) == 624
              and all(isinstance(b, int) and 0 <= b < 256 for b in rng["torch"]))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: 'rng' must hold the python, numpy and torch RNG states")


def read_checkpoint(directory: Path, *, engine: str, world_size: int, rank: int,
                    shapes: Mapping[str, list[int]] | None) -> Loaded:
    """Validate a checkpoint directory and read its engine-independent part (nothing is unpickled).

    Every file is checked before anything is returned: ``state.json`` and each rank's JSON parse and
    hold what they must, every engine file a rank lists is a safetensors file of this format, and the
    trained tensors' names and shapes match the model.

    Parameters
    ----------
    directory
        The checkpoint directory.
    engine, world_size
        What the checkpoint must have been written by.
    rank
        This process's rank (its ``rank<r>.json`` is returned).
    shapes
        Expected name → shape of the trained tensors (:func:`expected_shapes`); ``None`` skips the
        model check (structure only).

    Returns
    -------
    Loaded
        Client state, this rank's state and (when ``shapes`` is given) the trained tensors.

    Raises
    ------
    CheckpointError
        Naming the file and what is wrong.
    """
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    state = read_json(directory / STATE_FILE)
    _check_state(directory, state)
    if state["engine"] != engine or state["world_size"] != world_size:
        raise CheckpointError(f"{directory / STATE_FILE}: written by engine {state['engine']!r} on "
                              f"{state['world_size']} rank(s); this run uses {engine!r} on {world_size}")
    rank_states = {}
    for r in range(world_size):
        rank_states[r] = read_json(directory / rank_file(r))
        _check_rank_state(directory, r, rank_states[r])
    stored = _tensor_shapes(directory / TRAINED_FILE)
    if stored != state["trained"]:
        raise CheckpointError(f"{directory / TRAINED_FILE}: tensors do not match {directory / STATE_FILE}")
    trained: dict[str, torch.Tensor] = {}
    if shapes is not None:
        _check_shapes(directory / TRAINED_FILE, stored, shapes)
        with _open_safetensors(directory / TRAINED_FILE) as f:
            trained = {k: f.get_tensor(k) for k in f.keys()}
    return Loaded(state["client_state"], rank_states[rank], trained)


def _check_shapes(path: Path, stored: Mapping[str, list[int]], expected: Mapping[str, list[int]]) -> None:
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: tensor names do not match the model (missing: {', '.join(missing[:5]) or '-'};"
                              f" unexpected: {', '.join(extra[:5]) or '-'})")
    for k, shape in expected.items():
        if list(stored[k]) != list(shape):
            raise CheckpointError(f"{path}: {k} has shape {stored[k]}, the model expects {list(shape)}")


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` looks like a checkpoint (holds ``state.json``); :func:`read_checkpoint` validates."""
    return (directory / STATE_FILE).is_file()


def require_checkpoint(directory: Path | None, where: Path | str) -> Path:
    """``directory`` when it holds a checkpoint; else the ``--resume`` refusal (a :class:`ConfigError`, exit 2).

    Parameters
    ----------
    directory
        The checkpoint to continue from (``None``: none was found).
    where
        Where it was looked for (named in the message).
    """
    if directory is None or not has_checkpoint(directory):
        raise ConfigError(f"--resume: no checkpoint in {where}; run without --resume to start fresh")
    return directory


def consolidated_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint of either engine, full and fp32-or-native on CPU.

    ZeRO partitions are already gathered at save time, so this reads ``trained.safetensors`` only.
    The frozen backbone is not included: load into a model rebuilt from the run's config with
    :func:`restore_model`.

    Parameters
    ----------
    directory
        A checkpoint directory (a run directory's best or last checkpoint).
    """
    state = read_json(directory / STATE_FILE)
    _check_state(directory, state)
    with _open_safetensors(directory / TRAINED_FILE) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def restore_model(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's trained tensors into ``model`` (built from the run's config, seeded as the run was).

    Raises
    ------
    CheckpointError
        When the checkpoint's tensor names or shapes do not match ``model``.
    """
    tensors = consolidated_state_dict(directory)
    _check_shapes(directory / TRAINED_FILE, {k: list(v.shape) for k, v in tensors.items()}, expected_shapes(model))
    model.load_state_dict(tensors, strict=False)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing what was there (old copy removed last)."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointEngine(Protocol):
    """What a checkpoint store needs from an engine (see :class:`pertadapt.train.engine.Engine`)."""

    rank: int

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write a checkpoint."""
        ...

    def load(self, directory: Path) -> dict[str, Any]:
        """Validate and restore a checkpoint; its client state."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a barrier)."""
        ...


class Checkpoints(Protocol):
    """Where the training loop's checkpoints live: the run directory, or Ray Train storage."""

    def restore(self, engine: CheckpointEngine) -> dict[str, Any] | None:
        """Validate and load the checkpoint to continue from; its client state, or ``None`` to start fresh."""
        ...

    def save(self, engine: CheckpointEngine, client_state: dict[str, Any], is_best: bool) -> None:
        """Checkpoint the end of epoch ``client_state['epoch']`` (``is_best``: it is the selected epoch so far)."""
        ...

    def load_best(self, engine: CheckpointEngine, epoch: int) -> dict[str, Any]:
        """Load the checkpoint of the selected epoch ``epoch``; its client state."""
        ...


class DirCheckpoints:
    """The run directory's last and best checkpoints, each replaced whole once complete (in-process runs).

    Parameters
    ----------
    run
        The run directory.
    resume
        Continue from the last checkpoint; without one, :meth:`restore` refuses (a :class:`ConfigError`).
    """

    def __init__(self, run: RunDir, *, resume: bool) -> None:
        self.run = run
        self.resume = resume

    def restore(self, engine: CheckpointEngine) -> dict[str, Any] | None:
        if not self.resume:
            return None
        return engine.load(require_checkpoint(self.run.last_checkpoint, self.run.last_checkpoint))

    def save(self, engine: CheckpointEngine, client_state: dict[str, Any], is_best: bool) -> None:
        new = self.run.checkpoints / ".last.new"
        if engine.rank == 0:
            shutil.rmtree(new, ignore_errors=True)
        engine.gather(None)
        engine.save(new, client_state)
        engine.gather(None)
        if engine.rank == 0:
            if is_best:
                copy = self.run.checkpoints / ".best.new"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(new, copy)
                replace_dir(copy, self.run.best_checkpoint)
            replace_dir(new, self.run.last_checkpoint)

    def load_best(self, engine: CheckpointEngine, epoch: int) -> dict[str, Any]:
        return engine.load(self.run.best_checkpoint)
