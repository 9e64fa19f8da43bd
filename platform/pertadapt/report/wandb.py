"""Weights & Biases: one run per trial (rank 0 only), offline by default.

The only module that imports :mod:`wandb`. Secrets (``WANDB_API_KEY``) come from the environment,
never from configs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pertadapt.report.logger import NullLogger, RunLogger

__all__ = ["WandbLogger", "describe_wandb_mode", "open_logger", "resolve_wandb_mode"]

log = logging.getLogger(__name__)


class WandbLogger:
    """A W&B run.

    Parameters
    ----------
    project, group, name
        W&B project, group (``<ablation>/<arm>``) and run name.
    directory
        Where ``wandb/offline-run-*`` goes (the run dir).
    config
        The resolved run config (nested dict).
    mode
        ``offline`` or ``online``.
    tags
        Run tags (each cut to W&B's 64 characters).
    job_type
        ``model`` or ``baseline`` (W&B's job type), or None.
    concurrent
        Other runs of this process stay open (the sweep driver keeps one per running trial); otherwise a
        new run finishes the previous one.
    """

    def __init__(self, *, project: str, group: str | None, name: str, directory: Path, config: Mapping[str, Any],
                 mode: str, tags: Sequence[str] = (), job_type: str | None = None, concurrent: bool = False) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, group=group, name=name, dir=str(directory), config=dict(config),
                              mode=mode, tags=[t[:64] for t in tags] or None, job_type=job_type,
                              reinit="create_new" if concurrent else "finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one row (non-finite values are logged as-is; W&B shows them as NaN)."""
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: Mapping[str, float], *, tags: Sequence[str] = (), exit_code: int = 0) -> None:
        """Write the summary, add ``tags`` and close the run (``exit_code`` ≠ 0: W&B marks it failed)."""
        for k, v in summary.items():
            self.run.summary[k] = v
        if tags:
            self.run.tags = (*self.run.tags, *(t[:64] for t in tags))
        self.run.finish(exit_code=exit_code)


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode a run uses: ``offline``/``online``/``disabled`` as given; ``auto`` from the environment.

    ``auto``: ``$WANDB_MODE`` when set; else ``online`` when an API key is available to this process
    (``$WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc``); else ``offline``. The key itself is
    never read into a config, a log or a file of ours.
    """
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def describe_wandb_mode(mode: str) -> str:
    """One line for the driver's log: the resolved mode and why."""
    resolved = resolve_wandb_mode(mode)
    why = "" if mode != "auto" else (" ($WANDB_MODE)" if os.environ.get("WANDB_MODE") else
                                     " (API key found)" if resolved == "online" else " (no API key: runs stay on disk)")
    return f"{resolved}{why}"


def open_logger(*, mode: str, rank: int = 0, **kwargs: Any) -> RunLogger:
    """A :class:`WandbLogger` on rank 0 unless the mode resolves to ``disabled``; a :class:`NullLogger` otherwise."""
    mode = resolve_wandb_mode(mode)
    if mode == "disabled" or rank != 0:
        return NullLogger()
    return WandbLogger(mode=mode, **kwargs)


import dataclasses  # noqa: E402  (the report functions below were added after the logger code)
import typing  # noqa: E402

if typing.TYPE_CHECKING:  # annotations only: report.html is imported where it is used
    from pertadapt.report.html import ReportPaths


def _wandb_project(project: str | None) -> str:
    """The W&B project of the report: ``project``, else ``$WANDB_PROJECT``, else ``pertadapt``."""
    return project or os.environ.get("WANDB_PROJECT") or "pertadapt"


def _report_run_names(ablation: str) -> tuple[str, str]:
    """W&B group and run name of a sweep's summary run (trials use the groups ``<ablation>/<arm>``)."""
    return f"{ablation}/summary", f"{ablation}-report"


def log_report_to_wandb(paths: ReportPaths, run: Any | None = None, *, project: str | None = None,
                        mode: str | None = None) -> Any:
    """Log a written report to the sweep's summary run: ``summary.csv`` and ``paired_tests.csv`` as
    ``wandb.Table`` (keys ``report/summary``, ``report/paired_tests``; the summary's ``fm_weights`` and
    ``backbone_weights`` columns name each arm's FM weights) and every figure as ``wandb.Image``
    (``report/<figure stem>``, e.g. ``report/forest_sim``).

    Parameters
    ----------
    paths
        From :func:`pertadapt.report.html.write_sweep_report`.
    run
        An open W&B run to log to (left open); ``None`` opens the summary run (group ``<ablation>/summary``,
        files under ``paths.directory/wandb``) and finishes it.
    project
        W&B project of the run opened here (default ``$WANDB_PROJECT``, else ``pertadapt``).
    mode
        ``offline``/``online``/``disabled`` for the run opened here (default ``$WANDB_MODE``, else offline).

    Returns
    -------
    wandb.Run or None
        The run logged to (``None`` when ``mode='disabled'``).
    """
    import pandas as pd
    import wandb

    mode = resolve_wandb_mode(mode or "auto")
    if run is None and mode == "disabled":
        return None
    own = run is None
    if own:
        group, name = _report_run_names(paths.report.sweep.name)
        run = WandbLogger(project=_wandb_project(project), group=group, name=name, directory=paths.directory,
                          config={"sweep_dir": str(paths.report.sweep.root),
                                  "reference_arm": paths.report.sweep.reference}, mode=mode).run
    captions = {f.name: f.caption for f in paths.report.figures}
    payload: dict[str, Any] = {
        "report/summary": wandb.Table(dataframe=pd.read_csv(paths.summary_csv)),
        "report/paired_tests": wandb.Table(dataframe=pd.read_csv(paths.paired_tests_csv, keep_default_na=False,
                                                                 na_values=[""])),
    }
    payload.update({f"report/{p.stem}": wandb.Image(str(p), caption=captions.get(p.name, "")) for p in paths.figures})
    run.log(payload)
    if own:
        run.finish()
    return run


def build_wandb_report_spec(paths: ReportPaths, *, project: str | None = None, entity: str | None = None) -> Path:
    """Build the sweep's W&B Report with ``wandb-workspaces`` and save its spec, without any network call.

    One section per question: the ablation table (findings, the overall table, the logged summary and
    paired-test tables), the forest plot (media of the summary run) and the learning curves (train loss
    and the headline validation metric of the trial runs, grouped by ``<ablation>/<arm>``).

    Parameters
    ----------
    paths
        From :func:`pertadapt.report.html.write_sweep_report`.
    project
        W&B project (default ``$WANDB_PROJECT``, else ``pertadapt``).
    entity
        W&B entity (default ``$WANDB_ENTITY``; empty means "your default entity" at publish time).

    Returns
    -------
    pathlib.Path
        ``paths.directory/wandb_report.json`` (publish with :func:`publish_wandb_report`).
    """
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    from pertadapt.files import atomic_write_json
    from pertadapt.report.html import render_layout_markdown

    r = paths.report
    project = _wandb_project(project)
    entity = entity if entity is not None else os.environ.get("WANDB_ENTITY", "")
    group, name = _report_run_names(r.sweep.name)
    summary_runs = wr.Runset(entity=entity, project=project, name="summary run",
                             filters=[expr.Metric("Group") == group])
    trial_runs = wr.Runset(entity=entity, project=project, name="trials",
                           filters=[expr.Metric("Group").isin([f"{r.sweep.name}/{a}" for a in
                                                               dict.fromkeys(r.sweep.trials["arm"])])])
    overall = [t for t in r.tables if t.scope == "overall"]
    blocks: list[Any] = [
        wr.H1(f"Ablation report: {r.sweep.name}"),
        wr.P(f"Reference arm: {r.sweep.reference}. {len(r.sweep.ok)} of {len(r.sweep.trials)} trials succeeded."),
        wr.H2("Which components matter? The ablation table"),
        wr.MarkdownBlock("\n".join(f"- {s}" for s in r.sentences) or "No paired tests (no successful trials)."),
    ]
    if overall:
        blocks.append(wr.MarkdownBlock(render_layout_markdown(overall[0], r.sweep.reference)))
    blocks.append(wr.PanelGrid(runsets=[summary_runs], panels=[
        wr.WeavePanelSummaryTable(table_name="report/summary", layout=wr.Layout(w=24, h=10)),
        wr.WeavePanelSummaryTable(table_name="report/paired_tests", layout=wr.Layout(w=24, h=10))]))
    forest = [f"report/{Path(f.name).stem}" for f in r.figures if f.name.startswith("forest")]
    if forest:
        blocks += [wr.H2(f"How large are the differences to {r.sweep.reference}? Forest plot"),
                   wr.PanelGrid(runsets=[summary_runs], panels=[
                       wr.MediaBrowser(title="forest plot", media_keys=forest, layout=wr.Layout(w=24, h=12))])]
    blocks += [wr.H2("Did every arm train? Learning curves"),
               wr.PanelGrid(runsets=[trial_runs], panels=[
                   wr.LinePlot(title="train loss", x="Step", y=["train_loss"], groupby="Group",
                               groupby_aggfunc="mean", groupby_rangefunc="minmax", layout=wr.Layout(w=12, h=8)),
                   wr.LinePlot(title=f"val_{r.metrics[0]}", x="Step", y=[f"val_{r.metrics[0]}"], groupby="Group",
                               groupby_aggfunc="mean", groupby_rangefunc="minmax",
                               layout=wr.Layout(x=12, w=12, h=8))])]
    report = wr.Report(project=project, entity=entity, title=f"pertadapt ablation: {r.sweep.name}"[:128],
                       description=f"Sweep {r.sweep.root}", blocks=blocks)
    out = paths.directory / "wandb_report.json"
    atomic_write_json(out, report_spec_to_json(report))
    return out


def report_spec_to_json(obj: Any) -> Any:
    """A ``wandb_workspaces.reports.v2`` object tree as JSON: ``{"__type__": class name, **init fields}``.

    The library's own serialisation (``Report._to_model``) looks run sets' projects up online, so the
    offline spec keeps the constructor arguments instead; :func:`report_spec_from_json` rebuilds the objects.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__,
                **{f.name: report_spec_to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, list | tuple):
        return [report_spec_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): report_spec_to_json(v) for k, v in obj.items()}
    return obj


def report_spec_from_json(doc: Any, entity: str = "") -> Any:
    """Rebuild the objects of :func:`report_spec_to_json`; an empty ``entity`` field becomes ``entity``."""
    import wandb_workspaces.reports.v2 as wr

    if isinstance(doc, dict) and "__type__" in doc:
        kwargs = {k: report_spec_from_json(v, entity) for k, v in doc.items() if k != "__type__"}
        if kwargs.get("entity") == "" and entity:
            kwargs["entity"] = entity
        return getattr(wr, doc["__type__"])(**kwargs)
    if isinstance(doc, list):
        return [report_spec_from_json(v, entity) for v in doc]
    if isinstance(doc, dict):
        return {k: report_spec_from_json(v, entity) for k, v in doc.items()}
    return doc


def publish_wandb_report(spec: Path, paths: ReportPaths | None = None) -> str:
    """Create the W&B Report saved by :func:`build_wandb_report_spec` (online; needs ``WANDB_API_KEY``).

    Parameters
    ----------
    spec
        ``wandb_report.json``.
    paths
        The written report: when given, its tables and figures are first logged to an online summary run
        (:func:`log_report_to_wandb`) so that the Report's table and media panels have data. The trials'
        offline runs need ``wandb sync`` for the learning curves.

    Returns
    -------
    str
        The report's URL.

    Raises
    ------
    ValueError
        Not logged in, offline, or the server refused the report (the message says how to retry).
    """
    import wandb

    doc = json.loads(Path(spec).read_text())
    try:
        entity = doc.get("entity") or wandb.Api().default_entity  # fails fast when not logged in
        if paths is not None:
            log_report_to_wandb(paths, project=doc["project"], mode="online")
        report = report_spec_from_json(doc, entity=entity)
        report.save()
        return str(report.url)
    except Exception as e:  # wandb raises a bare Exception when not logged in
        raise ValueError(f"W&B Report not published ({type(e).__name__}: {e}); the spec stays in {spec}: "
                         "log in (WANDB_API_KEY) and run `pertadapt report SWEEP_DIR --publish`") from e


__all__ += ["build_wandb_report_spec", "log_report_to_wandb", "publish_wandb_report", "report_spec_from_json",
            "report_spec_to_json"]
