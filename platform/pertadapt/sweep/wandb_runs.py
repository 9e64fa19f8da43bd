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
from typing import Any

from ray import tune

from pertadapt.config.load import config_to_dict
from pertadapt.report.logger import RunLogger
from pertadapt.report.wandb import open_logger
from pertadapt.sweep.trial_spec import TUNED_KEY, trial_of, tuned_of
from pertadapt.train.run import FINISHED_KEY

__all__ = ["REPLAYED_KEY", "STOPPED_EARLY_TAG", "TrialRuns", "trial_metrics"]

log = logging.getLogger(__name__)

#: Tag of the W&B run of a trial that a scheduler stopped before its last epoch.
STOPPED_EARLY_TAG = "stopped_early"
#: Key of the result with which a resumed sweep replays a trial that had already finished.
REPLAYED_KEY = "replayed"
_PREFIXES = ("train_", "loss_weight_", "val_", "test_")
_KEYS = ("epoch", "lr", "best_epoch")


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The run's own numbers in a Tune result (epoch row or final metrics), without Tune's bookkeeping."""
    return {k: v for k, v in result.items()
            if (k in _KEYS or k.startswith(_PREFIXES)) and isinstance(v, int | float) and not isinstance(v, bool)}


class TrialRuns(tune.Callback):
    """Opens, feeds and closes one W&B run per trial (see the module docstring).

    Each trial's :class:`~pertadapt.sweep.trial_spec.TrialSpec` gives the run config (its ``logging``
    section: mode, project and group), the W&B tags and job type, the run's name and its directory in the
    sweep directory (where the offline W&B runs go).
    A run is opened with the trial's first result (or its error), so that a finished trial that a
    resumed sweep only replays (its result carries :data:`REPLAYED_KEY`) gets no second run.
    """

    def __init__(self) -> None:
        self.runs: dict[str, RunLogger] = {}
        self.final: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict[str, float]] = {}

    def _run(self, trial: Any) -> RunLogger:
        if trial.trial_id not in self.runs:  # a Ray Train retry of a trial continues its run
            spec, tuned = trial_of(trial.config), tuned_of(trial.config)
            sample = trial.trial_id if tuned else None
            lg = spec.config.logging
            self.runs[trial.trial_id] = open_logger(
                mode=lg.wandb, project=lg.project, group=lg.group, name=spec.name(sample),
                directory=spec.local_dir(sample), config={**config_to_dict(spec.config), TUNED_KEY: tuned},
                tags=spec.tags, job_type=spec.job_type, concurrent=True)
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
