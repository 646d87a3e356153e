#!/usr/bin/env bash
# An MLflow tracking server bound to 127.0.0.1 (HOST=0.0.0.0 to serve a network you trust), artifacts
# proxied by the server into a folder, background job execution off, one web worker.
#
# Usage: scripts/tracking_server.sh [--port PORT] [--backend sqlite|postgres|URI] [--artifacts DIR]
#                                   [--pgdata DIR] [--pg-port PORT]
#   --backend sqlite     (default) mlruns/server.db
#   --backend postgres   a PostgreSQL cluster of its own: `initdb` in --pgdata (default mlruns/postgres,
#                        kept between starts), served on 127.0.0.1:--pg-port (default PORT+1) only, with
#                        trust authentication (local connections only); stopped with the server.
#                        Run as root, the cluster runs as the `postgres` user, who must reach --pgdata.
#   --backend URI        any store MLflow takes, e.g. an existing postgresql://user:pw@host/db
# then: python train.py tracking=server tracking.uri=http://127.0.0.1:PORT
# It starts several processes: stop them together, with Ctrl-C here, or `kill -- -PGID` when started
# with `setsid`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
port=5000 backend=sqlite artifacts="$root/mlruns/server-artifacts" pgdata="$root/mlruns/postgres" pg_port=""
while (($#)); do
    case "$1" in
        --port) port="$2" ;;
        --backend) backend="$2" ;;
        --artifacts) artifacts="$2" ;;
        --pgdata) pgdata="$2" ;;
        --pg-port) pg_port="$2" ;;
        *) echo "tracking_server.sh: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
    shift 2 || { echo "tracking_server.sh: '$1' needs a value" >&2; exit 2; }
done
source "$(dirname "$0")/find_mlflow.sh"
find_mlflow "$root"
server_pid="" postgres_pid=""
stop() {  # the server first, then the database it writes to (INT: PostgreSQL's fast shutdown)
    [[ -z "$server_pid" ]] || { kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; }
    [[ -z "$postgres_pid" ]] || { kill -INT "$postgres_pid" 2>/dev/null; wait "$postgres_pid" 2>/dev/null; }
}
trap stop EXIT
trap 'exit 143' TERM INT

start_postgres() {
    local bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
    [[ -x "$bin/initdb" ]] || { echo "tracking_server.sh: PostgreSQL's initdb not found; set PG_BIN" >&2; exit 2; }
    "$mlflow_python" -c "import psycopg" 2>/dev/null || {
        echo "tracking_server.sh: MLflow reaches PostgreSQL through psycopg: pip install -e '.[server]'" >&2; exit 2; }
    pg_port="${pg_port:-$((port + 1))}"
    local as_owner=()
    mkdir -p "$pgdata"
    if ((EUID == 0)); then  # PostgreSQL refuses to run as root
        chown postgres: "$pgdata" && chmod 700 "$pgdata"
        as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    fi
    if [[ ! -f "$pgdata/PG_VERSION" ]]; then
        "${as_owner[@]}" "$bin/initdb" -D "$pgdata" -U mlflow --auth=trust -E UTF8 >/dev/null
    fi
    # in this process group: whatever stops the server stops the database too
    "${as_owner[@]}" "$bin/postgres" -D "$pgdata" -h 127.0.0.1 -p "$pg_port" -k "$pgdata" &
    postgres_pid=$!
    until "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; do
        kill -0 $postgres_pid 2>/dev/null || { echo "tracking_server.sh: PostgreSQL did not start" >&2; exit 1; }
        sleep 0.2
    done
    "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='mlflow'" \
        | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
    backend_uri="postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow"
    echo "tracking_server.sh: PostgreSQL $pgdata on 127.0.0.1:$pg_port"
}

case "$backend" in
    sqlite) backend_uri="sqlite:///$root/mlruns/server.db" ;;
    postgres) start_postgres ;;
    *) backend_uri="$backend" ;;
esac
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
"$mlflow" server --backend-store-uri "$backend_uri" --artifacts-destination "$artifacts" \
    --serve-artifacts --host "${HOST:-127.0.0.1}" --port "$port" --workers 1 &
server_pid=$!
wait $server_pid
