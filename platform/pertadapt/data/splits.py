"""Condition-level train/val/test splits, assignment-identical to GEARS's ``DataSplitter``.

Two kinds are provided, each mirroring the GEARS split of the same name (``gears/data_utils.py``,
``DataSplitter.split_data`` as called by ``PertData.prepare_split``):

``simulation``
    ``get_simulation_split`` applied to all non-control conditions with
    (``train_gene_frac``, ``combo_seen2_train_frac``), then re-applied to the resulting training list
    with (0.9, 0.9) to carve out validation; ``ctrl`` is added to train. Each of the (up to four) draws
    reseeds a legacy ``RandomState`` with ``seed`` exactly where GEARS calls ``np.random.seed(seed)``.
``single``
    ``get_split_list`` of split type ``single``: seed once, draw ``int(n_singles * test_frac)`` genes
    *with replacement* from all perturbed genes; their singles go to test, combinations containing
    one of them are held out of every set (listed in :attr:`ConditionSplit.excluded`); the same draw
    on the remaining list (continuing the random stream, no reseed) with ``val_frac`` yields val.

Both GEARS draws depend only on sorted arrays (``np.unique`` / ``np.setdiff1d``), so assignment does
not depend on the input order. ``A+B`` and ``B+A`` (and ``A+ctrl`` / ``ctrl+A``) are one condition:
a condition written several ways is drawn once under its canonical name
(:func:`pertadapt.data.conditions.unify_spellings`) and every spelling lands in the same set. When
each condition has one spelling (as in GEARS's published files) the assignment is exactly GEARS's.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertadapt.config.schema import SPLIT_KINDS, SUBGROUPS
from pertadapt.data.conditions import condition_genes, is_control, unify_spellings
from pertadapt.data.io import ParamError, check_output_path, check_param
from pertadapt.data.keys import CONTROL
from pertadapt.files import atomic_write_text

__all__ = ["KINDS", "SUBGROUPS", "ConditionSplit", "SplitError", "check_split_params", "split_conditions"]

log = logging.getLogger(__name__)

#: Split kinds, named as in GEARS.
KINDS = SPLIT_KINDS
#: GEARS's fixed fractions for the validation re-split of the simulation split.
_VAL_GENE_FRAC = 0.9
_VAL_SEEN2_FRAC = 0.9
#: Seeds ``numpy.random.RandomState`` accepts.
_MAX_SEED = 2**32 - 1


class SplitError(ValueError):
    """A split that cannot be made or read; the message names the condition, key or file."""


@dataclass(frozen=True)
class ConditionSplit:
    """Which conditions are trained on, validated on and tested on.

    Attributes
    ----------
    train, val, test
        Sorted condition names (as spelled in the data); ``ctrl`` is always in ``train``.
    subgroups
        ``combo_seen0``, ``combo_seen1``, ``combo_seen2``, ``unseen_single`` -> sorted test conditions.
    val_subgroups
        The same four keys for the validation conditions.
    seed
        The split seed.
    kind
        ``simulation`` or ``single``.
    excluded
        Conditions in no set (``single`` split: combinations that contain a held-out gene).
    params
        The fractions used (``train_gene_frac`` and ``combo_seen2_train_frac``, or ``test_frac`` and
        ``val_frac``).
    """

    train: list[str]
    val: list[str]
    test: list[str]
    subgroups: dict[str, list[str]]
    val_subgroups: dict[str, list[str]]
    seed: int
    kind: str
    excluded: list[str] = field(default_factory=list)
    params: dict[str, float] = field(default_factory=dict)

    def set_of(self, condition: str) -> str | None:
        """``'train'``, ``'val'``, ``'test'`` or ``None`` (excluded or unknown) for one condition."""
        for name in ("train", "val", "test"):
            if condition in getattr(self, name):
                return name
        return None

    def to_json(self, path: str | Path, data_hash: str) -> None:
        """Write the split atomically as JSON.

        Parameters
        ----------
        path
            Output file.
        data_hash
            SHA-256 hex digest of the data file the split was made from (key ``data_sha256``).

        Raises
        ------
        pertadapt.data.io.ParamError
            If ``path`` cannot be written (:func:`pertadapt.data.io.check_output_path`).
        """
        check_output_path(path)
        doc = {
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "subgroups": self.subgroups,
            "val_subgroups": self.val_subgroups,
            "excluded": self.excluded,
            "data_sha256": data_hash,
            "seed": self.seed,
            "kind": self.kind,
            "params": self.params,
        }
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path, *, expect_sha256: str | None = None) -> ConditionSplit:
        """Read a split written by :meth:`to_json`.

        Parameters
        ----------
        path
            The JSON file.
        expect_sha256
            If given, the file's ``data_sha256`` must equal it (the split belongs to that data file).

        Raises
        ------
        SplitError
            On an unreadable file (missing, not UTF-8 JSON, not an object), a missing key, an unknown
            kind or a hash mismatch; the message names the file and key.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SplitError(f"{path}: not a readable split JSON file ({e})") from e
        if not isinstance(doc, dict):
            raise SplitError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        for key in ("train", "val", "test", "subgroups", "data_sha256", "seed", "kind"):
            if key not in doc:
                raise SplitError(f"{path}: key {key!r} missing")
        if doc["kind"] not in KINDS:
            raise SplitError(f"{path}: kind {doc['kind']!r} is not one of {', '.join(KINDS)}")
        if expect_sha256 is not None and doc["data_sha256"] != expect_sha256:
            raise SplitError(f"{path}: data_sha256 {doc['data_sha256']} does not match the data file "
                             f"({expect_sha256}); the split was made from other data")
        groups = {}
        for key in ("subgroups", "val_subgroups"):
            value = doc.get(key, {})
            if not isinstance(value, dict):
                raise SplitError(f"{path}: {key}: expected an object of lists, got {type(value).__name__}")
            groups[key] = {k: _names(path, f"{key}.{k}", v) for k, v in value.items()}
        try:
            seed = int(doc["seed"])
            params = {k: float(v) for k, v in doc.get("params", {}).items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise SplitError(f"{path}: seed / params: expected an integer and numbers ({e})") from e
        return cls(train=_names(path, "train", doc["train"]), val=_names(path, "val", doc["val"]),
                   test=_names(path, "test", doc["test"]), subgroups=groups["subgroups"],
                   val_subgroups=groups["val_subgroups"], seed=seed, kind=doc["kind"],
                   excluded=_names(path, "excluded", doc.get("excluded", [])), params=params)


def _names(path: str | Path, key: str, value: object) -> list[str]:
    """``value`` as a list of condition names; :class:`SplitError` naming ``path`` and ``key`` otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SplitError(f"{path}: {key}: expected a list of condition names, got {value!r:.80}")
    return list(value)


def _genes(perts: Sequence[str]) -> np.ndarray:
    """Sorted unique genes of ``perts`` (GEARS ``get_genes_from_perts``), shape ``(n_genes,)``."""
    return np.unique([g for p in perts for g in condition_genes(p)])


def _n_seen(pert: str, seen: set[str]) -> int:
    return sum(g in seen for g in condition_genes(pert))


def _simulation(perts: Sequence[str], gene_frac: float, seen2_frac: float,
                seed: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """One GEARS ``get_simulation_split`` pass: ``(train, test, test subgroups)``."""
    genes = _genes(perts)
    train_genes = np.random.RandomState(seed).choice(genes, int(len(genes) * gene_frac), replace=False)
    seen = {str(g) for g in train_genes}
    singles = [p for p in perts if len(condition_genes(p)) == 1]
    combos = [p for p in perts if len(condition_genes(p)) == 2]
    combo_any = [p for p in combos if _n_seen(p, seen) > 0]
    seen1 = [p for p in combo_any if _n_seen(p, seen) == 1]
    both_seen = np.setdiff1d(combo_any, seen1)
    combo_train = np.random.RandomState(seed).choice(both_seen, int(len(both_seen) * seen2_frac),
                                                     replace=False)
    seen2 = [str(p) for p in np.setdiff1d(both_seen, combo_train)]
    groups = {
        "combo_seen0": [p for p in combos if _n_seen(p, seen) == 0],
        "combo_seen1": seen1,
        "combo_seen2": seen2,
        "unseen_single": [p for p in singles if _n_seen(p, seen) == 0],
    }
    train = [p for p in singles if _n_seen(p, seen) == 1] + [str(p) for p in combo_train]
    test = [p for name in SUBGROUPS for p in groups[name]]
    return train, test, groups


def _single(perts: Sequence[str], frac: float,
            rng: np.random.RandomState) -> tuple[list[str], list[str], list[str]]:
    """One GEARS ``get_split_list`` pass of type ``single``: ``(train, test, held_out)``."""
    singles = [p for p in perts if len(condition_genes(p)) == 1]
    test_genes = {str(g) for g in rng.choice(_genes(perts), int(len(singles) * frac))}
    test = [p for p in singles if _n_seen(p, test_genes) > 0]
    held = [p for p in perts if len(condition_genes(p)) == 2 and _n_seen(p, test_genes) > 0]
    out = set(test) | set(held)
    return [p for p in perts if p not in out], test, held


def _representatives(conditions: Sequence[str]) -> dict[str, list[str]]:
    """Unified name -> all its spellings, for non-control conditions (``A+B`` ~ ``B+A``)."""
    reps: dict[str, list[str]] = defaultdict(list)
    for spelling, name in sorted(unify_spellings(conditions).items()):
        if not is_control(name):
            reps[name].append(spelling)
    return reps


def check_split_params(kind: str = "simulation", *, seed: int, train_gene_frac: float = 0.75,
                       combo_seen2_train_frac: float = 0.75, test_frac: float = 0.1, val_frac: float = 0.1) -> None:
    """Check the parameters of :func:`split_conditions` (the command line calls it before reading data).

    Raises
    ------
    pertadapt.data.io.ParamError
        Naming the first one outside its range: ``kind`` not in :data:`KINDS`, ``seed`` not in
        ``[0, 2**32 - 1]`` (what GEARS's ``np.random.seed`` accepts), ``train_gene_frac`` not in
        ``(0, 1)``, another fraction not in ``[0, 1]``.
    """
    if kind not in KINDS:
        raise ParamError("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    check_param("seed", isinstance(seed, int | np.integer) and 0 <= seed <= _MAX_SEED,
                f"an integer in [0, {_MAX_SEED}]", seed)
    check_param("train_gene_frac", 0.0 < train_gene_frac < 1.0, "a fraction in (0, 1)", train_gene_frac)
    for name, value in (("combo_seen2_train_frac", combo_seen2_train_frac), ("test_frac", test_frac),
                        ("val_frac", val_frac)):
        check_param(name, 0.0 <= value <= 1.0, "a fraction in [0, 1]", value)


def split_conditions(conditions: Sequence[str], kind: str = "simulation", *, seed: int,
                     train_gene_frac: float = 0.75, combo_seen2_train_frac: float = 0.75,
                     test_frac: float = 0.1, val_frac: float = 0.1) -> ConditionSplit:
    """Split condition names into train/val/test exactly as GEARS's ``DataSplitter`` does.

    Parameters
    ----------
    conditions
        Condition names (``ctrl``, ``A+ctrl``, ``A+B``), e.g. ``adata.obs['condition'].unique()``;
        duplicates and order do not matter.
    kind
        ``simulation`` (GEARS ``simulation``) or ``single`` (GEARS ``single``); see the module docstring.
    seed
        The GEARS ``seed`` argument.
    train_gene_frac, combo_seen2_train_frac
        GEARS ``train_gene_set_size`` and ``combo_seen2_train_frac`` (``simulation`` only).
    test_frac, val_frac
        GEARS ``combo_single_split_test_set_fraction`` and ``val_size`` (``single`` only).

    Returns
    -------
    ConditionSplit
        With sorted lists; ``ctrl`` in train.

    Raises
    ------
    pertadapt.data.io.ParamError
        On a parameter outside its range (:func:`check_split_params`).
    SplitError
        On no perturbed condition.
    pertadapt.data.conditions.ConditionError
        On an unreadable condition name (the message names it).
    """
    check_split_params(kind, seed=seed, train_gene_frac=train_gene_frac,
                       combo_seen2_train_frac=combo_seen2_train_frac, test_frac=test_frac, val_frac=val_frac)
    reps = _representatives(conditions)
    perts = sorted(reps)
    if not perts:
        raise SplitError("no perturbed condition to split (only control cells?)")
    empty = {name: [] for name in SUBGROUPS}
    if kind == "simulation":
        train, test, groups = _simulation(perts, train_gene_frac, combo_seen2_train_frac, seed)
        train, val, val_groups = _simulation(train, _VAL_GENE_FRAC, _VAL_SEEN2_FRAC, seed)
        held: list[str] = []
        params = {"train_gene_frac": train_gene_frac, "combo_seen2_train_frac": combo_seen2_train_frac}
    else:
        rng = np.random.RandomState(seed)
        train, test, held = _single(perts, test_frac, rng)
        train, val, held_val = _single(train, val_frac, rng)
        held += held_val
        groups = {**empty, "unseen_single": test}
        val_groups = {**empty, "unseen_single": val}
        params = {"test_frac": test_frac, "val_frac": val_frac}

    def expand(names: Sequence[str]) -> list[str]:
        return sorted(s for n in names for s in reps[n])

    split = ConditionSplit(
        train=sorted([*expand(train), CONTROL]), val=expand(val), test=expand(test),
        subgroups={k: expand(groups[k]) for k in SUBGROUPS},
        val_subgroups={k: expand(val_groups[k]) for k in SUBGROUPS},
        seed=seed, kind=kind, excluded=expand(held), params=params,
    )
    log.info("%s split (seed %d): %d train, %d val, %d test, %d excluded conditions", kind, seed,
             len(split.train), len(split.val), len(split.test), len(split.excluded))
    return split
