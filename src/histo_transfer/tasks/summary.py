"""The screen a finished task ends with: what the run found, where it is, and the command that opens
it in the MLflow UI."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import KIND_TAG, WEIGHTS_SOURCE_TAG, RunKind

UI_PORT = 5000  # scripts/mlflow_ui.sh's default


def run_summary(run_id: str, uri: str, project_root: Path, metric: str = "val_auc") -> str:
    """One screen about run `run_id` of the store `uri`: status and wall time, the objective's best
    value (or a CV's out-of-fold AUC), the data and weights, and how to open it in the UI."""
    run = MlflowClient(uri).get_run(run_id)
    info, metrics, tags, params = run.info, run.data.metrics, run.data.tags, run.data.params
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time else None
    kind = tags.get(KIND_TAG, "training run")
    lines = [f"{kind} {info.run_name!r} ({run_id}): {info.status}"
             + (f" in {_duration(seconds)}" if seconds is not None else "")]
    if kind == RunKind.CV and "oof_auc" in metrics:
        lines.append(f"  out-of-fold AUC {metrics['oof_auc']:.4f} (95 % CI {metrics.get('oof_auc_ci_low', 0):.4f}-"
                     f"{metrics.get('oof_auc_ci_high', 0):.4f}); folds {metrics.get('cv_auc_mean', 0):.4f} "
                     f"+- {metrics.get('cv_auc_std', 0):.4f}")
    elif f"best_{metric}" in metrics:
        epoch = metrics.get("best_epoch")
        others = ", ".join(f"{name.removeprefix('best_')} {value:.4f}" for name, value in sorted(metrics.items())
                           if name.startswith("best_val_") and name != f"best_{metric}")
        lines.append(f"  best {metric} {metrics[f'best_{metric}']:.4f}"
                     + (f" at epoch {int(epoch)} of {params.get('trainer.epochs', '?')}" if epoch is not None else "")
                     + (f" ({others})" if others else ""))
    if "n_train" in metrics:
        lines.append(f"  data: {int(metrics['n_train']):,} training and {int(metrics.get('n_val', 0)):,} validation "
                     f"patches" + (f"; weights: {tags[WEIGHTS_SOURCE_TAG]}" if WEIGHTS_SOURCE_TAG in tags else ""))
    lines.append(f"  recorded in {redact_uri(uri)} (experiment {info.experiment_id})")
    lines += ["  open it in the MLflow UI:", *("    " + line for line in ui_commands(uri, info.experiment_id, run_id,
                                                                                      project_root))]
    return "\n".join(lines)


def ui_commands(uri: str, experiment_id: str, run_id: str, project_root: Path) -> list[str]:
    """What to type to see the run: the UI script on a local store, the server's page otherwise."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return [f"{redact_uri(uri).rstrip('/')}/{page}"]
    default = f"sqlite:///{project_root}/mlruns/mlflow.db"
    script = "scripts/mlflow_ui.sh" + ("" if uri == default else f" {UI_PORT} '{redact_uri(uri)}'")
    return [script, f"then browse http://127.0.0.1:{UI_PORT}/{page}"]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
