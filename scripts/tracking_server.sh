#!/usr/bin/env bash
# An MLflow tracking server: one web worker, background job execution off, artifacts proxied by the
# server into a folder (clients need no shared file system). Loopback only, unless --auth.
#
# Usage: scripts/tracking_server.sh [--port PORT] [--backend sqlite|postgres|URI] [--artifacts DIR]
#                                   [--pgdata DIR] [--pg-port PORT] [--host HOST]
#                                   [--auth [--admin-password-file FILE] [--auth-db URI] [--default-permission P]]
#                                   [--allowed-hosts LIST] [--cors-allowed-origins LIST]
#                                   [--tls-cert FILE --tls-key FILE]
#   --backend sqlite     (default) mlruns/server.db
#   --backend postgres   a PostgreSQL cluster of its own: `initdb` in --pgdata (default mlruns/postgres,
#                        kept between starts), served on 127.0.0.1:--pg-port (default PORT+1) only, with
#                        trust authentication (local connections only); stopped with the server.
#                        Run as root, the cluster runs as the `postgres` user, who must reach --pgdata.
#   --backend URI        any store MLflow takes, e.g. an existing postgresql://user:pw@host/db
#   --host HOST          the address to listen on (default 127.0.0.1). Anything but loopback needs --auth;
#                        the allowed Host headers and CORS origins then default to that host and port.
#   --auth               MLflow's basic-auth app: every request needs a user and password, with READ, EDIT or
#                        MANAGE per experiment and registered model (scripts/tracking_users.py adds users and
#                        grants). The admin's password comes from --admin-password-file or
#                        MLFLOW_AUTH_ADMIN_PASSWORD, used when the admin is created (and to replace MLflow's
#                        old default one); the documented default `password1234` is refused. Users are kept in
#                        --auth-db (default: a database `mlflow_auth` in the --backend postgres cluster, else
#                        mlruns/auth.db). --default-permission: what users have on what they were not
#                        granted (default READ; NO_PERMISSIONS hides other users' experiments).
#   --tls-cert/--tls-key HTTPS with this certificate and key (PEM); clients trust it through
#                        MLFLOW_TRACKING_SERVER_CERT_PATH when it is not signed by a CA they know.
# then: python train.py tracking=server tracking.uri=http://127.0.0.1:PORT
#       (with --auth: export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...)
# It starts several processes: stop them together, with Ctrl-C here, or `kill -- -PGID` when started
# with `setsid`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
port=5000 backend=sqlite artifacts="$root/mlruns/server-artifacts" pgdata="$root/mlruns/postgres" pg_port=""
host=127.0.0.1 auth=0 password_file="" auth_db="" default_permission=READ
allowed_hosts="" cors_origins="" tls_cert="" tls_key=""
die() { echo "tracking_server.sh: $*" >&2; exit 2; }
while (($#)); do
    case "$1" in
        --auth) auth=1; shift; continue ;;
        --port) port="${2-}" ;;
        --backend) backend="${2-}" ;;
        --artifacts) artifacts="${2-}" ;;
        --pgdata) pgdata="${2-}" ;;
        --pg-port) pg_port="${2-}" ;;
        --host) host="${2-}" ;;
        --admin-password-file) password_file="${2-}" ;;
        --auth-db) auth_db="${2-}" ;;
        --default-permission) default_permission="${2-}" ;;
        --allowed-hosts) allowed_hosts="${2-}" ;;
        --cors-allowed-origins) cors_origins="${2-}" ;;
        --tls-cert) tls_cert="${2-}" ;;
        --tls-key) tls_key="${2-}" ;;
        *) die "unknown argument '$1' (see the usage at the top of $0)" ;;
    esac
    (($# >= 2)) && [[ "$2" != --* ]] || die "'$1' needs a value"
    shift 2
done

# Never open by accident: without --auth anyone who reaches the port may read, change or delete every run.
loopback=0
[[ "$host" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ || "$host" == localhost || "$host" == ::1 ]] && loopback=1
((loopback || auth)) || die "refusing to listen on $host without --auth: anyone who reaches it could read, change or delete every run and model (add --auth, or keep the default 127.0.0.1)"
[[ -z "$tls_cert$tls_key" || ( -n "$tls_cert" && -n "$tls_key" ) ]] || die "--tls-cert and --tls-key go together"
for file in "$tls_cert" "$tls_key"; do
    [[ -z "$file" || -r "$file" ]] || die "cannot read the TLS file $file"
done
scheme=http
[[ -z "$tls_cert" ]] || scheme=https
case "$default_permission" in
    READ|USE|EDIT|MANAGE|NO_PERMISSIONS) ;;
    *) die "--default-permission must be READ, USE, EDIT, MANAGE or NO_PERMISSIONS, not '$default_permission'" ;;
esac
admin_password=""
if ((auth)); then
    if [[ -n "$password_file" ]]; then
        [[ -r "$password_file" ]] || die "cannot read --admin-password-file $password_file"
        IFS= read -r admin_password < "$password_file" || true
        admin_password="${admin_password%$'\r'}"  # a file written on Windows
        [[ -n "$admin_password" ]] || die "--admin-password-file $password_file is empty"
    else
        admin_password="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
    fi
    [[ -n "$admin_password" ]] || die "--auth needs the admin's password: --admin-password-file FILE or MLFLOW_AUTH_ADMIN_PASSWORD"
    [[ "$admin_password" != password1234 ]] || die "refusing MLflow's documented default admin password 'password1234': choose another"
    ((${#admin_password} >= 12)) || die "the admin's password must have 12 characters or more (MLflow's rule)"
    ((loopback)) || [[ -n "$tls_cert" ]] || echo "tracking_server.sh: warning: without --tls-cert, passwords cross the network in the clear (unless a TLS proxy is in front)" >&2
fi
source "$(dirname "$0")/find_mlflow.sh"
find_mlflow "$root"
server_pid="" postgres_pid="" auth_config=""
stop() {  # the server first, then the database it writes to (INT: PostgreSQL's fast shutdown)
    [[ -z "$server_pid" ]] || { kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; }
    [[ -z "$postgres_pid" ]] || { kill -INT "$postgres_pid" 2>/dev/null; wait "$postgres_pid" 2>/dev/null; }
    [[ -z "$auth_config" ]] || rm -f "$auth_config"
}
trap stop EXIT
trap 'exit 143' TERM INT

start_postgres() {
    local bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
    [[ -x "$bin/initdb" ]] || die "PostgreSQL's initdb not found; set PG_BIN"
    "$mlflow_python" -c "import psycopg" 2>/dev/null || die "MLflow reaches PostgreSQL through psycopg: pip install -e '.[server]'"
    pg_port="${pg_port:-$((port + 1))}"
    local as_owner=() database
    mkdir -p "$pgdata"
    if ((EUID == 0)); then  # PostgreSQL refuses to run as root
        chown postgres: "$pgdata" && chmod 700 "$pgdata"
        as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    fi
    if [[ ! -f "$pgdata/PG_VERSION" ]]; then
        "${as_owner[@]}" "$bin/initdb" -D "$pgdata" -U mlflow --auth=trust -E UTF8 >/dev/null
    fi
    # in this process group: whatever stops the server stops the database too. With --auth it has no TCP
    # port, only its socket in --pgdata (mode 700): its trust login must not bypass the server's users.
    local listen=127.0.0.1 at
    ((auth)) && listen=""
    at="${listen:-$pgdata}"
    "${as_owner[@]}" "$bin/postgres" -D "$pgdata" -h "$listen" -p "$pg_port" -k "$pgdata" &
    postgres_pid=$!
    until "$bin/pg_isready" -q -h "$at" -p "$pg_port"; do
        kill -0 $postgres_pid 2>/dev/null || { echo "tracking_server.sh: PostgreSQL did not start" >&2; exit 1; }
        sleep 0.2
    done
    for database in mlflow mlflow_auth; do  # runs, and the users of --auth (each its own schema migrations)
        "$bin/psql" -h "$at" -p "$pg_port" -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$database'" \
            | grep -q 1 || "$bin/createdb" -h "$at" -p "$pg_port" -U mlflow "$database"
    done
    if ((auth)); then
        backend_uri="postgresql+psycopg://mlflow@/mlflow?host=$pgdata&port=$pg_port"
        auth_db="${auth_db:-postgresql+psycopg://mlflow@/mlflow_auth?host=$pgdata&port=$pg_port}"
        echo "tracking_server.sh: PostgreSQL $pgdata on its socket only (port $pg_port)"
    else
        backend_uri="postgresql+psycopg://mlflow@127.0.0.1:$pg_port/mlflow"
        echo "tracking_server.sh: PostgreSQL $pgdata on 127.0.0.1:$pg_port"
    fi
}

case "$backend" in
    sqlite) backend_uri="sqlite:///$root/mlruns/server.db" ;;
    postgres) start_postgres ;;
    *) backend_uri="$backend" ;;
esac

options=(--backend-store-uri "$backend_uri" --artifacts-destination "$artifacts" --serve-artifacts
         --host "$host" --port "$port" --workers 1)
if ((auth)); then
    # The admin's password reaches MLflow through the environment of its process (never its command line,
    # which `ps` shows); the settings file is private to this user and removed on exit.
    auth_config="$(mktemp "${TMPDIR:-/tmp}/mlflow-auth-XXXXXX.ini")"
    chmod 600 "$auth_config"
    cat > "$auth_config" <<INI
[mlflow]
default_permission = $default_permission
database_uri = $(auth_db="${auth_db:-sqlite:///$root/mlruns/auth.db}"; echo "${auth_db//%/%%}")
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH="$auth_config" MLFLOW_AUTH_ADMIN_PASSWORD="$admin_password"
    # signs the sign-up form's CSRF token; one worker, so a key of this start's own is enough
    export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}"
    options+=(--app-name basic-auth)
fi
# A stop does not wait for clients that keep a connection open (MLflow's client keeps them alive).
uvicorn_opts="--timeout-graceful-shutdown 5"
[[ -z "$tls_cert" ]] || uvicorn_opts+=" --ssl-certfile $(printf %q "$tls_cert") --ssl-keyfile $(printf %q "$tls_key")"
options+=(--uvicorn-opts "$uvicorn_opts")
# The Host headers and browser origins accepted (against DNS rebinding and cross-site requests): those of
# the address given, unless set; on a wildcard address, MLflow's own (localhost and private addresses).
if [[ "$host" != 127.0.0.1 && "$host" != localhost && "$host" != 0.0.0.0 && "$host" != :: ]]; then
    named="$host"
    [[ "$host" != *:* ]] || named="[$host]"  # IPv6, as clients write it in their Host header
    allowed_hosts="${allowed_hosts:-$named,$named:$port,localhost,localhost:$port,127.0.0.1,127.0.0.1:$port}"
    cors_origins="${cors_origins:-$scheme://$named:$port}"
fi
[[ -z "$allowed_hosts" ]] || options+=(--allowed-hosts "$allowed_hosts")
[[ -z "$cors_origins" ]] || options+=(--cors-allowed-origins "$cors_origins")
echo "tracking_server.sh: $scheme://$host:$port$( ((auth)) && echo ", users and permissions (basic-auth)")"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
"$mlflow" server "${options[@]}" &
server_pid=$!
wait $server_pid
