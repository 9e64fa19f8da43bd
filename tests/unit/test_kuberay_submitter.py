"""The RayJob recipe as KubeRay's submitter runs it: the sweep runs inside the Ray job, never in the submitter pod.

KubeRay (ray-operator/controllers/ray/common/job.go, ``BuildJobSubmitCommand``, K8sJobMode, and
rayjob_controller.go, ``configureSubmitterContainer``) joins its command words with spaces and runs the line as
``/bin/bash -ce -- LINE``; the entrypoint is pasted in as it is, after ``--``. :func:`kuberay_submitter_command`
rebuilds that line word for word; stub ``ray`` and ``pertadapt`` executables on ``PATH`` then record where the
sweep ran: the stub ``ray job submit`` joins its entrypoint words as Ray's CLI does (``shlex.join``) and runs the
result with ``bash -c`` in a marked environment, as the job supervisor would on the head.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
#: KubeRay's dashboard health probe (utils.BasePythonHealthCommand with RayDashboardGCSHealthPath, 10 s timeout).
_HEALTH = ('python -c "import urllib.request; r=urllib.request.urlopen(\'%s\', timeout=%d); '
           'exit(0 if b\'success\' in r.read() else 1)"')


def _go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` for the ASCII JSON KubeRay quotes (same escapes as a JSON string)."""
    return json.dumps(text)


def kuberay_submitter_command(job: dict[str, Any], dashboard_url: str, job_id: str) -> list[str]:
    """The submitter container's command for a RayJob in K8sJobMode, built as KubeRay v1.x builds it."""
    spec = job["spec"]
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    entrypoint = spec["entrypoint"].strip()
    cmd = ["until", _HEALTH % (address + "/api/gcs_healthz", 10), ">/dev/null", "2>&1", ";",
           "do", "echo", _go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."), ";",
           "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), sort_keys=True, separators=(",", ":"))
        cmd += ["--runtime-env-json", _go_quote(runtime_env)]
    if spec.get("metadata"):
        cmd += ["--metadata-json", _go_quote(json.dumps(spec["metadata"], sort_keys=True, separators=(",", ":")))]
    cmd += ["--submission-id", job_id]
    for key, flag in (("entrypointNumCpus", "--entrypoint-num-cpus"), ("entrypointNumGpus", "--entrypoint-num-gpus")):
        if spec.get(key):
            cmd += [flag, f"{float(spec[key]):f}"]
    cmd += ["--", entrypoint, ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return ["/bin/bash", "-ce", "--", " ".join(cmd)]


_STUB_RAY = r'''#!/bin/bash
# stub `ray`: `job status` finds no job, `job submit ... -- WORDS` runs WORDS as the Ray job would, `job logs` prints
set -e
case "$1 $2" in
  "job status") exit 1 ;;
  "job logs") echo "stub logs of $*"; exit 0 ;;
  "job submit")
    shift 2
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
    shift
    entry=$(python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")
    printf '%s\n' "$entry" >>"$STUB_LOG.entrypoints"
    cd "$JOB_CWD"
    PERTADAPT_WHERE=ray-job bash -c "$entry"
    ;;
  *) echo "stub ray: unexpected $*" >&2; exit 3 ;;
esac
'''
_STUB_PERTADAPT = '''#!/bin/bash
printf '%s %s %s\\n' "${PERTADAPT_WHERE:-submitter}" "$PWD" "$*" >>"$STUB_LOG"
'''


def _replay(job: dict[str, Any], tmp_path: Path) -> tuple[list[str], list[str], subprocess.CompletedProcess]:
    """Run the submitter command with stub ``ray``/``pertadapt``/``python``; (sweep calls, Ray job entrypoints)."""
    stubs, home, cwd = tmp_path / "bin", tmp_path / "home", tmp_path / "job-cwd"
    for d in (stubs, home / "pertadapt", cwd):
        d.mkdir(parents=True, exist_ok=True)
    for name, text in (("ray", _STUB_RAY), ("pertadapt", _STUB_PERTADAPT), ("python", "#!/bin/sh\nexit 0\n")):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    python3 = shutil.which("python3")
    assert python3 is not None
    os.symlink(python3, stubs / "python3")
    log = tmp_path / "calls"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(home), "STUB_LOG": str(log), "JOB_CWD": str(cwd),
           "RAY_AUTH_MODE": "token"}
    cmd = kuberay_submitter_command(job, "pertadapt-demo-head-svc.default.svc.cluster.local:8265", "demo-xyz")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    calls = log.read_text().splitlines() if log.exists() else []
    entries = Path(f"{log}.entrypoints").read_text().splitlines() if Path(f"{log}.entrypoints").exists() else []
    return calls, entries, res


def test_the_shipped_rayjob_runs_the_sweep_inside_the_ray_job(tmp_path: Path) -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    calls, entries, res = _replay(job, tmp_path)
    assert res.returncode == 0, res.stderr
    home = tmp_path / "home"
    assert calls == [f"ray-job {home}/pertadapt sweep ablations/demo.yaml --out /shared/runs/demo"]
    (entry,) = entries  # the whole `cd ... && pertadapt sweep ...` is the Ray job's entrypoint
    assert "cd" in entry
    assert "pertadapt sweep" in entry


def test_an_unquoted_entrypoint_runs_the_sweep_in_the_submitter(tmp_path: Path) -> None:
    """What the check above guards against: the entrypoint the recipe had before."""
    job = yaml.safe_load(RAYJOB.read_text())
    job["spec"]["entrypoint"] = "cd $HOME/pertadapt && pertadapt sweep ablations/demo.yaml --out /shared/runs/demo"
    calls, entries, _ = _replay(job, tmp_path)
    assert entries == [f"cd {tmp_path / 'home'}/pertadapt"]  # the Ray job is only the `cd`
    assert [c.split()[0] for c in calls] == ["submitter"]


def test_the_command_carries_the_runtime_env_as_kuberay_quotes_it() -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    line = kuberay_submitter_command(job, "h:8265", "id")[3]
    env = json.loads(json.loads(line.split("--runtime-env-json ", 1)[1].split(" --submission-id", 1)[0]))
    assert env == yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "WANDB_MODE" not in env["env_vars"]
