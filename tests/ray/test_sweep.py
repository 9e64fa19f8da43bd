"""Sweeps through Ray Tune: the demo grid end to end, W&B read-back, Optuna, and sweeps that survive."""

from __future__ import annotations

import csv
import http.client
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from fixtures.wandb_offline import find_offline_runs, read_offline_run

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
FAST = ["optim.epochs=1", "optim.max_steps_per_epoch=2"]
#: The demo sweep's options: a simulation seed of its own, so that in a fresh cache its driver makes the data
#: after planning (and plans the costs again).
DEMO_FAST = [*FAST, "data.simulate_seed=3"]
DUMMY_KEY = "dummykey0123456789abcdef0123456789abcdef"


def _pertadapt(*args: str, timeout: int = 1500, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env=env)
    if ok:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


#: The demo grid cut to two of its rows (the full model and "none") for CI: 2 model arms + 4 baselines, one seed
#: (seed aggregation is covered by the report's unit tests); "none" runs on the in-process torch engine, so the
#: grid mixes Ray Train (DeepSpeed) and plain Tune trials.
DEMO_CI = """name: demo-ci
base: demo.yaml
seeds: [1]
reference_arm: fm+pa+am+ladapt
baselines: true
max_concurrent_trials: 2
arms:
  fm+pa+am+ladapt: {}
  none: {backbone.name: learned, adapter.enabled: false, adapter.attention_mask: none, loss.name: gears,
         engine.name: torch, engine.workers: 1}
"""


@pytest.fixture(scope="module")
def demo_ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("abl") / "demo-ci.yaml"
    path.write_text(DEMO_CI)
    return path


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, demo_ablation: Path) -> Path:
    out = tmp_path_factory.mktemp("demo_sweep")
    _pertadapt("sweep", str(demo_ablation), *DEMO_FAST, "--out", str(out),
               env={**os.environ, "WANDB_API_KEY": DUMMY_KEY, "WANDB_MODE": "offline"})
    return out


def _rows(sweep: Path, name: str = "results.csv") -> list[dict[str, str]]:
    with (sweep / name).open() as fh:
        return list(csv.DictReader(fh))


def test_demo_grid_results(demo_sweep: Path) -> None:
    rows = _rows(demo_sweep)
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["attempts"] == "1" and r["error"] == "" for r in rows)
    arms = {r["arm"] for r in rows}
    assert {"none", "fm+pa+am+ladapt"} <= arms
    assert {"baseline_nochange", "baseline_mean", "baseline_additive", "baseline_linear"} <= arms
    for arm in arms:
        assert [int(r["seed"]) for r in rows if r["arm"] == arm] == [1]
    for r in rows:
        for key in ("test_mse_de", "test_mse", "test_pearson_delta", "val_mse_de", "wall_s"):
            assert math.isfinite(float(r[key])), (r["trial"], key)
        prov = json.loads((Path(r["run_dir"]) / "provenance.json").read_text())
        assert prov["config_hash"] == r["config_hash"]
        assert (Path(r["run_dir"]) / "per_condition.csv").is_file()
    # the varying config values are columns; the parquet file holds the same table
    assert {"cfg.backbone.name", "cfg.adapter.enabled", "cfg.adapter.attention_mask", "cfg.loss.name",
            "cfg.model.name"} <= set(rows[0])
    import pyarrow.parquet as pq

    table = pq.read_table(demo_sweep / "results.parquet")
    assert table.num_rows == len(rows)
    assert table.column("test_mse_de").to_pylist() == pytest.approx([float(r["test_mse_de"]) for r in rows])
    assert (demo_sweep / "report" / "report.html").read_text().count("<table") >= 2
    # every trial names its FM weights: the model arm's tiny FM is random, "none" and the baselines have none
    assert {r["arm"]: r["fm_weights"] for r in rows} == {**dict.fromkeys(arms, "none"), "fm+pa+am+ladapt": "random"}
    assert "fm+pa+am+ladapt [random FM]" in (demo_sweep / "report" / "report.html").read_text()
    # every trial has its planned cost (made after the data when the driver simulated it) next to the measured one
    plan = json.loads((demo_sweep / "plan.json").read_text())
    assert plan["cost"]["trials_without_cost"] == 0
    assert all(t["cost"]["gpu_hours"] > 0 for t in plan["trials"] if t["arm"] == "fm+pa+am+ladapt")
    assert "planned GPU-h/trial" in (demo_sweep / "report" / "report.md").read_text()


def test_every_trial_has_one_finished_wandb_run_matching_the_csv(demo_sweep: Path) -> None:
    rows = _rows(demo_sweep)
    runs = find_offline_runs(demo_sweep / "runs")
    assert len(runs) == len(rows) == 6
    tags = {"fm+pa+am+ladapt": [], "none": ["adapter.attention_mask=none", "adapter.enabled=False",
                                            "backbone.name=learned", "engine.name=torch", "engine.workers=1",
                                            "loss.name=gears"]}
    for r in rows:
        info = read_offline_run(Path(r["wandb_run"]))
        assert info["state"] == "finished"
        # the toggles that set the arm apart from the reference arm
        assert info["tags"] == tags.get(r["arm"], [f"model.name={r['arm']}"]), (r["arm"], info["tags"])
        for key in ("test_mse_de", "test_pearson_delta", "val_mse_de"):
            assert info["summary"][key] == pytest.approx(float(r[key]), rel=1e-6), (r["trial"], key)


def test_one_summary_run_per_sweep_logs_the_results_table(demo_sweep: Path) -> None:
    runs = find_offline_runs(demo_sweep / "report")
    assert len(runs) == 1
    info = read_offline_run(runs[0])
    assert info["state"] == "finished"
    table = info["summary"]["report/summary"]
    assert table["_type"] == "table-file"
    assert table["nrows"] == len({r["arm"] for r in _rows(demo_sweep)}) == 6
    assert info["summary"]["report/paired_tests"]["_type"] == "table-file"


def test_the_api_key_reaches_no_file(demo_sweep: Path) -> None:
    """The driver had WANDB_API_KEY set: no file under the sweep dir or the Ray session it started holds it."""
    import datetime

    started = json.loads((demo_sweep / "sweep.json").read_text())["started_at"]
    ended = (demo_sweep / "results.csv").stat().st_mtime

    def session_start(d: Path) -> float:  # session_<local date>_<local time>_<µs>_<pid>
        return datetime.datetime.strptime("_".join(d.name.split("_")[1:3]), "%Y-%m-%d_%H-%M-%S").timestamp()

    sessions = [d for d in Path("/tmp/ray").glob("session_2*") if started - 1 <= session_start(d) <= ended]
    assert sessions  # the sweep's own local Ray
    roots = [demo_sweep, *sessions]
    hits = []
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            try:
                if path.is_file() and path.stat().st_size < 50_000_000 and DUMMY_KEY.encode() in path.read_bytes():
                    hits.append(path)
            except OSError:
                continue
    assert hits == []


def test_deepspeed_trials_ran_on_two_workers_and_torch_engine_trials_on_one(demo_sweep: Path) -> None:
    for r in _rows(demo_sweep):
        prov = json.loads((Path(r["run_dir"]) / "provenance.json").read_text())
        assert prov["world_size"] == (2 if r["arm"] == "fm+pa+am+ladapt" else 1), r["trial"]
        assert len(prov["ranks"]) == prov["world_size"]


def test_report_command_rewrites_the_report(demo_sweep: Path) -> None:
    report = demo_sweep / "report" / "report.html"
    report.unlink()
    _pertadapt("report", str(demo_sweep), "--reference", "fm+pa+am+ladapt")
    assert report.is_file()
    assert _rows(demo_sweep / "report", "paired_tests.csv")


def test_rerun_into_a_finished_sweep_is_refused_and_a_changed_arm_names_the_change(demo_sweep: Path,
                                                                                  demo_ablation: Path) -> None:
    same = _pertadapt("sweep", str(demo_ablation), *DEMO_FAST, "--out", str(demo_sweep), ok=False)
    assert same.returncode == 2
    assert "already holds this sweep" in same.stderr
    changed = _pertadapt("sweep", str(demo_ablation), *DEMO_FAST, "adapter.ffn_dim=8", "--out", str(demo_sweep),
                         ok=False)
    assert changed.returncode == 2
    assert "holds a different sweep" in changed.stderr
    assert "config changed" in changed.stderr


def test_bench_sweep_reads_where_each_trial_spent_its_time(demo_sweep: Path, tmp_path: Path) -> None:
    _pertadapt("bench", "sweep", "--from", str(demo_sweep), "--json", str(tmp_path / "b.json"))
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["n_trials"] == 6
    assert out["incomplete_trials"] == []
    assert 0.0 < out["overhead_share"] < 1.0
    assert out["concurrency"] == 2
    for t in out["trials"]:
        assert all(t[p] >= 0.0 for p in ("startup", "training", "evaluation", "teardown")), t
        assert t["total"] == pytest.approx(t["startup"] + t["training"] + t["evaluation"] + t["teardown"])
        assert t["total"] <= out["wall_s"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


def _listeners() -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listened on by a Ray process of this machine."""
    out = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
            if "ray" not in text:
                continue
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    out.append((conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _jobs_api_refused(port: int) -> bool:
    """Whether ``GET /api/jobs/`` without the token is refused on ``port`` (a job list is JSON; the metrics
    exporter, which answers every path with Prometheus text, is no Jobs API)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=3) as resp:
            return resp.status >= 400 or "json" not in (resp.headers.get("Content-Type") or "")
    except urllib.error.HTTPError as e:
        return e.code in (401, 403, 404, 405)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return True  # not HTTP (gRPC), or not answering: no Jobs API there


@pytest.mark.usefixtures("no_leftover_ray")
def test_sigterm_the_driver_then_resume(tmp_path: Path, cache_dir: Path) -> None:
    abl = tmp_path / "abl.yaml"
    # four trials of a few seconds, one at a time: the SIGTERM below lands mid-sweep, with two or three trials still
    # to run (with two, the second could finish first and the sweep end with 0, "nothing left to resume")
    abl.write_text("name: survive\nbase: smoke.yaml\nseeds: [1, 2, 3, 4]\nbaselines: false\nmax_concurrent_trials: 1\n"
                   "arms:\n  full: {}\n")
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "pertadapt.cli", "sweep", str(abl), "optim.epochs=1", "--out", str(out),
            "--no-report"]
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "runs" / "full" / "seed1" / "final_metrics.json"
    try:
        _wait_for(lambda: first.is_file(), 900, "the first trial")
        # the local Ray is bound to loopback and offers no unauthenticated Jobs API
        listeners = _listeners()
        assert listeners
        assert all(ipaddress.ip_address(ip).is_loopback or ip.startswith("::ffff:127.") for ip, _ in listeners), listeners
        assert all(_jobs_api_refused(port) for _, port in listeners)
        time.sleep(2)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    # a graceful stop (Tune's state saved, Ray shut down), not Ray's own SIGTERM handler aborting the driver
    assert driver.returncode == 128 + signal.SIGTERM
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    _pertadapt("sweep", str(abl), "optim.epochs=1", "--out", str(out), "--resume", "--no-report")
    rows = _rows(out)
    assert sorted(r["trial"] for r in rows) == ["full/seed1", "full/seed2", "full/seed3", "full/seed4"]
    assert all(r["status"] == "ok" for r in rows)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    # a changed grid over it is refused; with --overwrite it starts over and no old metric survives
    abl.write_text(abl.read_text().replace("seeds: [1, 2, 3, 4]", "seeds: [1]"))
    refused = _pertadapt("sweep", str(abl), "optim.epochs=1", "--out", str(out), "--no-report", ok=False)
    assert refused.returncode == 2
    assert "holds a different sweep" in refused.stderr
    t0 = time.time()
    _pertadapt("sweep", str(abl), "optim.epochs=1", "--out", str(out), "--no-report", "--overwrite")
    rows = _rows(out)
    assert [r["trial"] for r in rows] == ["full/seed1"]
    assert not any((out / "runs" / "full" / f"seed{k}").exists() for k in (2, 3, 4))
    for r in rows:
        assert (Path(r["run_dir"]) / "final_metrics.json").stat().st_mtime > t0
    assert first.read_bytes() != before[0] or first.stat().st_mtime_ns != before[1]


@pytest.mark.usefixtures("no_leftover_ray")
def test_optuna_search_then_resume_keeps_num_samples(tmp_path: Path, cache_dir: Path) -> None:
    abl = tmp_path / "hpo.yaml"
    abl.write_text("name: hpo\nbase: smoke.yaml\nseeds: [1]\nbaselines: false\nmax_concurrent_trials: 1\n"
                   "arms:\n  full: {}\n")
    out = tmp_path / "sweep"
    for extra in ([], ["--resume"]):
        _pertadapt("sweep", str(abl), "optim.epochs=1", "--search-space", "search_spaces/demo.yaml", "--out",
                   str(out), "--no-report", *extra)
        storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna' / 'studies.db'}")
        study = optuna.load_study(study_name="hpo-full", storage=storage)
        assert len(study.trials) == 2  # search_spaces/demo.yaml: num_samples 2, never more after a resume
        assert all(t.value is not None and math.isfinite(t.value) for t in study.trials)
    rows = _rows(out)
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert len(_rows(out, "hpo_results.csv")) == 2
    best = min(study.trials, key=lambda t: t.value)
    final_cfg = yaml.safe_load((Path(rows[0]["run_dir"]) / "config.yaml").read_text())
    assert final_cfg["optim"]["lr"] == pytest.approx(best.params["tuned/optim.lr"])  # searched under "tuned"


def test_dry_run_plans_without_starting_anything(tmp_path: Path, ray_pids) -> None:
    before = ray_pids()
    res = _pertadapt("sweep", "ablations/demo.yaml", "--out", str(tmp_path / "plan"), "--dry-run")
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert len(plan["trials"]) == 24
    assert {t["arm"] for t in plan["trials"]} >= {"fm=pretrained+pa+am+ladapt", "fm=random+pa+am+ladapt", "none",
                                                  "fm=pretrained+pa+am+ladapt=mse+quality", "baseline_linear"}
    assert all(t["workers"] == 2 for t in plan["trials"] if not t["is_baseline"])
    assert "24 trials" in res.stdout
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["plan.json"]
    assert ray_pids() == before


def test_resume_of_a_directory_without_a_sweep_is_refused(tmp_path: Path) -> None:
    res = _pertadapt("sweep", "ablations/demo.yaml", "--out", str(tmp_path / "empty"), "--resume", ok=False)
    assert res.returncode == 2
    assert "holds no sweep" in res.stderr


@pytest.mark.usefixtures("no_leftover_ray")
def test_asha_stops_trials_early_and_says_so(tmp_path: Path, cache_dir: Path) -> None:
    abl = tmp_path / "asha.yaml"
    abl.write_text("name: asha\nbase: smoke.yaml\nseeds: [1]\nbaselines: false\nmax_concurrent_trials: 1\n"
                   "arms:\n  full: {}\n")
    space = tmp_path / "space.yaml"
    # lr from 1e-5 (learns nothing in 3 epochs) to 0.05: later samples below the rung's best stop at epoch 1
    space.write_text("metric: val_mse_de\nmode: min\nnum_samples: 6\nsampler_seed: 3\nscheduler: asha\n"
                     "grace_period: 1\nreduction_factor: 3\nparams:\n"
                     "  optim.lr: {type: loguniform, low: 1.0e-5, high: 5.0e-2}\n")
    out = tmp_path / "sweep"
    _pertadapt("sweep", str(abl), "optim.epochs=3", "optim.max_steps_per_epoch=2", "logging.wandb=offline",
               "--search-space", str(space), "--out", str(out), "--no-report")
    rows = _rows(out, "hpo_results.csv")
    statuses = [r["status"] for r in rows]
    assert len(statuses) == 6
    assert "stopped_early" in statuses
    assert set(statuses) <= {"ok", "stopped_early"}
    # ASHA killed the stopped trials' processes; their W&B runs (kept by the driver) still end as finished,
    # tagged stopped_early, with the epochs they trained; one run per sample
    assert len(find_offline_runs(out / "hpo")) == 6
    for r in rows:
        info = read_offline_run(Path(r["wandb_run"]))
        assert info["state"] == "finished", r
        assert ("stopped_early" in info["tags"]) == (r["status"] == "stopped_early"), (r["status"], info["tags"])
        assert "val_mse_de" in info["summary"]
        if r["status"] == "ok":
            assert info["summary"]["test_mse_de"] == pytest.approx(float(r["test_mse_de"]), rel=1e-6)
