#!/usr/bin/env bash
# When to use: try the multi-node path on ONE machine (a laptop, a CI box) before a real cluster. It starts a Ray
# head that offers no CPUs (like a cloud head node) on 127.0.0.2 and N worker "nodes" on 127.0.0.3, 127.0.0.4, ...,
# each a `ray start --block` process whose PID is kept, all on loopback with token auth (RAY_AUTH_MODE=token):
#
#   cluster/local/ray-local-cluster.sh up   DIR [N_WORKERS=2] [CPUS_PER_WORKER=2]
#   RAY_ADDRESS=127.0.0.2:6390 pertadapt sweep ablations/demo.yaml --out runs/demo      # joins it
#   pertadapt cluster submit --address http://127.0.0.1:8275 ablations/demo.yaml --out "$PWD/runs/demo"
#   cluster/local/ray-local-cluster.sh down DIR                                          # SIGTERM by PID
#
# DIR holds the PID files, logs and each node's Ray temp dir (keep its path short: Ray's socket paths are limited).
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
RAY=${RAY:-ray}
HEAD_IP=127.0.0.2 GCS_PORT=6390 DASHBOARD_PORT=8275 CLIENT_PORT=20011

wait_for_nodes() {  # $1 = number of nodes that must be alive
  for _ in $(seq 1 120); do
    n=$("$RAY" status --address "$HEAD_IP:$GCS_PORT" 2>/dev/null | grep -cE '^ *1 node_' || true)
    [ "$n" -ge "$1" ] && return 0
    sleep 1
  done
  echo "ray-local-cluster: only $n of $1 nodes came up; see $DIR/*.log" >&2
  return 1
}

up() {
  mkdir -p "$DIR"
  "$RAY" start --head --block --node-ip-address=$HEAD_IP --port=$GCS_PORT --num-cpus=0 \
    --dashboard-host=127.0.0.1 --dashboard-port=$DASHBOARD_PORT --ray-client-server-port=$CLIENT_PORT \
    --temp-dir="$DIR/head" --disable-usage-stats >"$DIR/head.log" 2>&1 &
  echo $! >"$DIR/head.pid"
  wait_for_nodes 1
  for i in $(seq 1 "$N_WORKERS"); do
    "$RAY" start --block --address=$HEAD_IP:$GCS_PORT --node-ip-address=127.0.0.$((i + 2)) \
      --num-cpus="$CPUS" --dashboard-agent-listen-port=$((52365 + i)) --metrics-export-port=$((8080 + i)) \
      --temp-dir="$DIR/w$i" --disable-usage-stats >"$DIR/w$i.log" 2>&1 &
    echo $! >"$DIR/w$i.pid"
  done
  wait_for_nodes $((N_WORKERS + 1))
  echo "RAY_ADDRESS=$HEAD_IP:$GCS_PORT  (Jobs API: http://127.0.0.1:$DASHBOARD_PORT)"
}

down() {  # SIGTERM by PID: every worker at once (they drain in parallel), then the head
  stop "$DIR"/w*.pid
  stop "$DIR"/head.pid
}

stop() {
  pids=()
  for f in "$@"; do [ -f "$f" ] && pids+=("$(cat "$f")"); done
  [ ${#pids[@]} -eq 0 ] && return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 60); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  rm -f "$@"
}

CMD=${1:?usage: $0 up|down DIR [N_WORKERS] [CPUS_PER_WORKER]}
DIR=${2:?usage: $0 up|down DIR [N_WORKERS] [CPUS_PER_WORKER]}
N_WORKERS=${3:-2} CPUS=${4:-2}
case "$CMD" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down DIR [N_WORKERS] [CPUS_PER_WORKER]" >&2; exit 2 ;;
esac
