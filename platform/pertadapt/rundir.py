"""A run's directory: every file it holds, named once, read and written here (atomically), and kept on an
object store when the run's home is one.

A run directory (``pertadapt train --out``, ``<sweep>/runs/<trial>``, ``<sweep>/hpo/<arm>/<sample>``) holds

=========================  ==========================================================================
``config.yaml``            the resolved run config
``provenance.json``        git SHA, versions, data / gene-order / GO hashes, config hash, ranks, split
``metrics.jsonl``          one row per epoch (``epoch``, ``lr``, losses, validation metrics)
``final_metrics.json``     the selected epoch's val/test metrics and ``best_epoch``
``per_condition.csv``      one row per test condition: ``condition, subgroup`` and every metric
``test_predictions.h5ad``  the selected epoch's mean prediction per test condition
``attempts.json``          one record per start of training (retries, resumes)
``nonfinite.json``         written when the loss became NaN/inf (a retry would only fail again)
``timeline.jsonl``         wall-clock marks of the run's phases
``cost.json``              the measured CPU time of the run's processes (``cpu_s``, ``processes``, ``wall_s``)
``ckpt/last``, ``ckpt/best``  in-process checkpoints (the last epoch, the selected one)
``ray/``                   Ray storage of a ``pertadapt train`` run on Ray Train workers
``wandb/``                 W&B runs (``offline-run-*`` without a W&B server)
=========================  ==========================================================================

A run whose home is an object-store URI is worked on in a node-local copy (``$PERTADAPT_CACHE/runs/...``):
:meth:`RunDir.pull` makes it the store's copy before a process writes into it, and :meth:`RunDir.commit`
uploads what changed (rank 0, after every epoch and at the end). For a run on a path both do nothing more
than make sure the directory exists: every file is already in place once written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pertadapt import remote
from pertadapt.files import atomic_write_json, atomic_write_text, cache_dir, sha256_bytes

__all__ = ["RunDir"]

_CONFIG = "config.yaml"
_PROVENANCE = "provenance.json"
_HISTORY = "metrics.jsonl"
_FINAL = "final_metrics.json"
_PER_CONDITION = "per_condition.csv"
_PREDICTIONS = "test_predictions.h5ad"
_ATTEMPTS = "attempts.json"
_NONFINITE = "nonfinite.json"
_TIMELINE = "timeline.jsonl"
_COST = "cost.json"
_CKPT = "ckpt"
_RAY = "ray"
_WANDB = "wandb"


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; ``None`` when it is missing or not JSON (a run that never wrote it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


class RunDir:
    """One run's directory (see the module docstring for its files).

    Parameters
    ----------
    path
        Where this process reads and writes the run's files: the run directory itself, or the node-local
        copy of a run whose home is on an object store.
    home
        The run directory's URI on an object store (``None``: ``path`` is the run directory).
    """

    #: Folders a run's home on an object store keeps when the sweep driver copies the run directories home.
    CHECKPOINT_DIRS = (_CKPT,)

    def __init__(self, path: str | os.PathLike[str], home: str | None = None) -> None:
        self.path = Path(path)
        self.home = home
        self._pushed: dict[str, tuple[int, int]] = {}

    @classmethod
    def at(cls, location: str | os.PathLike[str] | RunDir) -> RunDir:
        """The run directory at ``location``: a path, an object-store URI (worked on in the node-local copy,
        the same folder for every process of the run on a node), or a :class:`RunDir` (returned as it is)."""
        if isinstance(location, RunDir):
            return location
        if remote.is_uri(location):
            uri = str(location)
            return cls(cache_dir() / "runs" / sha256_bytes(uri)[:16], home=uri)
        return cls(location)

    @property
    def location(self) -> str:
        """What :meth:`at` turns back into this run directory (in another process, on another node)."""
        return self.home if self.home is not None else str(self.path)

    @property
    def is_remote(self) -> bool:
        """Whether the run's home is an object store."""
        return self.home is not None

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    # ---- the files -----------------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        """``config.yaml``: the resolved run config."""
        return self.path / _CONFIG

    @property
    def provenance_file(self) -> Path:
        """``provenance.json``: where the run's inputs, code and ranks came from."""
        return self.path / _PROVENANCE

    @property
    def history_file(self) -> Path:
        """``metrics.jsonl``: one JSON row per epoch."""
        return self.path / _HISTORY

    @property
    def final_metrics_file(self) -> Path:
        """``final_metrics.json``: the run's final metrics."""
        return self.path / _FINAL

    @property
    def per_condition_file(self) -> Path:
        """``per_condition.csv``: every test metric per test condition."""
        return self.path / _PER_CONDITION

    @property
    def predictions_file(self) -> Path:
        """``test_predictions.h5ad``: mean prediction per test condition."""
        return self.path / _PREDICTIONS

    @property
    def attempts_file(self) -> Path:
        """``attempts.json``: one record per start of training."""
        return self.path / _ATTEMPTS

    @property
    def nonfinite_file(self) -> Path:
        """``nonfinite.json``: the non-finite loss of an earlier attempt."""
        return self.path / _NONFINITE

    @property
    def timeline_file(self) -> Path:
        """``timeline.jsonl``: wall-clock marks of the run's phases."""
        return self.path / _TIMELINE

    @property
    def cost_file(self) -> Path:
        """``cost.json``: the measured CPU time of the run's processes."""
        return self.path / _COST

    @property
    def checkpoints(self) -> Path:
        """``ckpt/``: the in-process checkpoints."""
        return self.path / _CKPT

    @property
    def last_checkpoint(self) -> Path:
        """``ckpt/last``: the last epoch's checkpoint (what a resumed run continues from)."""
        return self.checkpoints / "last"

    @property
    def best_checkpoint(self) -> Path:
        """``ckpt/best``: the selected epoch's checkpoint."""
        return self.checkpoints / "best"

    @property
    def ray_storage(self) -> Path:
        """``ray/``: default Ray storage of a run on Ray Train workers."""
        return self.path / _RAY

    def wandb_offline_runs(self) -> list[Path]:
        """The run's offline W&B runs (``wandb/offline-run-*``), oldest first."""
        return sorted(self.path.glob(f"{_WANDB}/offline-run-*"))

    # ---- reading and writing -------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.yaml`` (key order kept)."""
        import yaml

        atomic_write_text(self.config_file, yaml.safe_dump(dict(config), sort_keys=False))

    def config(self) -> dict[str, Any]:
        """``config.yaml`` as a dict (``{}`` when missing or empty)."""
        import yaml

        if not self.config_file.is_file():
            return {}
        return yaml.safe_load(self.config_file.read_text()) or {}

    def write_provenance(self, record: Mapping[str, Any]) -> None:
        """Write ``provenance.json``."""
        atomic_write_json(self.provenance_file, dict(record))

    def provenance(self) -> dict[str, Any]:
        """``provenance.json`` (``{}`` when missing or malformed)."""
        found = _read_json(self.provenance_file)
        return found if isinstance(found, dict) else {}

    def write_final_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Write ``final_metrics.json``."""
        atomic_write_json(self.final_metrics_file, dict(metrics))

    def final_metrics(self) -> dict[str, Any] | None:
        """``final_metrics.json``; ``None`` when the run has not finished (missing or malformed)."""
        found = _read_json(self.final_metrics_file)
        return found if isinstance(found, dict) else None

    def finished_metrics(self, expected_hash: str | None) -> dict[str, Any] | None:
        """The final metrics when the run finished the config hashed ``expected_hash`` (``None``: any config),
        else ``None``: files an earlier run with another config left behind never count."""
        final = self.final_metrics()
        if final is None or (expected_hash is not None and self.provenance().get("config_hash") != expected_hash):
            return None
        return final

    def write_cost(self, *, cpu_s: float, processes: int, wall_s: float) -> None:
        """Write ``cost.json``: ``cpu_s`` (the process CPU time, user + system, of every rank of the run from
        the start of training to its end, summed over ranks), ``processes`` (the ranks) and ``wall_s`` (rank 0's
        wall seconds over the same span)."""
        atomic_write_json(self.cost_file, {"cpu_s": cpu_s, "processes": processes, "wall_s": wall_s})

    def cost(self) -> dict[str, Any]:
        """``cost.json`` (``{}`` when missing or malformed: a run that did not finish, or an older one)."""
        found = _read_json(self.cost_file)
        return found if isinstance(found, dict) else {}

    def write_per_condition(self, csv_text: str) -> None:
        """Write ``per_condition.csv``."""
        atomic_write_text(self.per_condition_file, csv_text)

    def append_history(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row to ``metrics.jsonl``."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.history_file.open("a") as fh:
            fh.write(json.dumps(dict(row)) + "\n")

    def keep_history(self, start: int) -> None:
        """Keep the ``metrics.jsonl`` rows of the epochs before ``start`` (all of them are redone from there)."""
        rows = self.history()
        atomic_write_text(self.history_file, "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] < start))

    def history(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` in file order (``[]`` when there is none)."""
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]

    def attempts(self) -> list[dict[str, Any]] | None:
        """``attempts.json``'s records (``None`` when there is none)."""
        found = _read_json(self.attempts_file)
        return found if isinstance(found, list) else None

    def record_attempt(self, resumed_from_epoch: int | None) -> None:
        """Append ``{attempt, started_at, resumed_from_epoch}`` to ``attempts.json`` (rank 0, at each start).

        ``resumed_from_epoch`` is the first epoch this attempt trains after restoring a checkpoint, ``None``
        when it starts from scratch.
        """
        attempts = self.attempts() or []
        attempts.append({"attempt": len(attempts) + 1,
                         "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                         "resumed_from_epoch": resumed_from_epoch})
        atomic_write_json(self.attempts_file, attempts)

    def record_nonfinite(self, message: str, *, epoch: int, micro_step: int) -> None:
        """Write ``nonfinite.json`` (the loss became NaN/inf) and, on an object store, upload it at once: a
        retry, on whichever node, must find it."""
        atomic_write_json(self.nonfinite_file, {"error": message, "epoch": epoch, "micro_step": micro_step})
        if self.home is not None:
            remote.upload_file(self.nonfinite_file, remote.join(self.home, _NONFINITE))

    def check_not_nonfinite(self) -> None:
        """Re-raise the recorded non-finite loss of an earlier attempt (a restarted attempt trains nothing).

        Raises
        ------
        FloatingPointError
            When ``nonfinite.json`` exists.
        """
        if self.nonfinite_file.is_file():
            found = _read_json(self.nonfinite_file)
            error = found.get("error") if isinstance(found, dict) else "unreadable record"
            raise FloatingPointError(f"{error} (recorded in {self.nonfinite_file}; not retried)")

    def clear_retry_state(self) -> None:
        """Remove the last run's ``attempts.json``, ``nonfinite.json`` and ``ckpt/`` (here and on the store):
        a fresh start."""
        for name in (_ATTEMPTS, _NONFINITE, _CKPT):
            if self.home is not None:
                remote.delete(remote.join(self.home, name))
                self._pushed = {k: v for k, v in self._pushed.items() if k != name and not k.startswith(f"{name}/")}
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)

    # ---- the object store ----------------------------------------------------------------------------------

    def pull(self) -> RunDir:
        """Make :attr:`path` the run directory's current content and return ``self``.

        On an object store, the node-local copy becomes the store's copy (local files the store lacks are
        removed); on a path, the directory is created.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if self.home is None:
            return self
        on_store = set(remote.list_files(self.home))
        for p in sorted(self.path.rglob("*"), reverse=True):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel not in on_store:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        remote.pull_tree(self.home, self.path)
        self._pushed = {p.relative_to(self.path).as_posix(): (st.st_size, st.st_mtime_ns)
                        for p in self.path.rglob("*") if p.is_file() for st in (p.stat(),)}
        return self

    def commit(self) -> int:
        """Make what this process wrote the run directory's content: on an object store, upload what changed
        since the last :meth:`pull` or :meth:`commit` (temporary files aside); on a path, nothing to do.

        Returns
        -------
        int
            Files uploaded.
        """
        if self.home is None or not self.path.is_dir():
            return 0
        return remote.push_tree(self.path, self.home, since=self._pushed)
