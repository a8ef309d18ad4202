#!/usr/bin/env bash
# Stop what infra/local/start.sh started: the registry, every worker (worker-*), the MLflow UI,
# Prefect, moto_server, and PostgreSQL when start.sh created it. Each gets SIGTERM to its
# process group; stop.sh waits until the group is gone (SIGKILL after $STOP_GRACE_S, default 30).
#   infra/local/stop.sh
set -euo pipefail
RUN="${CKREG_HOME:-$(cd "$(dirname "$0")/../.." && pwd)/.ckreg}/run"
GRACE=${STOP_GRACE_S:-30}
[[ -d $RUN ]] || { echo "nothing started under $RUN"; exit 0; }

group_alive() { pgrep -g "$1" >/dev/null 2>&1 || kill -0 "$1" 2>/dev/null; }

stop_group() {  # name: SIGTERM its group, wait, SIGKILL what is left
  local pidfile="$RUN/$1.pid" pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if group_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while group_alive "$pid" && (( waited < GRACE * 10 )); do sleep 0.1; waited=$((waited + 1)); done
    if group_alive "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      echo "killed $1 ($pid): still running after ${GRACE}s"
    else
      echo "stopped $1 ($pid)"
    fi
  fi
  rm -f "$pidfile"
}

# The registry first (no new work), then the workers (they stop their flow runs), then services.
names=(registry)
for f in "$RUN"/worker-*.pid "$RUN"/worker.pid; do [[ -f $f ]] && names+=("$(basename "$f" .pid)"); done
names+=(mlflow-ui prefect moto)
for name in "${names[@]}"; do stop_group "$name"; done
if [[ -f $RUN/postgres.datadir ]]; then
  data=$(cat "$RUN/postgres.datadir")
  pg_ctl=$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)
  as=(); [[ $(id -u) == 0 ]] && as=(runuser -u postgres --)
  "${as[@]}" "$pg_ctl" -D "$data" -w stop -m fast || echo "PostgreSQL in $data did not stop" >&2
  rm -f "$RUN/postgres.datadir"
fi
# ckreg serve/worker each leave a watchdog in its own session (flows/processes.py) that exits
# within seconds of its parent: wait for every process of this deployment (same CKREG_HOME).
HOME_DIR=$(cd "$RUN/.." && pwd)
MY_PGID=$(ps -o pgid= -p $$ | tr -d ' ')
ours() {  # Python processes (ckreg, Prefect, their watchdogs) with our CKREG_HOME, not stop.sh's
  local pid exe
  for pid in $(grep -lzx "CKREG_HOME=$HOME_DIR" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    exe=$( { tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | head -1)
    [[ ${exe##*/} =~ ^(python|ckreg|prefect|mlflow|moto_server) ]] || continue
    [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$MY_PGID" ]] || echo "$pid"
  done
}
for _ in $(seq $((GRACE * 4))); do [[ -z $(ours) ]] && break; sleep 0.25; done
left=$(ours)
[[ -z $left ]] || { echo "killing leftover processes: $left"; kill -KILL $left 2>/dev/null || true; }
