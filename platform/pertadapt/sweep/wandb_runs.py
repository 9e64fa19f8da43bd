"""One W&B run per sweep trial, kept by the sweep driver (a Tune callback), so that every trial's run ends cleanly.

A trial's epoch rows and final metrics reach the driver as Tune results (from rank 0 of a Ray Train
trial, or from an in-process trial). The driver opens the trial's run with its first result, logs
each epoch row, and closes it when Tune is done with the trial: ``finished`` with the final metrics as
summary; ``finished`` with the tag ``stopped_early`` when a scheduler (ASHA) stopped it, which kills the
trial's processes and would leave a run opened in a worker unclosed; ``failed`` on an error. A Ray Train
retry is the same trial, so it continues the same run. Workers need no W&B credentials: the mode is
resolved in the driver's environment (``logging.wandb: auto``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from pertadapt.remote import join
from pertadapt.report.logger import RunLogger
from pertadapt.report.wandb import open_logger
from pertadapt.train.run import FINISHED_KEY

__all__ = ["REPLAYED_KEY", "STOPPED_EARLY_TAG", "TrialRuns", "trial_metrics", "trial_place", "trial_remote"]

log = logging.getLogger(__name__)

#: Tag of the W&B run of a trial that a scheduler stopped before its last epoch.
STOPPED_EARLY_TAG = "stopped_early"
#: Key of the result with which a resumed sweep replays a trial that had already finished.
REPLAYED_KEY = "replayed"
_PREFIXES = ("train_", "loss_weight_", "val_", "test_")
_KEYS = ("epoch", "lr", "best_epoch")


def trial_place(spec: Mapping[str, Any], tuned: Mapping[str, Any], trial_id: str) -> tuple[Path, str]:
    """A trial's run directory and run name (Ray Train run, W&B run): an HPO sample's (``tuned`` parameters
    next to the spec) get its Tune trial id."""
    run_dir, name = Path(spec["run_dir"]), spec["key"].replace("/", "-")
    return (run_dir / trial_id, f"{name}-{trial_id}") if tuned else (run_dir, name)


def trial_remote(spec: Mapping[str, Any], tuned: Mapping[str, Any], trial_id: str) -> str | None:
    """Where the trial's run directory lives on an object store (``None``: on a path, :func:`trial_place`)."""
    home = spec.get("remote_run_dir")
    return None if home is None else (join(home, trial_id) if tuned else home)


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The run's own numbers in a Tune result (epoch row or final metrics), without Tune's bookkeeping."""
    return {k: v for k, v in result.items()
            if (k in _KEYS or k.startswith(_PREFIXES)) and isinstance(v, int | float) and not isinstance(v, bool)}


class TrialRuns(tune.Callback):
    """Opens, feeds and closes one W&B run per trial (see the module docstring).

    Each trial's ``config["trial"]`` carries ``run`` (the resolved run config as a dict, whose
    ``logging`` section gives mode, project and group), ``wandb`` (``tags``, ``job_type``), ``key`` and
    ``run_dir`` (:func:`trial_place`: where ``wandb/offline-run-*`` goes and the run's name).
    A run is opened with the trial's first result (or its error), so that a finished trial that a
    resumed sweep only replays (its result carries :data:`REPLAYED_KEY`) gets no second run.
    """

    def __init__(self) -> None:
        self.runs: dict[str, RunLogger] = {}
        self.final: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict[str, float]] = {}

    def _run(self, trial: Any) -> RunLogger:
        if trial.trial_id not in self.runs:  # a Ray Train retry of a trial continues its run
            spec = trial.config["trial"]
            params = {k: v for k, v in trial.config.items() if k != "trial"}
            run_dir, name = trial_place(spec, params, trial.trial_id)
            lg = spec["run"]["logging"]
            self.runs[trial.trial_id] = open_logger(
                mode=lg["wandb"], project=lg["project"], group=lg["group"], name=name, directory=run_dir,
                config={**spec["run"], "tuned": params}, tags=spec["wandb"]["tags"],
                job_type=spec["wandb"]["job_type"], concurrent=True)
        return self.runs[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(REPLAYED_KEY):
            return
        metrics = trial_metrics(result)
        if result.get(FINISHED_KEY):
            self._run(trial)
            self.final[trial.trial_id] = metrics
        elif "epoch" in metrics:
            self.last[trial.trial_id] = metrics
            self._run(trial).log(metrics, step=int(metrics["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.runs.pop(trial.trial_id, None)
        final, last = self.final.pop(trial.trial_id, None), self.last.pop(trial.trial_id, {})
        if run is None:
            return
        if final is not None:
            run.finish(final)
        else:  # Tune stopped it (ASHA) before its final report
            log.info("trial %s stopped early: W&B run closed with the tag %r", trial.trial_id, STOPPED_EARLY_TAG)
            run.finish(last, tags=(STOPPED_EARLY_TAG,))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.final.pop(trial.trial_id, None)
        self._run(trial).finish(self.last.pop(trial.trial_id, {}), exit_code=1)
        del self.runs[trial.trial_id]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in list(self.runs):  # trials Tune never ended (the driver is stopping): not finished
            self.runs.pop(trial_id).finish(self.last.pop(trial_id, {}), exit_code=1)
