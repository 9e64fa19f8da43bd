"""``pertadapt sweep`` as one function: validate, plan, lock the directory, run the trials in a driver process,
write the results and the report.

Two processes share the work. The one a user or a scheduler starts (and signals) runs no Ray: it validates
and plans, takes the sweep directory's lock (:mod:`pertadapt.sweep.lock`) before it writes or deletes anything,
writes ``plan.json`` and ``sweep.json``, then starts the *driver*, a fresh interpreter (``python -m
pertadapt.sweep.command``) that stages the data, runs Ray and Tune, and writes the results and the report. A
SIGTERM or SIGINT to the first process, at any moment, becomes a graceful stop of the driver
(:mod:`pertadapt.sweep.stop`); the command then raises :class:`~pertadapt.sweep.stop.SweepStopped` (exit
128 + signal) once the driver has saved Tune's state and stopped Ray. The driver shares the lock (an
inherited descriptor) and dies with the first process (``PR_SET_PDEATHSIG``), so a SIGKILL leaves no lock.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pertadapt.config.errors import ConfigError
from pertadapt.config.load import parse_overrides
from pertadapt.sweep import stop
from pertadapt.sweep.lock import LOCK_FILE, SweepLock, check_not_running
from pertadapt.sweep.stop import SweepStopped

if TYPE_CHECKING:
    from pertadapt.sweep.ablation import Ablation
    from pertadapt.sweep.search_space import SearchSpace

__all__ = ["LOOPBACK_ENV", "SWEEP_FILE", "SweepFailed", "SweepRequest", "plan_paths", "run_sweep_from_files"]

log = logging.getLogger(__name__)

#: The driver's environment for a local cluster, set before Ray is imported: Ray's single-machine mode (its
#: default on macOS and Windows), in which the node's address is 127.0.0.1 and every server of the cluster (GCS,
#: raylet, dashboard, the metrics exporters of the dashboard, its agent and the autoscaler monitor) listens on
#: loopback only. A cluster the user starts (``--address``) keeps Ray's defaults.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Written when a sweep starts (name, reference arm, storage): a directory holding it holds a sweep.
SWEEP_FILE = "sweep.json"


class SweepFailed(RuntimeError):
    """The driver process failed (its traceback is in the log above) or died."""


@dataclass(frozen=True)
class SweepRequest:
    """What ``pertadapt sweep`` was asked for (its options, as given)."""

    ablation: Path
    overrides: tuple[str, ...] = ()
    search_space: Path | None = None
    out: Path | None = None
    report: bool = True
    dry_run: bool = False
    resume: bool = False
    overwrite: bool = False
    address: str | None = None
    storage: str | None = None
    #: Throughput of the GPU-hour estimate (``None``: :data:`pertadapt.train.cost.DEFAULT_TFLOPS`).
    tflops: float | None = None
    #: Memory of one GPU; a trial planned to need more per worker is refused.
    #: Memory of one GPU (``None``: :data:`pertadapt.sweep.plan.DEFAULT_GPU_MEMORY_GB`).
    gpu_memory_gb: float | None = None
    #: Also plan every trial on the reference's path (``--naive``).
    naive: bool = False


@dataclass(frozen=True)
class _Prepared:
    """A validated, planned sweep; nothing written yet."""

    request: SweepRequest
    ablation: Ablation
    space: SearchSpace | None
    sweep_dir: Path
    root: str
    files: dict[str, tuple[Path, bool]]
    plan: dict[str, Any]


def plan_paths(plan: dict) -> dict[str, str]:
    """trial key → data file, from a plan (every name, a run's aliases too)."""
    from pertadapt.sweep.plan import plan_names

    return {k: t["data_path"] for k, t in plan_names(plan).items()}


def run_sweep_from_files(request: SweepRequest) -> Path | None:
    """Validate, plan and run a sweep; write its results and (``request.report``) its report.

    Parameters
    ----------
    request
        The ablation YAML, overrides and options.

    Returns
    -------
    Path or None
        ``results.csv``; ``None`` for a dry run.

    Raises
    ------
    ConfigError
        Bad input, or the directory holds another sweep or is in use (:class:`~pertadapt.sweep.lock.SweepLocked`,
        naming the holder).
    SweepStopped
        SIGTERM or SIGINT arrived: Tune's state is saved, Ray stopped; ``--resume`` finishes the sweep.
    SweepFailed
        The driver process failed or died.
    """
    with _Supervisor() as supervisor:
        # with --out known, a running sweep is named at once, before seconds of validating and planning, and a
        # real run takes the lock first, so of two starting at once one is refused just as soon
        lock = None
        if request.out is not None:
            if request.dry_run:
                check_not_running(request.out.resolve())
            else:
                lock = SweepLock(request.out.resolve()).acquire()
        started = False
        try:
            prepared = _prepare(request)
            if lock is None:
                check_not_running(prepared.sweep_dir)  # a sweep running there is named first
            _check_sweep_dir(prepared)  # the refusals that need no lock, before anything is created
            _print_plan(prepared)
            if request.dry_run:
                _dry_run(prepared)
                return None
            if not request.resume:  # a resumed sweep's tables may be stored: its build checks the exact free space
                from pertadapt.sweep.plan import check_tables_fit

                check_tables_fit(prepared.plan)
            if lock is None:
                lock = SweepLock(prepared.sweep_dir).acquire()
                _check_sweep_dir(prepared)  # again, under the lock: the directory may have changed meanwhile
            _start_sweep_dir(prepared)
            started = True
            supervisor.stop_if_asked(prepared)  # a stop asked for so far ends here, with a resumable directory
            return supervisor.run_driver(prepared, lock)
        finally:
            if lock is not None and started:
                lock.release()
            elif lock is not None:
                lock.abandon()  # a refused sweep leaves no directory it created


def _prepare(request: SweepRequest) -> _Prepared:
    """Validate everything and build the plan; writes nothing."""
    from pertadapt.data.presets import data_file_for
    from pertadapt.remote import is_uri, under
    from pertadapt.sweep.ablation import load_ablation
    from pertadapt.sweep.plan import add_costs, build_plan, check_memory, check_search_space
    from pertadapt.sweep.search_space import load_search_space
    from pertadapt.sweep.storage import check_storage, shared_data_path
    from pertadapt.train.fm_weights import check_pretrain, pretrain_of

    if request.resume and request.overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    if request.address:
        os.environ["RAY_ADDRESS"] = request.address
    if os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_AUTH_MODE"):
        raise ConfigError("--address / RAY_ADDRESS: clusters started by Ray >= 2.59 require token auth; set "
                          "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
                          "~/.ray/auth_token / RAY_AUTH_TOKEN_PATH) in this shell")
    abl = load_ablation(request.ablation, extra_overrides=parse_overrides(request.overrides))
    space_file = request.search_space or abl.search_space
    space = load_search_space(space_file) if space_file else None
    if space is not None:
        check_search_space(abl, space)
    sweep_dir = (request.out or Path("runs") / abl.name).resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--out: {sweep_dir} exists and is not a directory")
    root = _storage_of(sweep_dir, request.storage, request.resume)
    check_storage(root)
    if request.storage is not None and not is_uri(root):  # simulated data and GO masks where every node finds them
        os.environ.setdefault("PERTADAPT_CACHE", under(root, "cache"))
    for cfg in {(pretrain_of(t.config), t.config.backbone): t.config for t in abl.trials}.values():
        check_pretrain(cfg)  # a pretrain config of another FM fails here (a dry run never pretrains)
    files = {t.key: data_file_for(t.config) for t in abl.trials}
    # every trial reads its dataset from the storage root, where the driver places it (nodes need not share caches)
    plan = build_plan(abl, space, {k: shared_data_path(f.path, root) for k, f in files.items()},
                      abl.max_concurrent_trials or 2)
    add_costs(plan, abl, {k: f.path for k, f in files.items()}, tflops=request.tflops, naive=request.naive)
    check_memory(plan, request.gpu_memory_gb)
    return _Prepared(request, abl, space, sweep_dir, root, files, plan)


def _resolve_pretrains(p: _Prepared) -> Ablation:
    """The ablation with every ``backbone.pretrain`` resolved to its checkpoint: each (pretrain config, data
    file) pretrained once, here in the driver, before any trial is queued (so trials never pretrain at once).
    On an object store each checkpoint is uploaded there once and the trials load it from the store
    (:func:`~pertadapt.sweep.storage.stage_checkpoint`); on a path they load the driver's cached directory."""
    from pertadapt.sweep.storage import stage_checkpoint
    from pertadapt.train.fm_weights import pretrain_of, resolve_pretrain

    first: dict[tuple[str, Path], Any] = {}  # (pretrain config, data file) → the first trial config asking for it
    for t in p.ablation.trials:
        if (pretrain := pretrain_of(t.config)) is not None:
            first.setdefault((pretrain, Path(p.files[t.key].path).resolve()), t.config)
    done: dict[tuple[str, str], tuple[str, str]] = {}
    for i, ((pretrain, path), cfg) in enumerate(first.items()):
        log.info("pretraining %d of %d: the FM of %s on %s", i + 1, len(first), pretrain, path)
        resolve_pretrain(cfg, path, done)
    done = {key: (stage_checkpoint(Path(checkpoint), sha, p.root), sha) for key, (checkpoint, sha) in done.items()}
    return dataclasses.replace(p.ablation, trials=tuple(
        dataclasses.replace(t, config=resolve_pretrain(t.config, p.files[t.key].path, done))
        for t in p.ablation.trials))


def _storage_of(sweep_dir: Path, storage: str | None, resume: bool) -> str:
    """The sweep's storage root (path or URI); a resumed sweep keeps the one it started with."""
    from pertadapt.sweep.storage import storage_root

    root = storage_root(storage, sweep_dir)
    recorded = (sweep_dir / SWEEP_FILE).is_file() and json.loads((sweep_dir / SWEEP_FILE).read_text()).get("storage")
    if resume and recorded and recorded != root:
        if storage is not None:
            raise ConfigError(f"--storage: the sweep in {sweep_dir} keeps its storage at {recorded}, not {root}")
        return recorded
    return root


def _contents(sweep_dir: Path) -> list[Path]:
    """What a sweep directory holds, its lock file aside."""
    return [p for p in sweep_dir.iterdir() if p.name != LOCK_FILE] if sweep_dir.is_dir() else []


def _check_sweep_dir(p: _Prepared) -> None:
    """Refuse to mix sweeps: an existing sweep in the directory must be resumed (same plan) or overwritten."""
    from pertadapt.sweep.plan import diff_plans, read_plan

    sweep_dir, r = p.sweep_dir, p.request
    started = (sweep_dir / SWEEP_FILE).is_file()
    if r.resume and not started:
        raise ConfigError(f"--resume: {sweep_dir} holds no sweep (no {SWEEP_FILE}); run without --resume")
    if r.overwrite and _contents(sweep_dir) and not started:
        raise ConfigError(f"--overwrite: {sweep_dir} is not empty and holds no sweep; refusing to delete it")
    if not started or r.overwrite:
        return
    diff = diff_plans(read_plan(sweep_dir) or {}, p.plan)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"--out: {sweep_dir} holds a different sweep ({shown}); use another --out, or "
                          "--overwrite to delete it")
    if not r.resume and not r.dry_run:
        raise ConfigError(f"--out: {sweep_dir} already holds this sweep; --resume finishes it, --overwrite "
                          "starts it over")


def _print_plan(p: _Prepared) -> None:
    from rich.console import Console
    from rich.table import Table

    from pertadapt.sweep.plan import local_cpus

    plan = p.plan
    varying = sorted({k for t in plan["trials"] for k in t["varying"]})
    table = Table(title=f"sweep {plan['name']}: {_names_and_runs(plan)}, {plan['max_concurrent_trials']} at a "
                        f"time (local Ray: {local_cpus(plan)} CPUs)")
    for col in ("trial", "arm", "seed", "dataset", "backbone", *varying, "workers × CPU/GPU", "also reported as"):
        table.add_column(col, no_wrap=True)
    for t in plan["trials"]:
        table.add_row(t["key"], t["arm"], str(t["seed"]), t["dataset"], t["backbone"],
                      *[str(t["varying"].get(k, "")) for k in varying],
                      f"{t['workers']} × {t['cpus_per_worker']:g}/{t['gpus_per_worker']}",
                      " ".join(a["key"] for a in t["aliases"]))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(160, Console(width=1000).measure(table).maximum))
    console.print(table)
    console.print(_cost_table(plan))
    for c in plan.get("caches", []):
        if not c["fits"]:
            console.print(f"[bold red]embedding table of {', '.join(c['trials'])}: needs {c['bytes']} bytes "
                          f"({c['cumulative_bytes']} with the tables before it), {c['directory']} has "
                          f"{c['free_bytes']} free; a run is refused. Ways out: {c['ways_out']}[/]")
    from pertadapt.train.fm_weights import pretrain_of

    pretrained: dict[tuple[str, str], int] = {}
    for t in p.ablation.trials:
        if (pretrain := pretrain_of(t.config)) is not None:
            key = (pretrain, str(p.files[t.key].path))
            pretrained[key] = pretrained.get(key, 0) + 1
    for (pretrain, data), n in pretrained.items():
        console.print(f"FM weights: {n} trial(s) load the FM of {pretrain} pretrained on {data}: once, by the sweep's "
                      "driver before any trial starts (cached; a dry run pretrains nothing)")


def _cost_table(plan: dict[str, Any]) -> Any:
    """Per trial and for the sweep: TFLOP, cache and peak GB, GPU-hours (and the naive path's, with a ratio)."""
    from rich.table import Table

    naive = "cost_naive" in plan
    table = Table(title=f"cost at the data's dimensions (GPU-hours at {plan['tflops']:g} TFLOP/s; cache build "
                        "in each trial that uses it, once per cache in the total; '-': data not made yet)")
    cols = ("train TFLOP", "eval TFLOP", "cache TFLOP", "cache GB", "peak GB/worker", "GPU-h")
    for col in ("trial", *cols, "cache fits", *([f"naive {c}" for c in cols] + ["naive/plan FLOPs"] if naive else [])):
        table.add_column(col, no_wrap=True)
    fits = {t["key"]: {None: "-", True: "yes", False: "NO"}[t.get("cache_fits")] for t in plan["trials"]}
    short, unknown = any(not c["fits"] for c in plan.get("caches", [])), plan["cost"]["trials_without_cost"] > 0
    fits["sweep total"] = "NO" if short else "-" if unknown else "yes"

    def cells(c: dict[str, float] | None) -> list[str]:
        from pertadapt.sweep.plan import COST_KEYS

        return [f"{c[k]:.4g}" for k in COST_KEYS] if c else ["-"] * len(cols)

    def ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> str:
        flops = [sum(c[k] for k in ("train_tflop", "eval_tflop", "cache_tflop")) if c else 0.0 for c in (a, b)]
        return f"{flops[1] / flops[0]:.1f}x" if flops[0] > 0 else "-"

    rows = [(t["key"], t.get("cost"), t.get("cost_naive")) for t in plan["trials"]]
    for key, c, n in [*rows, ("sweep total", plan["cost"], plan.get("cost_naive"))]:
        table.add_row(key, *cells(c), fits[key], *([*cells(n), ratio(c, n)] if naive else []))
    return table


def _names_and_runs(plan: dict[str, Any]) -> str:
    """``<n> trials`` and, when trials share a run (one config hash), ``in <m> runs``."""
    names = len(plan["trials"]) + sum(len(t["aliases"]) for t in plan["trials"])
    shared = f" in {len(plan['trials'])} runs (trials with one config hash run once)" if names > len(plan["trials"]) else ""
    return f"{names} trials{shared}"


def _dry_run(p: _Prepared) -> None:
    """Write ``plan.json`` only (no lock is taken: the caller refused a directory where a sweep runs)."""
    from pertadapt.sweep.plan import write_plan

    log.info("dry run: plan written to %s; nothing started", write_plan(p.sweep_dir, p.plan))


def _start_sweep_dir(p: _Prepared) -> None:
    """Under the lock: clear the directory on ``--overwrite`` and write ``plan.json`` and ``sweep.json`` (from
    here on the directory is resumable)."""
    from pertadapt.files import atomic_write_json
    from pertadapt.sweep.plan import write_plan
    from pertadapt.sweep.storage import clear_storage

    if p.request.overwrite and (p.sweep_dir / SWEEP_FILE).is_file():
        clear_storage(p.root, p.sweep_dir)
        for path in _contents(p.sweep_dir):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    write_plan(p.sweep_dir, p.plan)
    if not (p.request.resume and (p.sweep_dir / SWEEP_FILE).is_file()):
        atomic_write_json(p.sweep_dir / SWEEP_FILE, {"name": p.ablation.name,
                                                     "reference_arm": p.ablation.reference_arm,
                                                     "ablation": str(p.ablation.path), "storage": p.root,
                                                     "started_at": time.time()})


def _resume_hint(p: _Prepared) -> str:
    return f"pertadapt sweep {p.request.ablation} --out {p.sweep_dir} --resume"


class _Supervisor:
    """In the process a user signals: SIGTERM and SIGINT ask the driver for a graceful stop (no Ray runs here,
    so nothing replaces these handlers)."""

    def __init__(self) -> None:
        self.signum = 0
        self.driver: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Supervisor:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handler(self, signum: int, frame: object) -> None:
        if not self.signum:
            self.signum = signum
            log.warning("%s received: stopping the sweep", signal.Signals(signum).name)
        self._forward()

    def _forward(self) -> None:
        if self.signum and self.driver is not None and self.driver.poll() is None:
            os.kill(self.driver.pid, stop.STOP_SIGNAL)

    def stop_if_asked(self, p: _Prepared) -> None:
        if self.signum:
            log.error("sweep stopped before it started; start it with: %s", _resume_hint(p))
            raise SweepStopped(self.signum)

    def run_driver(self, p: _Prepared, lock: SweepLock) -> Path:
        """Run the driver process to its end; its outcome, as this process's."""
        env = dict(os.environ)
        if not env.get("RAY_ADDRESS"):
            env.update(LOOPBACK_ENV)
        request = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(p.request).items()}
        request["out"] = str(p.sweep_dir)
        read_end, write_end = os.pipe()
        t0 = time.time()
        try:
            self.driver = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps(request), str(write_end), str(lock.fd),
                 str(logging.getLogger().getEffectiveLevel())],
                pass_fds=(write_end, lock.fd), env=env, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            os.close(write_end)
        self._forward()  # a signal that came while the driver was starting
        with os.fdopen(read_end) as fh:
            outcome = fh.read()  # until the driver exits (or closes it)
        code = self.driver.wait()
        return self._outcome(p, outcome, code, time.time() - t0)

    def _outcome(self, p: _Prepared, outcome: str, code: int, elapsed: float) -> Path:
        doc = json.loads(outcome) if outcome.strip() else {}
        status = doc.get("status")
        if status == "ok":  # finished before a stop asked for reached it: nothing left to resume
            return Path(doc["results"])
        if status == "stopped" or (self.signum and code == -stop.STOP_SIGNAL):
            log.error("sweep interrupted after %.0f s; finish it with: %s", elapsed, _resume_hint(p))
            raise SweepStopped(self.signum or signal.SIGTERM)
        if status == "error":
            kind = {"ConfigError": ConfigError, "ValueError": ValueError}.get(doc["kind"], SweepFailed)
            raise kind(doc["message"])
        how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise SweepFailed(f"the sweep's driver process (PID {self.driver.pid}) {how}; finish the sweep with: "
                          f"{_resume_hint(p)}")


def _die_with_parent() -> None:
    """In the driver process, before it starts: die (SIGKILL) when the process that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _drive(request: SweepRequest) -> Path:
    """The driver process: stage the data, run the trials through Ray Tune, write the results and the report."""
    from pertadapt.report.wandb import describe_wandb_mode
    from pertadapt.sweep.plan import add_costs, check_memory, local_cpus, write_plan
    from pertadapt.sweep.storage import shared_data_path, stage_data
    from pertadapt.sweep.tuner import run_sweep
    from pertadapt.train.setup import ensure_data_file

    p = _prepare(request)
    abl, plan = p.ablation, p.plan
    for t in abl.trials:
        if p.files[t.key].to_simulate:
            ensure_data_file(t.config)
    if plan["cost"]["trials_without_cost"]:  # the data the plan could not size existed only now: plan it again
        add_costs(plan, abl, {k: f.path for k, f in p.files.items()}, tflops=plan["tflops"],
                  naive="cost_naive" in plan)
        check_memory(plan, request.gpu_memory_gb)
        write_plan(p.sweep_dir, plan)
    for source in sorted({f.path for f in p.files.values()}):
        stage_data(source, shared_data_path(source, p.root))
    abl = _resolve_pretrains(p)
    log.info("sweep %s: %d trials (%d arms × %d seeds) → %s; W&B: %s", abl.name, len(abl.trials), len(abl.arms),
             len(abl.seeds), p.sweep_dir, describe_wandb_mode(abl.trials[0].config.logging.wandb))
    t0 = time.time()
    # a local Ray is sized for the plan's concurrency; on a cluster it follows the cluster (capped by the YAML)
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    results = run_sweep(abl, p.sweep_dir, search_space=p.space, data_paths=plan_paths(plan),
                        num_cpus=local_cpus(plan),
                        max_concurrent=abl.max_concurrent_trials if on_cluster else plan["max_concurrent_trials"],
                        resume=request.resume, storage=p.root)
    log.info("sweep finished in %.0f s; results: %s", time.time() - t0, results)
    if request.report:
        _report(p)
    offline = sorted(p.sweep_dir.glob("runs/**/wandb/offline-run-*"))
    if offline:
        log.info("W&B: %d offline run(s); upload with: wandb sync %s/runs/*/**/wandb/offline-run-*", len(offline),
                 p.sweep_dir)
    return results


def _report(p: _Prepared) -> None:
    from pertadapt.report.console import print_summary
    from pertadapt.report.html import write_sweep_report
    from pertadapt.report.wandb import build_wandb_report_spec, log_report_to_wandb

    paths = write_sweep_report(p.sweep_dir)
    print_summary(paths.report)
    logging_cfg = p.ablation.trials[0].config.logging
    log_report_to_wandb(paths, project=logging_cfg.project, mode=logging_cfg.wandb)
    log.info("report: %s; W&B Report spec: %s", paths.html, build_wandb_report_spec(paths, project=logging_cfg.project))


def _driver_main(request_json: str, outcome_fd: int, lock_fd: int, level: int) -> int:
    """Entry point of the driver process: run :func:`_drive`, report its outcome as one JSON document on
    ``outcome_fd``; ``lock_fd``, the sweep directory's lock, is held until this process ends."""
    stop.install()
    for fd in (outcome_fd, lock_fd):  # held by this process only: Ray's processes must not keep them open
        os.set_inheritable(fd, False)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    fields = json.loads(request_json)
    request = SweepRequest(**{**fields, "overrides": tuple(fields["overrides"]),
                              **{k: Path(fields[k]) for k in ("ablation", "search_space", "out") if fields[k]}})
    try:
        doc: dict[str, Any] = {"status": "ok", "results": str(_drive(request))}
    except SweepStopped:
        doc = {"status": "stopped"}
    except (ConfigError, ValueError) as e:
        doc = {"status": "error", "kind": "ConfigError" if isinstance(e, ConfigError) else "ValueError",
               "message": str(e)}
        log.debug("driver error", exc_info=True)
    except Exception as e:
        log.exception("the sweep's driver failed")
        doc = {"status": "error", "kind": type(e).__name__, "message": f"the sweep's driver failed: {e}"}
    with os.fdopen(outcome_fd, "w") as fh:
        fh.write(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(_driver_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
