#!/usr/bin/env bash
# An MLflow tracking server for one machine: SQLite backend, artifacts proxied into mlruns/,
# bound to 127.0.0.1 (HOST=0.0.0.0 to serve a network you trust), background job execution off.
# Usage: scripts/tracking_server.sh [PORT] [BACKEND_URI] [ARTIFACTS_DIR]
#   then: python train.py tracking=server tracking.uri=http://127.0.0.1:PORT
# It starts several worker processes: stop them together, e.g. with Ctrl-C here, or
# `kill -- -PGID` when started with `setsid`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
port="${1:-5000}"
backend="${2:-sqlite:///$root/mlruns/server.db}"
artifacts="${3:-$root/mlruns/server-artifacts}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$root/.venv/bin/mlflow" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
    --serve-artifacts --host "${HOST:-127.0.0.1}" --port "$port" --workers 1
