# Sourced by infra/local/start.sh --postgres-s3: PostgreSQL role + database and an S3 bucket.
# Uses RUN, CKREG_HOME, PY and start() from start.sh.

as_postgres() {  # command...: as the postgres user (PostgreSQL refuses to run as root)
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"
  elif [[ $(id -un) == postgres ]]; then "$@"
  else sudo -u postgres "$@"; fi
}

pg_bin() {  # name: a PostgreSQL program, from PATH or /usr/lib/postgresql/*/bin
  command -v "$1" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1
}

setup_postgres() {
  if [[ -n ${CKREG_DATABASE_URL:-} ]]; then echo "database: CKREG_DATABASE_URL as given"; return; fi
  local host=${PGHOST:-127.0.0.1} port=${PGPORT:-5432} password=${CKREG_PG_PASSWORD:-ckreg}
  if ! "$(pg_bin pg_isready)" -q -h "$host" -p "$port"; then
    local data=$CKREG_HOME/pgdata
    if [[ ! -f $data/PG_VERSION ]]; then
      mkdir -p "$data" && chown postgres: "$data" 2>/dev/null || true
      as_postgres "$(pg_bin initdb)" -D "$data" -U postgres --auth=trust >>"$RUN/postgres.log" 2>&1
    fi
    touch "$RUN/postgres.log" && chown postgres: "$RUN/postgres.log" 2>/dev/null || true
    as_postgres "$(pg_bin pg_ctl)" -D "$data" -l "$RUN/postgres.log" -w \
      -o "-c listen_addresses=$host -p $port -k /tmp" start
    echo "$data" >"$RUN/postgres.datadir"  # stop.sh stops it
  fi
  # Idempotent: role and database exist after this, the password set.
  as_postgres psql -h "$host" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q -d postgres <<SQL
SELECT 'CREATE ROLE ckreg LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ckreg')\gexec
ALTER ROLE ckreg PASSWORD '$password';
SELECT 'CREATE DATABASE ckreg OWNER ckreg' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'ckreg')\gexec
SQL
  export CKREG_DATABASE_URL="postgresql+psycopg://ckreg:$password@$host:$port/ckreg"
  echo "database: postgresql://ckreg@$host:$port/ckreg"
}

setup_s3() {
  local bucket=${CKREG_S3_BUCKET:-ckreg}
  if [[ -z ${CKREG_S3_ENDPOINT_URL:-} ]]; then
    local port=${MOTO_PORT:-5000}
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing}
    export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
    start moto "$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$port"
    export CKREG_S3_ENDPOINT_URL=http://127.0.0.1:$port
    wait_url "$CKREG_S3_ENDPOINT_URL/moto-api/" 60
  fi
  export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
  "$PY" - "$CKREG_S3_ENDPOINT_URL" "$bucket" <<'PY'
import sys, boto3
endpoint, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint)
if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
    s3.create_bucket(Bucket=bucket)
PY
  export CKREG_STORE_URL=${CKREG_STORE_URL:-s3://$bucket/ckreg}
  echo "store: $CKREG_STORE_URL at $CKREG_S3_ENDPOINT_URL"
}
