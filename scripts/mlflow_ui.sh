#!/usr/bin/env bash
# Open the MLflow UI on this project's default store (mlruns/), on this machine only, light:
# one web worker and no background job runner (MLflow's default starts 4 workers and a job runner
# with 7 consumers: 14 processes, 3.1 GB resident, for one person browsing a local store).
# Usage: scripts/mlflow_ui.sh [PORT] [BACKEND_URI]   then browse http://127.0.0.1:PORT
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$(dirname "$0")/find_mlflow.sh"
find_mlflow "$root"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$mlflow" ui --backend-store-uri "${2:-sqlite:///$root/mlruns/mlflow.db}" \
    --host 127.0.0.1 --port "${1:-5000}" --workers 1
