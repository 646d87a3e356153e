# Sourced by the scripts that start MLflow: sets `mlflow` to the MLflow of the environment in use.
# The active environment first (a venv or conda env that is activated, or whatever puts `mlflow` on
# PATH: pipx, a venv elsewhere), then this checkout's own .venv (README's set-up, used without
# activating it). Python's psycopg check uses the same environment (`mlflow_python`).
find_mlflow() {
    local root="$1" candidate
    for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/mlflow}" "${CONDA_PREFIX:+$CONDA_PREFIX/bin/mlflow}" \
                     "$(command -v mlflow 2>/dev/null || true)" "$root/.venv/bin/mlflow"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            mlflow="$candidate"
            mlflow_python="$(dirname "$candidate")/python"
            [[ -x "$mlflow_python" ]] || mlflow_python=python3
            return 0
        fi
    done
    echo "$(basename "$0"): no mlflow found: activate the environment you installed this project into" \
         "(pip install -e '.[cpu,dev]'), or create $root/.venv as README's set-up does" >&2
    exit 2
}
