"""What the sweep driver hands each Tune trial: :class:`TrialSpec`, and where a trial's tuned parameters sit.

A Tune trial's config is ``{"trial": TrialSpec}`` for a grid trial and ``{"trial": TrialSpec, "tuned":
{dotted key: value}}`` for an Optuna sample (:data:`TUNED_KEY`; the search space is declared under it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertadapt.config.schema import RunConfig
from pertadapt.remote import join
from pertadapt.rundir import RunDir

__all__ = ["SPEC_KEY", "TUNED_KEY", "TrialSpec", "trial_of", "tuned_of"]

#: Key of the :class:`TrialSpec` in a Tune trial's config.
SPEC_KEY = "trial"
#: Key of an Optuna sample's parameters (dotted config key → value) in a Tune trial's config.
TUNED_KEY = "tuned"


@dataclass(frozen=True)
class TrialSpec:
    """One trial as the driver plans it (an HPO arm's spec is shared by its samples).

    Attributes
    ----------
    key
        Grid trial key (``<dataset>/<backbone>/<arm>/seed<s>``, levels that do not vary left out).
    config
        The run config, data path in (tuned parameters are applied per sample).
    run_dir
        The run directory in the sweep directory (the driver keeps the W&B run there and reads the results
        there); an HPO sample's is a folder below, named by its Tune trial id.
    home
        The run directory's home on an object store, where the trial works (``None``: ``run_dir``).
    storage
        Ray storage (Ray Train checkpoints), a path or a URI.
    tags
        W&B tags (the arm's toggles).
    job_type
        W&B job type: ``baseline`` or ``model``.
    """

    key: str
    config: RunConfig
    run_dir: Path
    home: str | None
    storage: str
    tags: tuple[str, ...]
    job_type: str

    def name(self, sample: str | None) -> str:
        """The run name (Ray Train run, W&B run): the key with ``-`` for ``/``, and an HPO sample's trial id."""
        name = self.key.replace("/", "-")
        return f"{name}-{sample}" if sample else name

    def local_dir(self, sample: str | None) -> Path:
        """The run directory in the sweep directory (an HPO ``sample``'s: its Tune trial id below)."""
        return self.run_dir / sample if sample else self.run_dir

    def run(self, sample: str | None) -> RunDir:
        """Where the trial works: its home on the object store, or :meth:`local_dir`."""
        if self.home is None:
            return RunDir(self.local_dir(sample))
        return RunDir.at(join(self.home, sample) if sample else self.home)


def trial_of(config: Mapping[str, Any]) -> TrialSpec:
    """The :class:`TrialSpec` in a Tune trial's config."""
    return config[SPEC_KEY]


def tuned_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """An Optuna sample's parameters in a Tune trial's config (``{}`` for a grid trial)."""
    return dict(config.get(TUNED_KEY) or {})
