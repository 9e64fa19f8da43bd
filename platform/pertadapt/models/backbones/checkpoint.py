"""Checkpoint helpers shared by the pretrained backbones (AIDO.Cell, scFoundation).

Nothing here unpickles arbitrary objects: tensor files are read with :mod:`safetensors` or with
``torch.load(weights_only=True)``, and a file that needs more (a crafted or legacy pickle) is refused with
a :class:`CheckpointError` naming it. Every file is written through :func:`pertadapt.files.atomic_write`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pertadapt.files import atomic_write, atomic_write_text, fm_gene_vocabulary

__all__ = [
    "GENES_FILE",
    "CheckpointError",
    "build_or_load",
    "load_checked_state",
    "read_json_object",
    "read_safetensors",
    "read_torch_file",
    "resolve_vocab",
    "write_gene_file",
    "write_safetensors",
]

log = logging.getLogger(__name__)

#: File name of the gene vocabulary written next to our checkpoints (one symbol per line).
GENES_FILE = "genes.txt"
#: The published AIDO.Cell vocabulary table (column ``gene_name``).
_TSV_VOCAB = "OS_scRNA_gene_index.19264.tsv"

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint that does not fit: unreadable or unsafe file, wrong layout, parameter names/shapes or genes."""


# ---------------------------------------------------------------------------------------------------
# gene vocabularies
# ---------------------------------------------------------------------------------------------------


def _read_gene_file(directory: Path) -> tuple[str, ...] | None:
    """Gene vocabulary stored in a checkpoint directory (``genes.txt`` or the published TSV), else ``None``."""
    plain = directory / GENES_FILE
    if plain.is_file():
        return tuple(line.strip() for line in plain.read_text().splitlines() if line.strip())
    tsv = directory / _TSV_VOCAB
    if tsv.is_file():
        rows = [line.split("\t") for line in tsv.read_text().splitlines() if line.strip()]
        if not rows or "gene_name" not in rows[0]:
            raise CheckpointError(f"{tsv}: expected a header row with a 'gene_name' column")
        col = rows[0].index("gene_name")
        return tuple(r[col] for r in rows[1:])
    return None


def resolve_vocab(directory: Path, n_genes: int, what: str) -> tuple[str, ...]:
    """The gene vocabulary of a checkpoint with ``n_genes`` gene positions.

    Parameters
    ----------
    directory
        The checkpoint directory; its ``genes.txt`` (or ``OS_scRNA_gene_index.19264.tsv``) wins over the
        bundled 19,264-gene list.
    n_genes
        Gene positions of the model (``N``).
    what
        Prefix of error messages (backbone and checkpoint path).

    Raises
    ------
    CheckpointError
        When the stored list has another length, or no list is stored and ``n_genes`` is not 19,264.
    """
    genes = _read_gene_file(directory)
    if genes is None:
        genes = fm_gene_vocabulary()
        if n_genes != len(genes):
            raise CheckpointError(f"{what}: the model has {n_genes} gene positions but {directory} holds no "
                                  f"{GENES_FILE}; only the bundled {len(genes)}-gene vocabulary is known")
    if len(genes) != n_genes:
        raise CheckpointError(f"{what}: the gene list has {len(genes)} genes but the model has {n_genes} "
                              "gene positions")
    return genes


def _check_vocabulary(data_genes: Sequence[str], model_genes: Sequence[str], what: str) -> None:
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
    present = set(data_genes)
    missing = [g for g in model_genes if g not in present][:5]
    raise CheckpointError(
        f"{what}: data genes ({len(data_genes)}) do not match the checkpoint vocabulary ({len(model_genes)}); "
        f"first mismatches (data != checkpoint): {bad or 'none in the common prefix'}; "
        f"checkpoint genes absent from the data: {missing or 'none'}")


def write_gene_file(directory: Path, genes: Sequence[str]) -> None:
    """Write ``genes`` (one symbol per line) to ``directory / genes.txt`` atomically."""
    atomic_write_text(Path(directory) / GENES_FILE, "\n".join(genes) + "\n")


def build_or_load(checkpoint: str | None, genes: Sequence[str] | None, *,
                  random_init: Callable[[tuple[str, ...]], M], load: Callable[[str], M], what: str) -> M:
    """The shared logic of the backbone registry builders.

    Parameters
    ----------
    checkpoint
        A checkpoint path, or ``None`` for a random init.
    genes
        The data's gene order: the vocabulary of a random init (``None`` = the bundled 19,264 genes), and
        for a checkpoint the order its vocabulary must equal (``None`` = no check).
    random_init
        Builds a random-init model for a vocabulary.
    load
        Loads the model from ``checkpoint``; the result has a ``genes`` attribute.
    what
        Backbone name for error messages.

    Raises
    ------
    CheckpointError
        Naming the first gene mismatches between data and checkpoint (or as ``load``).
    """
    if checkpoint is None:
        return random_init(tuple(genes) if genes is not None else fm_gene_vocabulary())
    model = load(checkpoint)
    if genes is not None:
        _check_vocabulary(genes, model.genes or (), f"{what} checkpoint {checkpoint}")
    return model


# ---------------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------------


def load_checked_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` after requiring exactly the model's parameter/buffer names and shapes.

    Raises
    ------
    CheckpointError
        Naming missing and unexpected keys and every shape mismatch (checkpoint vs model); the model is
        left untouched.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and k not in not_tensors and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (first: {missing[:5]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (first: {unexpected[:5]})")
    if not_tensors:
        problems.append(f"entries that are not tensors: {not_tensors[:5]}")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:5]}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# tensor files
# ---------------------------------------------------------------------------------------------------

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_torch_file(path: Path) -> object:
    """Read a ``torch.save`` file without unpickling arbitrary objects (``weights_only=True``, on CPU).

    Returns
    -------
    object
        Tensors in plain containers (dicts, lists, tuples, strings, numbers), as saved.

    Raises
    ------
    CheckpointError
        When the file holds other objects (the message names the first refused global), or is not a
        readable ``torch.save`` file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        detail = f"it refers to {found.group(1)}" if found else "it is not a plain tensor pickle"
        raise CheckpointError(f"{path}: refused to load: {detail}; only tensors in plain containers are "
                              "loaded (weights_only=True), never arbitrary pickled objects") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from e


def read_json_object(path: Path, expected: str) -> dict:
    """The JSON object in ``path`` (a checkpoint's ``config.json``, a model card).

    Parameters
    ----------
    path
        The file.
    expected
        What the file's directory should be, for the message when the file is missing.

    Raises
    ------
    CheckpointError
        Naming the file when it is missing, not valid JSON or not an object.
    """
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} (expected {expected})")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into CPU tensors with the stored names, dtypes and shapes.

    Raises
    ------
    CheckpointError
        When the file is not a readable safetensors file.
    """
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` as safetensors (``{"format": "pt"}`` metadata, as HF writes), atomically."""
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(plain, p, metadata={"format": "pt"}))
