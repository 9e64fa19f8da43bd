#!/usr/bin/env bash
# GPU smoke, one prepared command for a lent GPU machine (target: < 8 min): tests/gpu (adapter, sparse attention,
# a torch-engine run, 1-GPU DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 bf16 trials, a 2-worker trial with >= 2 GPUs), then
# `pertadapt bench adapter|attention|cache --device cuda`. Writes OUT/summary.json (device, test counts, bench figures).
#   scripts/gpu-smoke.sh [OUT=runs/gpu-smoke]      (PY=python of the environment, default .venv/bin/python)
set -uo pipefail
OUT=${1:-runs/gpu-smoke}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token HF_HUB_OFFLINE=1 \
  RAY_CHDIR_TO_TRIAL_DIR=0 RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=120
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
timeout 300 "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
tests_rc=$?
timeout 60 "$PY" -m pertadapt.cli bench adapter --device cuda --json "$OUT/bench_adapter.json" >"$OUT/bench_adapter.log" 2>&1
timeout 60 "$PY" -m pertadapt.cli bench attention --device cuda --json "$OUT/bench_attention.json" \
  >"$OUT/bench_attention.log" 2>&1
timeout 60 "$PY" -m pertadapt.cli bench cache --device cuda --json "$OUT/bench_cache.json" >"$OUT/bench_cache.log" 2>&1
"$PY" - "$OUT" "$tests_rc" "$start" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, rc, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
summary = {"device": (out / "gpu.txt").read_text().strip(), "tests_exit_code": rc, "wall_s": time.time() - start}
if (out / "tests.xml").is_file():
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for name in ("bench_adapter", "bench_attention", "bench_cache"):
    path = out / f"{name}.json"
    summary[name] = json.loads(path.read_text()) if path.is_file() else None
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
exit $tests_rc
