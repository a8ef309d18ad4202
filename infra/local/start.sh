#!/usr/bin/env bash
# One machine, server mode: Prefect server + N `ckreg worker`s + `ckreg serve` (the registry).
#
#   infra/local/start.sh [--workers N]                     # SQLite + file store under $CKREG_HOME
#   infra/local/start.sh --postgres-s3 [--workers N]       # PostgreSQL + S3 on this machine
#   infra/local/start.sh ... --mlflow-ui                   # also the MLflow UI on $MLFLOW_PORT (5001)
#   infra/local/stop.sh                                    # stop all of it, waiting for each
#
# --postgres-s3 creates what it needs, idempotently:
#   * PostgreSQL: uses the server on $PGHOST:$PGPORT (default 127.0.0.1:5432) when one answers,
#     else creates a cluster in $CKREG_HOME/pgdata and starts it. initdb and the server refuse
#     to run as root, so as root they run as the `postgres` user (runuser). The role and
#     database `ckreg` (password $CKREG_PG_PASSWORD, default ckreg) are created as the
#     postgres superuser. CKREG_DATABASE_URL set: used as it is, nothing created.
#   * S3: CKREG_S3_ENDPOINT_URL set: that endpoint (credentials from AWS_* as usual); else a
#     local moto_server on $MOTO_PORT (default 5000). The bucket ($CKREG_S3_BUCKET, default
#     ckreg) is created when missing.
# State lives under $CKREG_HOME (default .ckreg); logs (appended across restarts), pids and
# env.sh (the environment an extra worker or CLI needs) under $CKREG_HOME/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
WORKERS=1 BACKEND=local MLFLOW_UI=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --workers) WORKERS=$2; shift 2 ;;
    --postgres-s3) BACKEND=postgres-s3; shift ;;
    --mlflow-ui) MLFLOW_UI=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $WORKERS =~ ^[0-9]+$ ]] || { echo "--workers takes a number, got '$WORKERS'" >&2; exit 2; }
export CKREG_HOME=${CKREG_HOME:-$PWD/.ckreg}
mkdir -p "$CKREG_HOME"
CKREG_HOME=$(cd "$CKREG_HOME" && pwd)
export PREFECT_HOME=${PREFECT_HOME:-$CKREG_HOME/prefect}
PREFECT_PORT=${PREFECT_PORT:-4200}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT}/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export CKREG_PREFECT_MODE=server
export CKREG_PORT=${CKREG_PORT:-8321}
RUN="$CKREG_HOME/run"
mkdir -p "$RUN"

start() {  # name, command...: its own process group, log appended
  local name=$1; shift
  if [[ -f "$RUN/$name.pid" ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$RUN/$name.pid"))"; return
  fi
  echo "=== $(date -u +%FT%TZ) start.sh: starting $name" >>"$RUN/$name.log"
  setsid "$@" >>"$RUN/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  echo "started $name (pid $!, log $RUN/$name.log)"
}

wait_url() {  # url, seconds
  for _ in $(seq "$2"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "timed out waiting for $1" >&2; return 1
}

if [[ $BACKEND == postgres-s3 ]]; then
  # shellcheck source=infra/local/postgres-s3.sh
  source infra/local/postgres-s3.sh
  setup_postgres
  setup_s3
fi

# The environment every ckreg process of this deployment needs (extra workers, the CLI).
{
  echo "# source this file, then: $(dirname "$PY")/ckreg worker   (an extra worker)"
  for var in CKREG_HOME PREFECT_HOME PREFECT_API_URL PREFECT_SERVER_ANALYTICS_ENABLED \
      CKREG_PREFECT_MODE CKREG_PORT CKREG_DATABASE_URL CKREG_STORE_URL CKREG_S3_ENDPOINT_URL \
      AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION; do
    [[ -n ${!var:-} ]] && printf 'export %s=%q\n' "$var" "${!var}"
  done
} >"$RUN/env.sh"

CKREG=("$PY" -c "from flows.cli import app; app()")
start prefect "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
wait_url "$PREFECT_API_URL/health" 180
"${CKREG[@]}" db upgrade
for i in $(seq "$WORKERS"); do start "worker-$i" "${CKREG[@]}" worker; done
start registry "${CKREG[@]}" serve
wait_url "http://127.0.0.1:$CKREG_PORT/readyz" 120
if [[ $MLFLOW_UI == 1 ]]; then
  start mlflow-ui "$(dirname "$PY")/mlflow" ui --host 127.0.0.1 --port "${MLFLOW_PORT:-5001}" \
    --backend-store-uri "${CKREG_MLFLOW_TRACKING_URI:-sqlite:///$CKREG_HOME/mlflow.db}" \
    --default-artifact-root "$CKREG_HOME/mlartifacts"
fi
echo "registry: http://127.0.0.1:$CKREG_PORT/api/v1/docs   prefect: http://127.0.0.1:$PREFECT_PORT"
echo "extra worker: source $RUN/env.sh && $(dirname "$PY")/ckreg worker"
