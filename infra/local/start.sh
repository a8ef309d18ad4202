#!/usr/bin/env bash
# One machine, server mode: Prefect server + ckreg worker + ckreg serve (registry).
# State lives under $CKREG_HOME (default .ckreg); logs and pids under $CKREG_HOME/run.
#   infra/local/start.sh            # start all three
#   infra/local/stop.sh             # stop them
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
export CKREG_HOME=${CKREG_HOME:-$PWD/.ckreg}
export PREFECT_HOME=${PREFECT_HOME:-$CKREG_HOME/prefect}
PREFECT_PORT=${PREFECT_PORT:-4200}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT}/api
export CKREG_PREFECT_MODE=server
RUN="$CKREG_HOME/run"
mkdir -p "$RUN"

start() {  # name, command...
  local name=$1; shift
  if [[ -f "$RUN/$name.pid" ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN/$name.pid"))"; return
  fi
  setsid "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
  echo "started $name (pid $!, log $RUN/$name.log)"
}

wait_url() {  # url, seconds
  for _ in $(seq "$2"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "timed out waiting for $1" >&2; return 1
}

start prefect "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_url "$PREFECT_API_URL/health" 120
"$PY" -c "from flows.cli import app; app()" db upgrade
start worker "$PY" -c "from flows.cli import app; app()" worker
start registry "$PY" -c "from flows.cli import app; app()" serve
wait_url "http://127.0.0.1:${CKREG_PORT:-8321}/healthz" 60
echo "registry: http://127.0.0.1:${CKREG_PORT:-8321}/api/v1/docs   prefect: http://127.0.0.1:${PREFECT_PORT}"
