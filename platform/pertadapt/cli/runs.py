"""``pertadapt train``, ``sweep``, ``report`` and ``demo``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import typer
import yaml

from pertadapt.config import ConfigError, config_to_dict, load_run_config

log = logging.getLogger("pertadapt")


def _train(config: Path = typer.Argument(..., help="Run config YAML (may use base:)."),
           overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=0.001."),
           workers: int = typer.Option(None, "--workers", help="Ray Train workers (DeepSpeed); default from config."),
           out: Path = typer.Option(None, "--out", help="Run directory (default: <logging.out_dir>/<name>)."),
           resume: bool = typer.Option(False, "--resume", help="Continue from the run dir's last checkpoint.")) -> None:
    """Train one run: single process (torch engine) or N Ray Train workers with DeepSpeed."""
    ov = list(overrides or [])
    if workers is not None:
        ov += [f"engine.workers={workers}"] + (["engine.name=deepspeed"] if workers > 1 else [])
    cfg = load_run_config(config, ov)
    run_dir = (out or Path(cfg.logging.out_dir) / cfg.name).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} exists and is not a directory")
    from pertadapt.data.presets import data_file_for

    data_file_for(cfg)  # a data.path that is not there fails now, before torch and the data stack are imported
    from pertadapt.train.setup import ensure_data_file
    from pertadapt.train.worker import launch

    ensure_data_file(cfg)
    launch(cfg, run_dir, resume=resume)
    _print_metrics(run_dir)


def _print_metrics(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from pertadapt.rundir import RunDir

    metrics = RunDir(run_dir).final_metrics() or {}
    table = Table(title=f"final metrics ({run_dir})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in sorted(metrics):
        if k.startswith(("test_", "val_")) and k.count("_") <= 3 or k == "best_epoch":
            table.add_row(k, f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]))
    Console().print(table)


def _sweep(ablation: Path = typer.Argument(..., help="Ablation YAML ((factorial) arms × seeds × datasets × backbones)."),
           overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides for every trial; "
                                                 "datasets.<name>.key=value or backbones.<name>.key=value "
                                                 "for one named set of the ablation."),
           search_space: Path = typer.Option(None, "--search-space", help="Optuna search-space YAML."),
           out: Path = typer.Option(None, "--out", help="Sweep directory (default: runs/<ablation name>)."),
           report: bool = typer.Option(True, help="Write the report at the end."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything, print the trial table, "
                                        "write OUT/plan.json; start nothing."),
           resume: bool = typer.Option(False, "--resume", help="Finish the sweep in OUT (same plan): finished "
                                       "trials are kept, interrupted ones continue from their last checkpoint."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Delete the sweep in OUT and start over."),
           address: str = typer.Option(None, "--address", help="Join the Ray cluster at ADDR (also $RAY_ADDRESS) "
                                       "instead of starting a local one."),
           storage: str = typer.Option(None, "--storage", help="Where every node reads and writes: a shared path "
                                       "(NFS, EFS, ...) for Ray storage, the datasets and the caches, or an "
                                       "object-store URI (s3://bucket/prefix, gs://...) for Ray storage, the "
                                       "datasets and the run directories (default: OUT).")) -> None:
    """Run an ablation grid through Ray Tune (trials = Ray Train + DeepSpeed runs), then report."""
    run_sweep_command(ablation, list(overrides or []), search_space=search_space, out=out, report=report,
                      dry_run=dry_run, resume=resume, overwrite=overwrite, address=address, storage=storage)


def run_sweep_command(ablation: Path, overrides: list[str], *, search_space: Path | None = None,
                      out: Path | None = None, report: bool = True, dry_run: bool = False, resume: bool = False,
                      overwrite: bool = False, address: str | None = None, storage: str | None = None) -> None:
    """``pertadapt sweep``: validate, plan, run through Ray Tune, write results and (``report``) the report."""
    from pertadapt.data.presets import data_file_for
    from pertadapt.remote import is_uri, under
    from pertadapt.sweep.ablation import load_ablation
    from pertadapt.sweep.plan import build_plan, check_search_space, local_cpus, write_plan
    from pertadapt.sweep.search_space import load_search_space
    from pertadapt.sweep.storage import check_storage, clear_storage, shared_data_path, stage_data

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    if address:
        os.environ["RAY_ADDRESS"] = address
    if os.environ.get("RAY_ADDRESS") and not os.environ.get("RAY_AUTH_MODE"):
        raise ConfigError("--address / RAY_ADDRESS: clusters started by Ray >= 2.59 require token auth; set "
                          "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
                          "~/.ray/auth_token / RAY_AUTH_TOKEN_PATH) in this shell")
    extra = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. optim.epochs=2)")
        k, v = item.split("=", 1)
        extra[k] = yaml.safe_load(v)
    abl = load_ablation(ablation, extra_overrides=extra)
    space = load_search_space(search_space) if search_space else (
        load_search_space(abl.search_space) if abl.search_space else None)
    if space is not None:
        check_search_space(abl, space)
    sweep_dir = (out or Path("runs") / abl.name).resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"--out: {sweep_dir} exists and is not a directory")
    root = _storage_of(sweep_dir, storage, resume)
    check_storage(root)
    if storage is not None and not is_uri(root):  # simulated data and GO masks where every node finds them too
        os.environ.setdefault("PERTADAPT_CACHE", under(root, "cache"))
    files = {t.key: data_file_for(t.config) for t in abl.trials}
    # every trial reads its dataset from the storage root, where the driver places it (nodes need not share caches)
    plan = build_plan(abl, space, {k: shared_data_path(f.path, root) for k, f in files.items()},
                      abl.max_concurrent_trials or 2)
    _check_sweep_dir(sweep_dir, plan, resume=resume, overwrite=overwrite, dry_run=dry_run)
    _print_plan(plan, local_cpus(plan))
    if dry_run:
        log.info("dry run: plan written to %s; nothing started", write_plan(sweep_dir, plan))
        return
    from pertadapt.files import atomic_write_json
    from pertadapt.report.wandb import describe_wandb_mode
    from pertadapt.sweep.tuner import run_sweep
    from pertadapt.train.setup import ensure_data_file

    if overwrite and sweep_dir.exists():
        clear_storage(root, sweep_dir)
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for t in abl.trials:
        if files[t.key].to_simulate:
            ensure_data_file(t.config)
    for source in sorted({f.path for f in files.values()}):
        stage_data(source, shared_data_path(source, root))
    write_plan(sweep_dir, plan)
    atomic_write_json(sweep_dir / SWEEP_FILE, {"name": abl.name, "reference_arm": abl.reference_arm,
                                               "ablation": str(abl.path), "storage": root,
                                               "started_at": time.time()})
    log.info("sweep %s: %d trials (%d arms × %d seeds) → %s; W&B: %s", abl.name, len(abl.trials), len(abl.arms),
             len(abl.seeds), sweep_dir, describe_wandb_mode(abl.trials[0].config.logging.wandb))
    t0 = time.time()
    stopped: list[int] = []
    _stop_gracefully_on_sigterm(stopped)
    # a local Ray is sized for the plan's concurrency; on a cluster it follows the cluster (capped by the YAML)
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    results = run_sweep(abl, sweep_dir, search_space=space, data_paths=plan_paths(plan), num_cpus=local_cpus(plan),
                        max_concurrent=abl.max_concurrent_trials if on_cluster else plan["max_concurrent_trials"],
                        resume=resume, storage=root,
                        # ray.init's core worker installs its own SIGTERM handler (it aborts): ours goes back on top
                        after_ray_init=lambda: _stop_gracefully_on_sigterm(stopped))
    if stopped:
        log.error("sweep interrupted after %.0f s; finish it with: pertadapt sweep %s --out %s --resume",
                  time.time() - t0, ablation, sweep_dir)
        raise typer.Exit(128 + signal.SIGTERM)
    log.info("sweep finished in %.0f s; results: %s", time.time() - t0, results)
    if report:
        from pertadapt.report.console import print_summary
        from pertadapt.report.html import write_sweep_report
        from pertadapt.report.wandb import build_wandb_report_spec, log_report_to_wandb

        paths = write_sweep_report(sweep_dir)
        print_summary(paths.report)
        logging_cfg = abl.trials[0].config.logging
        log_report_to_wandb(paths, project=logging_cfg.project, mode=logging_cfg.wandb)
        log.info("report: %s; W&B Report spec: %s", paths.html,
                 build_wandb_report_spec(paths, project=logging_cfg.project))
    offline = sorted(sweep_dir.glob("runs/**/wandb/offline-run-*"))
    if offline:
        log.info("W&B: %d offline run(s); upload with: wandb sync %s/runs/*/**/wandb/offline-run-*", len(offline),
                 sweep_dir)


def _stop_gracefully_on_sigterm(got: list[int]) -> None:
    """Turn SIGTERM (a scheduler's or a user's ``kill``) into Tune's graceful stop (SIGINT: state saved, Ray
    shut down); ``got`` gets the signal number once one arrived."""

    def handler(signum: int, frame: object) -> None:
        got.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


#: Written when a sweep starts (name, reference arm): a directory holding it holds a sweep.
SWEEP_FILE = "sweep.json"


def plan_paths(plan: dict) -> dict[str, str]:
    """trial key → data file, from a plan."""
    return {t["key"]: t["data_path"] for t in plan["trials"]}


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


def _check_sweep_dir(sweep_dir: Path, plan: dict, *, resume: bool, overwrite: bool, dry_run: bool) -> None:
    """Refuse to mix sweeps: an existing sweep in ``sweep_dir`` must be resumed (same plan) or overwritten."""
    from pertadapt.sweep.plan import diff_plans, read_plan

    started = (sweep_dir / SWEEP_FILE).is_file()
    if resume and not started:
        raise ConfigError(f"--resume: {sweep_dir} holds no sweep (no {SWEEP_FILE}); run without --resume")
    if overwrite and sweep_dir.is_dir() and any(sweep_dir.iterdir()) and not started:
        raise ConfigError(f"--overwrite: {sweep_dir} is not empty and holds no sweep; refusing to delete it")
    if not started or overwrite:
        return
    old = read_plan(sweep_dir) or {}
    diff = diff_plans(old, plan)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"--out: {sweep_dir} holds a different sweep ({shown}); use another --out, or "
                          "--overwrite to delete it")
    if not resume and not dry_run:
        raise ConfigError(f"--out: {sweep_dir} already holds this sweep; --resume finishes it, --overwrite "
                          "starts it over")


def _print_plan(plan: dict, num_cpus: int) -> None:
    from rich.console import Console
    from rich.table import Table

    varying = sorted({k for t in plan["trials"] for k in t["varying"]})
    table = Table(title=f"sweep {plan['name']}: {len(plan['trials'])} trials, {plan['max_concurrent_trials']} at a "
                        f"time (local Ray: {num_cpus} CPUs)")
    for col in ("trial", "arm", "seed", "dataset", "backbone", *varying, "workers × CPU/GPU"):
        table.add_column(col, no_wrap=True)
    for t in plan["trials"]:
        table.add_row(t["key"], t["arm"], str(t["seed"]), t["dataset"], t["backbone"],
                      *[str(t["varying"].get(k, "")) for k in varying],
                      f"{t['workers']} × {t['cpus_per_worker']:g}/{t['gpus_per_worker']}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(160, Console(width=1000).measure(table).maximum))
    console.print(table)


def _demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Sweep directory."),
          overwrite: bool = typer.Option(True, help="Start over when OUT holds an earlier demo.")) -> None:
    """The embedded default: simulated Perturb-seq on real GO → paper ablation grid → W&B offline → report."""
    from pertadapt.config.load import resolve_config_path

    run_sweep_command(resolve_config_path("demo.yaml", kind="ablations"), [], out=out,
                      overwrite=overwrite and (out / SWEEP_FILE).is_file())


def _config_show(config: Path = typer.Argument(..., help="Run config YAML (may use base:)."),
                 overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides.")) -> None:
    """Print the fully resolved run config as YAML (what a run, or an arm, really runs)."""
    cfg = load_run_config(config, list(overrides or []))
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)


config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
config_app.command("show")(_config_show)


def register(app: typer.Typer) -> None:
    """Add the run commands to the root app."""
    app.add_typer(config_app, name="config")
    app.command("train")(_train)
    app.command("sweep")(_sweep)
    app.command("demo")(_demo)
