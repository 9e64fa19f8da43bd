"""`pertadapt cluster validate FILE...`: offline check of Ray launcher YAMLs and KubeRay manifests."""

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
                                       help="Ray cluster launcher YAMLs (provider:) or KubeRay manifests "
                                            "(apiVersion: ray.io/v1, kind RayJob or RayCluster)."),
    schema_dir: Path | None = typer.Option(None, "--schema-dir", file_okay=False,
                                           help="KubeRay CRD schema directory (default: cluster/kuberay/schema "
                                                "or $PERTADAPT_KUBERAY_SCHEMA_DIR)."),
) -> None:
    """Validate cluster definitions offline (no SSH, no cloud or Kubernetes API); exit 2 on any error."""
    from pertadapt.cluster import validate_file

    failed = 0
    for path in files:
        for report in validate_file(path, schema_dir):
            kind = report.kind.value if report.kind else "unknown kind"
            if report.ok:
                log.info("%s: valid %s", path, kind)
                continue
            failed += 1
            for problem in report.problems:
                log.error("%s (%s): %s", path, kind, problem)
    if failed:
        raise typer.Exit(code=2)
