"""One MLflow parent run per Hydra multirun, its jobs nested under it, and a summary at the end.

Registered as a Hydra callback (conf/config.yaml, hydra.callbacks). The parent's id reaches the
jobs through the environment, which launchers hand to the processes they start (joblib, SLURM).
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "HISTO_TRANSFER_PARENT_RUN_ID"
SUMMARY_METRICS = ("best_val_loss", "best_val_accuracy", "best_val_auc", "best_epoch")


def parent_run_id() -> str | None:
    """The sweep's parent run, when this process runs a job of a multirun."""
    return os.environ.get(PARENT_RUN_ENV)


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from histo_transfer import tracking

        experiment_id = tracking.setup(config.tracking)
        overrides = list(config.hydra.overrides.task)
        searched = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
        self.client = MlflowClient(config.tracking.uri)
        name = config.tracking.run_name or "sweep " + (tracking.run_name_from_overrides(overrides + [
            f"{k}={v}" for k, v in searched.items()]))
        run = self.client.create_run(experiment_id, run_name=name, tags={
            "kind": "sweep",
            "sweep_overrides": tracking.redact_uri(" ".join(overrides)) or "(none)",
            "sweep_search_space": " ".join(f"{k}={v}" for k, v in searched.items()) or "(grid)",
            "sweep_dir": str(config.hydra.sweep.dir),
            "sweeper": str(config.hydra.sweeper.get("_target_", "")),
            "launcher": str(config.hydra.launcher.get("_target_", "")),
            "mlflow.source.git.commit": tracking.git_commit(Path(config.paths.root_dir)),
        })
        self.run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        atexit.register(self._end_if_running)  # a sweep that dies half-way must not stay RUNNING
        log.info("MLflow sweep run %s (%s)", self.run_id, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            best_run_id = self._summarise()
            if best_run_id and config.tracking.get("register_best"):
                from histo_transfer.registry import register

                version = register(best_run_id, config.tracking.register_best, "champion")
                self.client.set_tag(self.run_id, "registered_model", f"models:/{config.tracking.register_best}/{version}")
        except Exception:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        self.client.set_terminated(self.run_id, "FINISHED")
        os.environ.pop(PARENT_RUN_ENV, None)

    def _end_if_running(self) -> None:
        if self.run_id and self.client.get_run(self.run_id).info.status == "RUNNING":
            self.client.set_terminated(self.run_id, "FAILED")

    def _summarise(self) -> str | None:
        """Summary table, plot and best-job marks on the parent; returns the best job's run id."""
        parent = self.client.get_run(self.run_id)
        children = self.client.search_runs([parent.info.experiment_id],
                                           filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
                                           max_results=10_000)
        table = summary_table(children)
        if table.empty or not table["best"].any():
            log.warning("sweep %s has no finished job to summarise", self.run_id)
            return None
        best = table.iloc[0]
        self.client.set_tag(best["run_id"], "best_in_sweep", "true")
        self.client.set_tag(self.run_id, "best_child_run_id", best["run_id"])
        self.client.log_metric(self.run_id, "best_val_auc", float(best["best_val_auc"]))
        self.client.log_metric(self.run_id, "n_jobs", len(children))
        for key in varying_params(children):
            self.client.log_param(self.run_id, f"best.{key}", best[key])
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "sweep_summary.csv", index=False)
            plot_summary(table, Path(tmp) / "sweep_summary.png")
            self.client.log_artifacts(self.run_id, tmp, "summary")
        log.info("sweep %s: best val AUC %.4f by %s", self.run_id, best["best_val_auc"], best["job"])
        return str(best["run_id"])


def varying_params(runs) -> list[str]:
    """Config keys whose values differ between the jobs: what the sweep explored."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def summary_table(runs):
    """One row per job: what it varied, its best-epoch validation metrics; best val AUC first."""
    import pandas as pd

    varying = varying_params(runs)
    rows = []
    for run in runs:
        row = {"job": ", ".join(f"{k}={run.data.params.get(k)}" for k in varying) or run.info.run_name,
               "run_id": run.info.run_id, "status": run.info.status}
        row.update({k: run.data.params.get(k) for k in varying})
        row.update({m: run.data.metrics.get(m) for m in SUMMARY_METRICS})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["best"] = False
    finished = table[(table["status"] == "FINISHED") & table["best_val_auc"].notna()]
    table = table.sort_values("best_val_auc", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    if not finished.empty:
        table.loc[0, "best"] = True
    return table


def plot_summary(table, path: Path) -> None:
    """Grouped bars of validation loss, accuracy and AUC per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ["best_val_loss", "best_val_accuracy", "best_val_auc"]
    positions = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(table)), 4.5))
    for offset, metric in zip((-0.27, 0, 0.27), metrics):
        values = table[metric].astype(float).fillna(0)
        bars = ax.bar(positions + offset, values, width=0.27, label=metric.removeprefix("best_"))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(positions, [f"{'* ' if b else ''}{j}" for j, b in zip(table["job"], table["best"])],
                  rotation=20, ha="right", fontsize=8)
    ax.set(title="Sweep: validation metrics per job (* best val AUC)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
