"""Cluster definitions: every launcher YAML and KubeRay manifest validates offline; errors carry key paths."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pertadapt.cli import cluster as cluster_cli
from pertadapt.cluster import (
    ClusterKind,
    Problem,
    UnknownKindError,
    detect_kind,
    validate_document,
    validate_file,
)

REPO = Path(__file__).resolve().parents[2]
RAY_FILES = sorted((REPO / "cluster" / "ray").glob("*.yaml"))
KUBERAY_FILES = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
SBATCH = REPO / "cluster" / "slurm" / "ray_cluster.sbatch"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _paths(problems: tuple[Problem, ...] | list[Problem]) -> list[str]:
    return [p.path for p in problems]


def test_every_cluster_file_is_found() -> None:
    assert {p.name for p in RAY_FILES} == {"local.yaml", "aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY_FILES} == {"rayjob.yaml", "raycluster.yaml"}


@pytest.mark.parametrize("path", RAY_FILES + KUBERAY_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_validates(path: Path) -> None:
    (report,) = validate_file(path)
    assert report.ok, [str(p) for p in report.problems]
    expected = ClusterKind.RAY_LAUNCHER if path.parent.name == "ray" else ClusterKind(_load(path)["kind"])
    assert report.kind is expected


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_head_takes_no_trials_and_workers_have_gpus(name: str) -> None:
    cfg = _load(REPO / "cluster" / "ray" / name)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for key, t in types.items() if key != cfg["head_node_type"]]
    assert workers
    assert all(t["resources"]["GPU"] > 0 and t["resources"]["CPU"] > 0 for t in workers)


@pytest.mark.parametrize("path", RAY_FILES, ids=lambda p: p.name)
def test_setup_installs_torch_first_and_pins_ray(path: Path) -> None:
    cfg = _load(path)
    common = cfg.get("setup_commands", [])
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = common + cfg.get(role, [])
        torch_at = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
        repo_at = next(i for i, c in enumerate(commands) if "-e ~/pertadapt" in c)
        assert torch_at < repo_at
        assert "DS_BUILD_OPS=0" in commands[repo_at]
        assert '"ray[default,tune,train]==2.60.0"' in commands[repo_at]
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_rayjob_runs_the_demo_sweep_with_token_auth() -> None:
    job = _load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    assert "pertadapt sweep ablations/demo.yaml --out /shared/runs/demo" in job["spec"]["entrypoint"]
    assert (REPO / "ablations" / "demo.yaml").is_file()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert "WANDB_MODE" not in env  # a pinned mode would beat the user's API key: W&B stays online with a key
    assert env["RAY_AUTH_MODE"] == "token"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (key,) = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert key == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key",
                                                                            "optional": True}}}


def test_bogus_key_is_reported_with_its_path() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "aws.yaml")
    cfg["bogus_field"] = 1
    cfg["available_node_types"]["gpu_worker"]["min_wrokers"] = 0
    report = validate_document(cfg)
    assert sorted(_paths(report.problems)) == ["available_node_types.gpu_worker.min_wrokers", "bogus_field"]
    assert all(p.message == "unknown key" for p in report.problems)


def test_wrong_type_is_reported_before_ray_prepares_the_config() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "gcp.yaml")
    cfg["max_workers"] = "two"
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    problems = validate_document(cfg).problems
    assert sorted(_paths(problems)) == ["available_node_types.gpu_worker.resources.GPU", "max_workers"]
    assert "'two' is not of type 'integer'" in {p.message for p in problems}


def test_missing_worker_ips_is_reported() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "local.yaml")
    del cfg["provider"]["worker_ips"]
    (problem,) = validate_document(cfg).problems
    assert problem.path == "provider.worker_ips"


def test_ray_semantic_check_runs_after_the_schema() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "aws.yaml")
    cfg["head_node_type"] = "no_such_type"
    (problem,) = validate_document(cfg).problems
    assert "head_node_type" in problem.message


def test_kuberay_typo_and_wrong_type_are_reported_with_paths() -> None:
    job = _load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicaz"] = group.pop("replicas")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    problems = validate_document(job).problems
    assert sorted(_paths(problems)) == [
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus",
        "spec.rayClusterSpec.workerGroupSpecs[0].replicaz",
        "spec.shutdownAfterJobFinishes",
    ]


def test_kuberay_missing_required_key() -> None:
    cluster = _load(REPO / "cluster" / "kuberay" / "raycluster.yaml")
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    (problem,) = validate_document(cluster).problems
    assert problem.path == "spec.workerGroupSpecs[0].groupName"


@pytest.mark.parametrize(("doc", "path"), [
    ({"apiVersion": "ray.io/v1alpha1", "kind": "RayJob"}, "apiVersion"),
    ({"apiVersion": "ray.io/v1", "kind": "RayService"}, "kind"),
    ({"cluster_name": "x"}, "<root>"),
    (["provider"], "<root>"),
])
def test_unknown_kind(doc: Any, path: str) -> None:
    with pytest.raises(UnknownKindError, match=f"^{path}: ") as err:
        detect_kind(doc)
    assert err.value.path == path
    report = validate_document(doc)
    assert report.kind is None
    assert _paths(report.problems) == [path]


def test_multi_document_file_and_yaml_errors(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    job = _load(REPO / "cluster" / "kuberay" / "rayjob.yaml")
    job["spec"]["entrypointz"] = job["spec"].pop("entrypoint")
    both.write_text(yaml.safe_dump_all([_load(REPO / "cluster" / "kuberay" / "raycluster.yaml"), job]))
    first, second = validate_file(both)
    assert first.ok
    assert first.kind is ClusterKind.RAY_CLUSTER
    assert _paths(second.problems) == ["[1].spec.entrypointz"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("provider: {type: local\n")
    (report,) = validate_file(broken)
    assert report.kind is None
    assert report.problems[0].message.startswith("not valid YAML")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert not validate_file(empty)[0].ok


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Root."""

    cluster_cli.register(app)
    return app


def test_cli_validate_exit_codes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["cluster", "validate", *map(str, RAY_FILES + KUBERAY_FILES)])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.yaml"
    cfg = _load(REPO / "cluster" / "ray" / "local.yaml")
    del cfg["provider"]["worker_ips"]
    bad.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.ERROR, logger="pertadapt.cli.cluster"):
        res = runner.invoke(_app(), ["cluster", "validate", str(RAY_FILES[0]), str(bad)])
    assert res.exit_code == 2
    assert any("provider.worker_ips" in r.getMessage() for r in caplog.records)
    assert runner.invoke(_app(), ["cluster", "validate", str(tmp_path / "missing.yaml")]).exit_code == 2


def test_validation_imports_no_heavy_framework() -> None:
    code = ("import sys; from pertadapt.cluster import validate_file; "
            f"assert all(r.ok for f in {[str(p) for p in RAY_FILES + KUBERAY_FILES]!r} for r in validate_file(f)); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_slurm_script_parses_and_uses_token_auth() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(SBATCH)], check=True, timeout=30)
    text = SBATCH.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "export RAY_AUTH_TOKEN" in text
    assert "ray start --head --block" in text
    assert "ray start --block" in text
    assert "trap stop_ray EXIT" in text
    assert 'SWEEP=(pertadapt sweep "$ABLATION" --out "$OUT")' in text


# --- the mistakes that pass the schemas: each one in a broken copy of a shipped recipe, exit 2 naming the field ---

def _job() -> dict[str, Any]:
    return _load(REPO / "cluster" / "kuberay" / "rayjob.yaml")


def _raycluster() -> dict[str, Any]:
    return _load(REPO / "cluster" / "kuberay" / "raycluster.yaml")


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


def _break_gpus_resource(recipe: str) -> tuple[dict[str, Any], str]:
    cfg = _load(REPO / "cluster" / "ray" / recipe)
    res = cfg["available_node_types"]["gpu_worker"]["resources"]
    res["GPUs"] = res.pop("GPU")
    return cfg, "available_node_types.gpu_worker.resources.GPUs"


def _break_nvidia_gpus(doc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], str]:
    limits = _gpu_group(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpus"] = limits.pop("nvidia.com/gpu")
    return doc, f"{prefix}workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpus"


def _break_replicas(doc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], str]:
    _gpu_group(doc).update(minReplicas=5, maxReplicas=4)
    return doc, f"{prefix}workerGroupSpecs[0].minReplicas"


def _break_image(doc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], str]:
    del _gpu_group(doc)["template"]["spec"]["containers"][0]["image"]
    return doc, f"{prefix}workerGroupSpecs[0].template.spec.containers[0].image"


def _break_ray_version(doc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], str]:
    doc["spec"].get("rayClusterSpec", doc["spec"])["rayVersion"] = "2.46.0"  # authOptions needs >= 2.52.0
    return doc, f"{prefix}rayVersion"


def _break_entrypoint(doc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], str]:
    doc["spec"]["entrypoint"] = "cd $HOME/pertadapt && pertadapt sweep ablations/demo.yaml --out /shared/runs/demo"
    return doc, "spec.entrypoint"


_KUBERAY_BREAKS = [_break_nvidia_gpus, _break_replicas, _break_image, _break_ray_version]
BROKEN = (
    [pytest.param(*_break_gpus_resource(r), id=f"{r}-GPUs") for r in ("aws.yaml", "gcp.yaml")]
    + [pytest.param(*b(_job(), "spec.rayClusterSpec."), id=f"rayjob-{b.__name__[7:]}") for b in _KUBERAY_BREAKS]
    + [pytest.param(*b(_raycluster(), "spec."), id=f"raycluster-{b.__name__[7:]}") for b in _KUBERAY_BREAKS]
    + [pytest.param(*_break_entrypoint(_job(), ""), id="rayjob-entrypoint")]
)


@pytest.mark.parametrize(("doc", "field"), BROKEN)
def test_cli_validate_names_the_field_of_each_mistake(doc: dict[str, Any], field: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.ERROR, logger="pertadapt.cli.cluster"):
        res = CliRunner().invoke(_app(), ["cluster", "validate", str(bad)])
    assert res.exit_code == 2, res.output
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"): {field}: " in m for m in errors), errors


@pytest.mark.parametrize("path", RAY_FILES + KUBERAY_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_placeholders_are_notes_until_ready(path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = CliRunner()
    with caplog.at_level(logging.WARNING, logger="pertadapt.cli.cluster"):
        assert runner.invoke(_app(), ["cluster", "validate", str(path)]).exit_code == 0
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert notes
    assert all("to edit before launching" in m for m in notes)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pertadapt.cli.cluster"):
        assert runner.invoke(_app(), ["cluster", "validate", "--ready", str(path)]).exit_code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(notes)
    # an edited copy (every placeholder replaced) is ready
    edited = tmp_path / path.name
    text = path.read_text().replace("registry.example.com", "ghcr.io/lab").replace("REPLACE-ME", "edited")
    edited.write_text(re.sub(r"192\.0\.2\.(\d+)", r"10.0.0.\1", text))
    res = runner.invoke(_app(), ["cluster", "validate", "--ready", str(edited)])
    assert res.exit_code == 0, res.output


def test_each_placeholder_kind_is_named_at_its_field() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "aws.yaml")
    marks = {p.path: p.message for p in validate_document(cfg).placeholders}
    assert "'ami-REPLACE-ME'" in marks["available_node_types.gpu_worker.node_config.ImageId"]
    job = validate_document(_job()).placeholders
    assert "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image" in _paths(job)
    assert all("registry.example.com" in p.message for p in job)


@pytest.mark.parametrize("script", [SBATCH, REPO / "cluster" / "local" / "ray-local-cluster.sh"],
                         ids=lambda p: p.name)
def test_shell_scripts_are_checked_as_shell(script: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (report,) = validate_file(script)
    assert report.ok
    assert report.kind is ClusterKind.SHELL
    broken = tmp_path / script.name
    lines = script.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(("stop_ray() {", "up() {")))
    lines.insert(at + 1, "    if true; then")  # never closed
    broken.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.ERROR, logger="pertadapt.cli.cluster"):
        res = CliRunner().invoke(_app(), ["cluster", "validate", str(broken)])
    assert res.exit_code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    assert all("(shell script): line " in m for m in errors), errors
    assert not any("YAML" in m for m in errors)


@pytest.mark.parametrize(("entrypoint", "bad"), [
    ("bash -c 'cd \"$HOME/pertadapt\" && exec pertadapt sweep a.yaml --out /shared/x'", False),
    ("pertadapt sweep a.yaml --out /shared/x", False),
    ("cd $HOME/pertadapt && pertadapt sweep a.yaml", True),
    ("pertadapt sweep a.yaml; echo done", True),
    ("pertadapt sweep a.yaml > log.txt", True),
    ("pertadapt sweep a.yaml | tee log", True),
    ("bash -c 'unbalanced", True),
])
def test_entrypoint_shell_operators(entrypoint: str, bad: bool) -> None:
    from pertadapt.cluster import entrypoint_problems

    assert bool(entrypoint_problems(entrypoint)) is bad


def test_a_token_auth_cluster_without_ray_version_is_refused() -> None:
    doc = _raycluster()
    del doc["spec"]["rayVersion"]
    assert _paths(validate_document(doc).problems) == ["spec.rayVersion"]
    doc["spec"]["rayVersion"] = "2.53.0"
    doc["spec"]["authOptions"]["enableK8sTokenAuth"] = True  # needs >= 2.55.0
    assert _paths(validate_document(doc).problems) == ["spec.rayVersion"]


# --- what the recipes promise: shared storage, worker credentials, W&B not pinned, the GCP driver wait ---

ALL_RECIPES = RAY_FILES + KUBERAY_FILES + [SBATCH, REPO / "cluster" / "local" / "ray-local-cluster.sh"]


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_no_recipe_pins_the_wandb_mode(path: Path) -> None:
    assert "WANDB_MODE" not in path.read_text()  # a pinned mode beats the user's key; `auto` is offline without one


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_nodes_mount_shared_storage_for_the_image_user_and_workers_have_credentials(name: str) -> None:
    cfg = _load(REPO / "cluster" / "ray" / name)
    worker = cfg["available_node_types"]["gpu_worker"]
    # node-type initialization_commands replace the top-level ones: both lists must mount /shared
    for commands in (cfg["initialization_commands"], worker.get("initialization_commands",
                                                                cfg["initialization_commands"])):
        mount = next(c for c in commands if "mount -t nfs" in c)
        assert "/shared" in mount
        assert "chown 1000:100 /shared" in mount  # the rayproject image's user: ray (uid 1000, gid 100)
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]
    node = worker["node_config"]
    assert ("IamInstanceProfile" in node) if name == "aws.yaml" else ("serviceAccounts" in node)
    assert any(k.startswith("accelerator_type:") for k in worker["resources"])


def test_gcp_gpu_workers_wait_for_the_nvidia_driver_before_docker() -> None:
    cfg = _load(REPO / "cluster" / "ray" / "gcp.yaml")
    first = cfg["available_node_types"]["gpu_worker"]["initialization_commands"][0]
    assert "until" in first
    assert "nvidia-smi" in first
    assert first.startswith("timeout ")


def test_slurm_gives_srun_overlap_shells_the_token_through_a_private_file() -> None:
    text = SBATCH.read_text()
    assert "(umask 077 && printf '%s' \"$RAY_AUTH_TOKEN\" >\"$TOKEN_FILE\")" in text
    assert 'rm -f "$TOKEN_FILE"' in text.split("stop_ray() {", 1)[1]
    readme = (REPO / "cluster" / "slurm" / "README.md").read_text()
    assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/pertadapt-<jobid>.token" in readme


def test_cluster_up_refuses_a_recipe_with_placeholders_before_ray_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="pertadapt.cli.cluster"):
        res = CliRunner().invoke(_app(), ["cluster", "up", str(REPO / "cluster" / "ray" / "aws.yaml")])
    assert res.exit_code == 2
    errors = [r.getMessage() for r in caplog.records]
    assert any("ImageId: placeholder 'REPLACE-ME'" in m for m in errors), errors
    assert not any("$ ray up" in r.getMessage() for r in caplog.records)
