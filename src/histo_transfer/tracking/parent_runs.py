"""A parent MLflow run that groups child runs: a Hydra sweep, a keras-tuner search, a cross-validation.

Children carry MLflow's `mlflow.parentRunId` tag, so the UI folds them under the parent. At the end
the parent gets a summary table and plot, the best child (by the objective) and that child's
differing params, and always ends: FINISHED, KILLED when its process is interrupted (Ctrl-C), or
FAILED when it dies half-way.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from histo_transfer.config.objective import Objective
from histo_transfer.tracking.schema import BEST_CHILD_TAG, BEST_IN_SWEEP_TAG, NOTE_TAG, PARENT_TAG, SUMMARY_DIR

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"  # a resumable parent's id, kept in its sweep's, CV's or search's folder
RESULT_METRICS = ("best_val_loss", "best_val_accuracy", "best_val_auc", "best_epoch", "n_train")


@dataclass
class NewParent:
    """What a parent run is created with, when no recorded one is continued."""

    experiment_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)


class ParentRun:
    def __init__(self, run_id: str, objective: Objective | None):
        self.client = MlflowClient(mlflow.get_tracking_uri())
        self.run_id, self.objective = run_id, objective

    @classmethod
    def open(cls, record: Path, objective: Objective, new: Callable[[], NewParent], *, resume: bool,
             only_this_process: bool = True, on_create: Callable[["ParentRun"], None] | None = None) -> "ParentRun":
        """The one way to get a parent: the run recorded in `record` when `resume` and the store still
        holds it, else a new one (`new()`), recorded there. Under `record_lock`, so jobs of one
        launcher that start together agree on one parent; `on_create` runs inside the lock, before any
        other job can see the new parent (a CV logs its folds there)."""
        with record_lock(record):
            previous = recorded_parent(record) if resume else None
            if previous:
                log.info("continuing parent run %s (recorded in %s)", previous, record)
                return cls.resume(previous, objective, only_this_process)
            spec = new()
            parent = cls.create(spec.experiment_id, spec.name, spec.tags, objective, spec.params, only_this_process)
            record_parent(record, parent)
            if on_create is not None:
                on_create(parent)
            return parent

    @classmethod
    def create(cls, experiment_id: str, name: str, tags: dict[str, str], objective: Objective | None,
               params: dict[str, str] | None = None, only_this_process: bool = True) -> "ParentRun":
        """A new parent. `only_this_process`: no other process adds children, so when this one exits the
        parent must have ended (FAILED if not); False for parents shared by a launcher's jobs."""
        parent = cls(MlflowClient(mlflow.get_tracking_uri()).create_run(
            experiment_id, run_name=name, tags=tags).info.run_id, objective)
        if params:
            parent.client.log_batch(parent.run_id, params=[Param(k, v) for k, v in params.items()])
        if only_this_process:
            atexit.register(parent.end_if_running)  # a process that dies half-way must not leave it RUNNING
        log.info("MLflow parent run %s (%s)", parent.run_id, name)
        return parent

    @classmethod
    def resume(cls, run_id: str, objective: Objective, only_this_process: bool = True) -> "ParentRun":
        """Continue a parent. When only this process adds children, those left RUNNING died with the
        interrupted process, and end KILLED."""
        parent = cls(run_id, objective)
        if only_this_process:
            for child in parent.children():
                if child.info.status == "RUNNING":
                    parent.client.set_terminated(child.info.run_id, "KILLED")
            atexit.register(parent.end_if_running)
        parent.client.update_run(run_id, status="RUNNING")
        return parent

    @property
    def child_tags(self) -> dict[str, str]:
        return {PARENT_TAG: self.run_id}

    def children(self) -> list:
        return child_runs(self.client, self.client.get_run(self.run_id))

    def summarise(self, name: str = "summary") -> str | None:
        """Summary table and plot (`summary/<name>.csv|png`), best-child marks; returns the best child's id."""
        children = self.children()
        table = summary_table(children, self.objective)
        if table.empty or not table["best"].any():
            log.warning("parent run %s has no finished child to summarise", self.run_id)
            return None
        best = table.iloc[0]
        self.client.set_tag(best["run_id"], BEST_IN_SWEEP_TAG, "true")
        self.client.set_tag(self.run_id, BEST_CHILD_TAG, best["run_id"])
        self.client.log_metric(self.run_id, self.objective.best_metric, float(best[self.objective.best_metric]))
        self.client.log_metric(self.run_id, "n_jobs", len(children))
        for key in varying_params(children):  # tags, not params: a resumed parent may find a new best
            self.client.set_tag(self.run_id, f"best.{key}", str(best[key]))
        self.client.set_tag(self.run_id, NOTE_TAG, describe(table, self.objective))
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / f"{name}.csv", index=False)
            plot_summary(table, Path(tmp) / f"{name}.png")
            if "data.frac" in table.columns and table["n_train"].notna().sum() > 1:
                plot_learning_curve(table, self.objective, Path(tmp) / "learning_curve.png")
            self.client.log_artifacts(self.run_id, tmp, SUMMARY_DIR)
        log.info("parent run %s: best %s %.4f by %s", self.run_id, self.objective.metric,
                 best[self.objective.best_metric], best["job"])
        return str(best["run_id"])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
        atexit.unregister(self.end_if_running)  # ended: nothing left for exit to do (its store may be gone by then)

    def end_if_running(self) -> None:
        """At exit, a parent still RUNNING lost its process half-way: KILLED when that was Ctrl-C (its
        latest child ended KILLED, as an interrupted training run does), else FAILED."""
        if self.client.get_run(self.run_id).info.status == "RUNNING":
            children = self.children()
            self.end("KILLED" if children and children[-1].info.status == "KILLED" else "FAILED")


@contextlib.contextmanager
def record_lock(record: Path):
    """An exclusive lock on a parent's record (one per sweep command, CV or search), across processes."""
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def recorded_parent(record: Path) -> str | None:
    """The parent run id kept in `record`, when there is one and the tracking store still holds that
    run (a record may outlive the store it was written for)."""
    from mlflow.exceptions import MlflowException

    if not record.exists():
        return None
    run_id = record.read_text().strip()
    try:
        MlflowClient(mlflow.get_tracking_uri()).get_run(run_id)
    except MlflowException:
        log.warning("%s names run %s, which %s does not hold: starting a new parent", record, run_id,
                    mlflow.get_tracking_uri())
        return None
    return run_id


def record_parent(record: Path, parent: ParentRun) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(parent.run_id)


def child_runs(client: MlflowClient, parent, where: str = "") -> list:
    """The runs nested under `parent` (an MLflow run), oldest first; `where` narrows them further
    (MLflow filter syntax, e.g. schema.kind_filter(RunKind.CV))."""
    condition = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'" + (f" and {where}" if where else "")
    return client.search_runs([parent.info.experiment_id], filter_string=condition, max_results=10_000,
                              order_by=["attributes.start_time ASC"])


def varying_params(runs) -> list[str]:
    """Config keys whose values differ between the runs: what the parent explored."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def summary_table(runs, objective: Objective):
    """One row per child: what it varied, its best-epoch validation metrics; best by the objective first."""
    import pandas as pd

    varying = varying_params(runs)
    metrics = list(dict.fromkeys([*RESULT_METRICS, objective.best_metric]))
    rows = []
    for run in runs:
        row = {"job": ", ".join(f"{k}={run.data.params.get(k)}" for k in varying) or run.info.run_name,
               "run_id": run.info.run_id, "status": run.info.status}
        row.update({k: run.data.params.get(k) for k in varying})
        row.update({m: run.data.metrics.get(m) for m in metrics})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    finished = (table["status"] == "FINISHED") & table[objective.best_metric].notna()
    table = table.assign(_finished=finished).sort_values(
        ["_finished", objective.best_metric], ascending=[False, objective.mode == "min"], na_position="last",
        kind="stable").drop(columns="_finished").reset_index(drop=True)
    table["best"] = False
    table.loc[0, "best"] = bool(finished.any())
    return table


def describe(table, objective: Objective) -> str:
    """The parent's description in the UI: the best child, then every child's result (markdown)."""
    import pandas as pd

    best = table.iloc[0]
    lines = [f"{len(table)} runs. Best by {objective.metric}: **{best[objective.best_metric]:.4f}**, "
             f"{best['job']} (run `{best['run_id']}`).", "",
             "| run | status | val AUC | val loss | val accuracy | best epoch |", "| --- | --- | --- | --- | --- | --- |"]
    for _, row in table.iterrows():
        cells = [f"{row[m]:.4f}" if pd.notna(row[m]) else "-" for m in ("best_val_auc", "best_val_loss",
                                                                          "best_val_accuracy")]
        epoch = int(row["best_epoch"]) if pd.notna(row["best_epoch"]) else "-"
        lines.append(f"| {'**' if row['best'] else ''}{row['job']}{'**' if row['best'] else ''} | {row['status']} | "
                     f"{' | '.join(cells)} | {epoch} |")
    return "\n".join(lines)


def plot_summary(table, path: Path) -> None:
    """Grouped bars of validation loss, accuracy and AUC per child."""
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
    ax.set(title="Validation metrics per job (* best)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_learning_curve(table, objective: Objective, path: Path) -> None:
    """The objective against the number of training patches (log x): a sweep over data.frac."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = table[table["status"] == "FINISHED"].dropna(subset=["n_train", objective.best_metric])
    points = points.sort_values("n_train")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(points["n_train"], points[objective.best_metric], marker="o")
    for _, row in points.iterrows():
        ax.annotate(f"{row[objective.best_metric]:.3f}", (row["n_train"], row[objective.best_metric]),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="training patches (log scale)", ylabel=f"{objective.metric} (best epoch)",
           title="Learning curve")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
