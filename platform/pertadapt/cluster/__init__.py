"""Cluster definitions (Ray cluster launcher, KubeRay, SLURM) and their offline validation.

Top layer, next to ``cli``. The only module allowed to import ``ray.autoscaler``; it never imports
torch, deepspeed or wandb.
"""

from pertadapt.cluster.validate import (
    ClusterKind,
    Problem,
    Report,
    UnknownKindError,
    default_schema_dir,
    detect_kind,
    entrypoint_problems,
    format_path,
    placeholders,
    validate_document,
    validate_file,
    validate_kuberay,
    validate_ray_launcher,
)

__all__ = ["ClusterKind", "Problem", "Report", "UnknownKindError", "default_schema_dir", "detect_kind",
           "entrypoint_problems", "format_path", "placeholders", "validate_document", "validate_file", "validate_kuberay",
           "validate_ray_launcher"]
