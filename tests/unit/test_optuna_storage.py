"""Where an arm's Optuna study lives: the sweep directory (sqlite, journal) or a database shared by sweeps."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from pertadapt.sweep.search_space import load_search_space
from pertadapt.sweep.tuner import _storage, fresh_study, study_name

SPACE = "params:\n  optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}\n"


def _space(tmp_path: Path, storage: str):
    path = tmp_path / "space.yaml"
    path.write_text(f"storage: {storage}\n{SPACE}")
    return load_search_space(path)


def test_a_database_url_holds_the_study_outside_the_sweep_and_names_it_per_sweep(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    (tmp_path / "shared").mkdir()
    space = _space(tmp_path, url)
    a, b = tmp_path / "sweep-a", tmp_path / "sweep-b"
    name_a = study_name(space, "paper", "full", a)
    assert name_a.startswith("paper-full-")
    assert name_a == study_name(space, "paper", "full", a)  # a resumed sweep finds its own study
    assert name_a != study_name(space, "paper", "full", b)  # another sweep never touches it
    storage = _storage(space, a)
    assert isinstance(storage, optuna.storages.RDBStorage)
    optuna.create_study(study_name=name_a, storage=storage).enqueue_trial({"optim.lr": 0.01})
    other = study_name(space, "paper", "full", b)
    optuna.create_study(study_name=other, storage=storage)
    assert not (a / "optuna").exists()  # nothing in the sweep directory
    fresh_study(storage, name_a)  # a sweep started afresh samples anew, the other sweep's study stays
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [other]
    fresh_study(storage, name_a)  # nothing to delete is no error


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_sweep_local_studies_keep_the_plain_name(tmp_path: Path, kind: str) -> None:
    space = _space(tmp_path, kind)
    assert study_name(space, "paper", "full", tmp_path / "sweep") == "paper-full"
    _storage(space, tmp_path / "sweep")
    assert (tmp_path / "sweep" / "optuna").is_dir()
