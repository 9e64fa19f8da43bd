"""Condition names and GEARS-identical splits (hand-checked examples, invariants, JSON round trip)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pertadapt.config import ConfigError
from pertadapt.data.conditions import (
    ConditionError,
    canonical_condition,
    condition_genes,
    is_control,
    parse_condition,
)
from pertadapt.data.io import ParamError
from pertadapt.data.splits import ConditionSplit, SplitError, split_conditions

SMALL = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl", "D+ctrl", "A+B", "A+C", "B+C", "C+D", "A+D", "B+D"]


def test_condition_names():
    assert canonical_condition("B+A") == "A+B" == canonical_condition("A+B")
    assert canonical_condition("ctrl+KLF1") == "KLF1+ctrl"
    assert condition_genes("CEBPB+CEBPA") == ("CEBPB", "CEBPA")
    assert condition_genes("ctrl") == ()
    assert is_control("ctrl")
    assert not is_control("A+ctrl")
    assert parse_condition("non-targeting", control_labels=["non-targeting"], delimiter="_") == "ctrl"
    assert parse_condition("KLF1_non-targeting", control_labels=["non-targeting"], delimiter="_") == "KLF1+ctrl"
    assert parse_condition("KLF1|CEBPA", delimiter="|") == "CEBPA+KLF1"
    for bad in ("A+B+C", "A++B", "A+A", "ctrl+ctrl"):
        with pytest.raises(ConditionError, match="condition"):
            condition_genes(bad)


def test_simulation_split_hand_checked():
    """GEARS ``simulation`` on 4 genes, seed 1, fractions 0.75/0.75 then 0.9/0.9.

    Hand derivation: ``RandomState(1).permutation(4) = [3, 2, 0, 1]`` picks ``int(4*0.75)=3`` train
    genes D, C, A from the sorted genes (B is unseen). Doubles with one seen gene (A+B, B+C, B+D) are
    combo_seen1; the both-seen doubles sorted are [A+C, A+D, C+D] and ``permutation(3) = [0, 2, 1]``
    keeps ``int(3*0.75)=2`` of them (A+C, C+D) in train, A+D is combo_seen2. The validation pass on
    train genes [A, C, D] keeps ``int(3*0.9)=2`` genes (A, D) via ``permutation(3)[:2]``, so C+ctrl and
    the two doubles with C go to val.
    """
    assert list(np.random.RandomState(1).permutation(4)) == [3, 2, 0, 1]
    assert list(np.random.RandomState(1).permutation(3)) == [0, 2, 1]
    s = split_conditions(list(reversed(SMALL)), "simulation", seed=1)
    assert s.train == ["A+ctrl", "D+ctrl", "ctrl"]
    assert s.val == ["A+C", "C+D", "C+ctrl"]
    assert s.test == ["A+B", "A+D", "B+C", "B+D", "B+ctrl"]
    assert s.subgroups == {"combo_seen0": [], "combo_seen1": ["A+B", "B+C", "B+D"],
                           "combo_seen2": ["A+D"], "unseen_single": ["B+ctrl"]}
    assert s.val_subgroups == {"combo_seen0": [], "combo_seen1": ["A+C", "C+D"], "combo_seen2": [],
                               "unseen_single": ["C+ctrl"]}


def test_single_split_hand_checked():
    """GEARS ``single``: seeded once, ``int(20*0.1)=2`` genes drawn with replacement.

    ``RandomState(0).randint(0, 20, 2) = [12, 15]`` -> G12, G15 test; G05+G12 held out. The stream
    continues (no reseed): ``randint(0, 18, 1) = [0]`` over the 18 remaining genes -> G00 val and
    G00+G05 held out.
    """
    conds = ["ctrl"] + [f"G{i:02d}+ctrl" for i in range(20)] + ["G00+G05", "G05+G12", "G03+G07"]
    s = split_conditions(conds, "single", seed=0)
    assert s.test == ["G12+ctrl", "G15+ctrl"] == s.subgroups["unseen_single"]
    assert s.val == ["G00+ctrl"]
    assert s.excluded == ["G00+G05", "G05+G12"]
    assert "G03+G07" in s.train
    assert "ctrl" in s.train


@pytest.mark.parametrize(("kind", "seed"), list(itertools.product(["simulation", "single"], range(1, 6))))
def test_no_leakage_and_order_free(kind, seed):
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(30)]
    conds = ["ctrl"] + [f"{g}+ctrl" for g in genes]
    conds += sorted({"+".join(rng.choice(genes, 2, replace=False)) for _ in range(60)})
    s = split_conditions(conds, kind, seed=seed)
    assert not set(s.test) & (set(s.train) | set(s.val))
    assert not set(s.val) & set(s.train)
    assert sorted(s.train + s.val + s.test + s.excluded) == sorted(conds)
    assert sorted(sum(s.subgroups.values(), [])) == s.test
    assert split_conditions(list(reversed(conds)), kind, seed=seed) == s


def test_spellings_are_one_condition():
    conds = [*SMALL, "D+C", "ctrl+B"]
    for seed in range(10):
        s = split_conditions(conds, seed=seed)
        assert s.set_of("C+D") == s.set_of("D+C")
        assert s.set_of("B+ctrl") == s.set_of("ctrl+B")


def test_json_round_trip(tmp_path):
    s = split_conditions(SMALL, seed=3)
    path = tmp_path / "split.json"
    s.to_json(path, "abc")
    assert ConditionSplit.from_json(path, expect_sha256="abc") == s
    with pytest.raises(SplitError, match="data_sha256"):
        ConditionSplit.from_json(path, expect_sha256="other")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"kind": "combo"}, "kind: 'combo' is not one of simulation, single"),
    ({"train_gene_frac": 1.0}, "train_gene_frac: expected a fraction in (0, 1), got 1.0"),
    ({"train_gene_frac": 0.0}, "train_gene_frac"),
    ({"combo_seen2_train_frac": -0.1}, "combo_seen2_train_frac: expected a fraction in [0, 1]"),
    ({"test_frac": 1.5}, "test_frac"),
    ({"val_frac": float("nan")}, "val_frac"),
    ({"seed": -1}, "seed: expected an integer in [0, 4294967295], got -1"),
    ({"seed": 2**32}, "seed"),
])
def test_bad_arguments(kwargs, needle):
    """Parameters outside their range are ParamErrors (ConfigError: exit 2), raised before any split work."""
    call = {"seed": 1, **kwargs}
    with pytest.raises(ParamError) as info:
        split_conditions(SMALL, **call)
    assert needle in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_nothing_to_split():
    with pytest.raises(SplitError, match="no perturbed"):
        split_conditions(["ctrl"], seed=1)


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe\x00binary", "not a readable split JSON file"),
    (b"{not json", "not a readable split JSON file"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"train": []}', "key 'val' missing"),
    (b'{"train": "A+ctrl", "val": [], "test": [], "subgroups": {}, "data_sha256": "x", "seed": 1, '
     b'"kind": "single"}', "train: expected a list of condition names"),
    (b'{"train": [], "val": [], "test": [], "subgroups": [], "data_sha256": "x", "seed": 1, "kind": "single"}',
     "subgroups: expected an object of lists"),
    (b'{"train": [], "val": [], "test": [], "subgroups": {}, "data_sha256": "x", "seed": "one", '
     b'"kind": "single"}', "seed / params"),
])
def test_from_json_rejects_malformed_files(tmp_path, content, needle):
    path = tmp_path / "split.json"
    path.write_bytes(content)
    with pytest.raises(SplitError, match="split.json") as info:
        ConditionSplit.from_json(path)
    assert needle in str(info.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(SplitError, match="nope.json: not a readable split JSON file"):
        ConditionSplit.from_json(tmp_path / "nope.json")


def test_to_json_refuses_a_directory(tmp_path):
    (tmp_path / "split.json").mkdir()
    with pytest.raises(ParamError, match="is a directory"):
        split_conditions(SMALL, seed=1).to_json(tmp_path / "split.json", "abc")
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]
