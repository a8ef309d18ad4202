#!/usr/bin/env bash
# Stop what infra/local/start.sh started (each process group, by its recorded pid).
set -euo pipefail
RUN="${CKREG_HOME:-$(cd "$(dirname "$0")/../.." && pwd)/.ckreg}/run"
for name in registry worker prefect; do
  pidfile="$RUN/$name.pid"
  [[ -f "$pidfile" ]] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"; echo "stopped $name ($pid)"; fi
  rm -f "$pidfile"
done
