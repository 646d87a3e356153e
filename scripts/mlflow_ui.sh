#!/usr/bin/env bash
# Open the MLflow UI on this project's default store (mlruns/), on this machine only.
# Usage: scripts/mlflow_ui.sh [PORT]   then browse http://127.0.0.1:PORT
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/mlflow" ui --backend-store-uri "sqlite:///$root/mlruns/mlflow.db" \
    --host 127.0.0.1 --port "${1:-5000}"
