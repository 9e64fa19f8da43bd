"""`pertadapt cluster validate FILE...`: offline check of Ray launcher YAMLs, KubeRay manifests and shell scripts."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger("pertadapt.cli.cluster")

cluster_app = typer.Typer(help="Cluster definitions: Ray cluster launcher, KubeRay, SLURM.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``cluster`` command group to the root app.

    Parameters
    ----------
    app
        The root ``pertadapt`` typer app.
    """
    app.add_typer(cluster_app, name="cluster")


@cluster_app.command("validate")
def validate(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                       help="Ray cluster launcher YAMLs (provider:), KubeRay manifests "
                                            "(apiVersion: ray.io/v1, kind RayJob or RayCluster) or shell scripts "
                                            "(*.sh, *.sbatch: checked with bash -n)."),
    schema_dir: Path | None = typer.Option(None, "--schema-dir", file_okay=False,
                                           help="KubeRay CRD schema directory (default: cluster/kuberay/schema "
                                                "or $PERTADAPT_KUBERAY_SCHEMA_DIR)."),
    ready: bool = typer.Option(False, "--ready",
                               help="Check that the file is ready to launch: an unedited placeholder (REPLACE-ME, "
                                    "registry.example.com, a documentation IP address) is an error, not a note."),
) -> None:
    """Validate cluster definitions offline (no SSH, no cloud or Kubernetes API); exit 2 on any error."""
    from pertadapt.cluster import validate_file

    failed = 0
    for path in files:
        for report in validate_file(path, schema_dir, ready=ready):
            kind = report.kind.value if report.kind else "unknown kind"
            if report.ok:
                for mark in report.placeholders:
                    log.warning("%s (%s): to edit before launching: %s", path, kind, mark)
                log.info("%s: valid %s%s", path, kind, f" ({len(report.placeholders)} placeholder(s) to edit; "
                         "--ready checks they are gone)" if report.placeholders else "")
                continue
            failed += 1
            for problem in report.problems:
                log.error("%s (%s): %s", path, kind, problem)
    if failed:
        raise typer.Exit(code=2)


def _ray(*args: str) -> int:
    """Run the ``ray`` CLI of this environment (token auth on), streaming its output; its exit code."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    log.info("$ ray %s", " ".join(args))
    return subprocess.run([str(exe), *args], env=env, check=False).returncode


def _launcher_file(config: Path, verb: str) -> None:
    """Check ``config`` offline (``up``: placeholders left are errors); a KubeRay, SLURM or shell file gets the
    command to run instead (exit 0)."""
    from pertadapt.cluster import ClusterKind, validate_file

    if config.suffix == ".sbatch":
        typer.echo(f"SLURM recipe: run `sbatch {config}` (and `scancel <jobid>` to stop it)")
        raise typer.Exit(0)
    if config.suffix == ".sh":
        typer.echo(f"Shell recipe: run `bash {config} {'down' if verb == 'down' else 'up'} DIR`")
        raise typer.Exit(0)
    reports = validate_file(config, ready=verb == "up")
    bad = [p for r in reports for p in r.problems]
    if bad:
        for problem in bad:
            log.error("%s: %s", config, problem)
        raise typer.Exit(2)
    kinds = {r.kind for r in reports}
    if ClusterKind.RAY_LAUNCHER not in kinds:
        action = "kubectl delete -f" if verb == "down" else "kubectl apply -f"
        typer.echo(f"KubeRay manifest: run `{action} {config}`")
        raise typer.Exit(0)


@cluster_app.command("up")
def up(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Ray launcher YAML (or a KubeRay/"
                                     "SLURM file: the command to use is printed)."),
       yes: bool = typer.Option(True, "--yes/--confirm", help="Do not ask before creating machines.")) -> None:
    """Start (or update) the cluster: ``ray up`` after the offline check."""
    _launcher_file(config, "up")
    raise typer.Exit(_ray("up", *(["-y"] if yes else []), str(config)))


@cluster_app.command("down")
def down(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Ray launcher YAML."),
         yes: bool = typer.Option(True, "--yes/--confirm", help="Do not ask before deleting machines.")) -> None:
    """Tear the cluster down: ``ray down``."""
    _launcher_file(config, "down")
    raise typer.Exit(_ray("down", *(["-y"] if yes else []), str(config)))


@cluster_app.command("attach")
def attach(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Ray launcher YAML.")) -> None:
    """A shell on the head node: ``ray attach``."""
    _launcher_file(config, "attach")
    raise typer.Exit(_ray("attach", str(config)))


@cluster_app.command("status")
def status(address: str = typer.Option(None, "--address", help="GCS address (host:port); default $RAY_ADDRESS.")
           ) -> None:
    """Nodes and resources of a running cluster: ``ray status``."""
    import os

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        log.error("--address: give the cluster's GCS address (host:port) or set RAY_ADDRESS")
        raise typer.Exit(2)
    raise typer.Exit(_ray("status", "--address", address))


@cluster_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context,
           address: str = typer.Option(..., "--address", help="Jobs API of the cluster, e.g. http://127.0.0.1:8265."),
           working_dir: Path = typer.Option(Path("."), "--working-dir", file_okay=False,
                                            help="Directory shipped to the cluster (the repository root)."),
           submission_id: str = typer.Option(None, "--id", help="Job id (default: Ray picks one).")) -> None:
    """Submit ``pertadapt sweep ARGS...`` as a Ray job; its logs are streamed and the job id printed.

    Everything after the options is passed to ``pertadapt sweep`` on the cluster, e.g.
    ``pertadapt cluster submit --address http://127.0.0.1:8265 ablations/demo.yaml --out /shared/runs/demo``
    through ``ray dashboard CLUSTER.yaml`` (the head's Jobs API listens on its own 127.0.0.1 only) or
    ``kubectl port-forward svc/<cluster>-head-svc 8265:8265``.
    """
    if not ctx.args:
        log.error("submit: give the sweep's arguments (ablation YAML, overrides, --out on shared storage)")
        raise typer.Exit(2)
    entry = ["env", "PYTHONPATH=platform", "python", "-m", "pertadapt.cli", "sweep", *ctx.args]
    ids = ["--submission-id", submission_id] if submission_id else []
    raise typer.Exit(_ray("job", "submit", "--address", address, "--working-dir", str(working_dir), *ids, "--",
                          *entry))
