"""Everything MLflow: the store, run lifecycle, params, per-epoch metrics and artifacts."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
import traceback
import warnings
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from histo_transfer.config.errors import Terminated, TrainingInterrupted, UserError
from histo_transfer.tracking import access
from histo_transfer.tracking.outbox import QUEUE, Outbox, Unsent, few_retries, store_answers
from histo_transfer.tracking.redaction import redact_uri
from histo_transfer.tracking.schema import ERROR_ARTIFACT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

log = logging.getLogger(__name__)


def setup(tracking_cfg, write: bool = True) -> str:
    """Point MLflow at the configured store and return the experiment's id, creating it if needed;
    sets system-metrics sampling for the runs to come. A server is asked first whether it is reachable,
    trusted, knows us and (unless `write` is False: a task that only reads) lets us record runs."""
    uri = tracking_cfg.uri
    user = None
    if uri.startswith(("http://", "https://")):
        access.refuse_credentials_in_uri(uri)
        access.check_server(uri)
        user = access.current_user(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_system_metrics_sampling_interval(tracking_cfg.get("system_metrics_interval", 10))
    name = tracking_cfg.experiment
    try:
        experiment = mlflow.get_experiment_by_name(name)
    except MlflowException as exc:
        if exc.get_http_status_code() != 403:  # PERMISSION_DENIED: DENY on it, or no grant under --default-permission NO_PERMISSIONS
            raise
        raise UserError(f"user '{user['username'] if user else '?'}' may not see experiment '{name}' of "
                        f"{redact_uri(uri)}: ask an admin for EDIT on it, or use another (tracking.experiment=...)") from None
    if experiment is None:  # its creator may manage it
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location(uri), tags=EXPERIMENT_KIND)
        except MlflowException:  # created meanwhile by a parallel job
            experiment = mlflow.get_experiment_by_name(name)
    if not write:
        return experiment.experiment_id
    access.require_write_access(uri, user, experiment.experiment_id, name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version of this project
        mlflow.tracking.MlflowClient().set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return experiment.experiment_id


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (mlruns/artifacts); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "artifacts").resolve().as_uri()




MAX_RUN_NAME = 250  # MLflow's column width (PostgreSQL and MySQL enforce it; SQLite does not)


def run_name_from_overrides(overrides: list[str], prefix: str = "") -> str:
    """`backbone=resnet152v2,data.frac=0.3` for a run started with those overrides; `default` for none;
    after `prefix` (e.g. "sweep "), all within MLflow's MAX_RUN_NAME. Where things go (tracking.*,
    paths.*, hydra.*) does not name a run."""
    chosen = [o for o in overrides if not o.lstrip("+~").startswith(("tracking.", "paths.", "hydra"))]
    name = prefix + (redact_uri(",".join(chosen)) or "default")
    return name if len(name) <= MAX_RUN_NAME else name[:MAX_RUN_NAME - 3] + "..."


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """Every resolved config value under its dotted key."""
    params: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            params[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {key: redact_uri(value) for key, value in params.items()}


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, credentials in URIs removed."""
    return redact_uri(OmegaConf.to_yaml(cfg, resolve=True))


def git_commit(folder: Path) -> str:
    """HEAD of the repository holding `folder`, with `-dirty` when tracked files changed; `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@contextlib.contextmanager
def tracked_run(experiment_id: str, run_name: str | None, tags: dict[str, str], run_id: str | None = None,
                nested: bool = False, system_metrics: bool = False):
    """An MLflow run that always ends: FINISHED, FAILED (with the error as tag and artifact) or KILLED.

    With `run_id`, an existing run is continued (a resumed search); `nested` opens a child of the active run;
    `system_metrics` samples CPU, memory, disk, network (and GPU) into it.
    """
    run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, tags=tags, nested=nested,
                           log_system_metrics=system_metrics)
    log.info("MLflow run %s (%s) in %s", run.info.run_id, run.info.run_name, redact_uri(mlflow.get_tracking_uri()))
    try:
        yield run
    except (KeyboardInterrupt, TrainingInterrupted) as exc:  # the latter: a nested run was interrupted
        terminated = isinstance(exc, Terminated) or getattr(exc, "exit_code", None) == Terminated.exit_code
        mlflow.set_tag("error", "interrupted (SIGTERM)" if terminated else "interrupted (KeyboardInterrupt)")
        mlflow.end_run("KILLED")
        raise
    except Unsent:  # its status goes to the server with the rest (scripts/sync_run.py)
        end_run_locally()
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", redact_uri(f"{type(exc).__name__}: {exc}")[:5000])
            mlflow.log_text(redact_uri("".join(traceback.format_exception(exc))), ERROR_ARTIFACT)
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def end_run_locally() -> None:
    """Take the active run off this process's stack while its server is away (the run stays RUNNING
    there until scripts/sync_run.py ends it): end_run pops the run before it calls the server."""
    with few_retries(0, timeout_s=5), contextlib.suppress(Exception):
        mlflow.end_run("RUNNING")


def ended_unsent(run_id: str, output_dir: str | Path) -> bool:
    """The run ended here, its last records waiting for scripts/sync_run.py (the server stayed away)."""
    queue = Path(output_dir) / "unsent" / run_id / QUEUE
    return queue.is_file() and Outbox.load(queue.parent).status is not None


def run_outbox(run_id: str, output_dir: str | Path) -> Outbox:
    """The outbox of a training run: <output_dir>/unsent/<run id> while anything waits there. A resumed
    run takes over what its interrupted attempt still had queued."""
    folder = Path(output_dir) / "unsent" / run_id
    if (folder / QUEUE).is_file():
        outbox = Outbox.load(folder)
        outbox.uri = mlflow.get_tracking_uri()
        outbox.flush()
        return outbox
    shutil.rmtree(folder, ignore_errors=True)  # staging files of an interrupted attempt, nothing queued
    return Outbox(folder, run_id, mlflow.get_tracking_uri())


def epoch_metrics_callback(names: tuple[str, ...], images_per_epoch: int | None = None, log_metrics=None):
    """A Keras callback logging `names`, the learning rate and the epoch's timing at step = epoch number
    (1-based): `time/epoch_s` (training and validation) and `throughput/train_images_per_s` (training
    steps only), so the UI shows whether a run is input- or compute-bound. `log_metrics(metrics, step)`
    sends them (an Outbox's; default mlflow.log_metrics)."""
    log_metrics = log_metrics or mlflow.log_metrics
    import time

    import keras  # here, not at module level: EDA and data scripts use this module without TensorFlow

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started, self.trained = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            if getattr(self, "trained", 0) is None:  # the first validation of this epoch
                self.trained = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs, now = logs or {}, time.perf_counter()
            metrics = {name: float(logs[name]) for name in names if name in logs}
            metrics["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            metrics["time/epoch_s"] = now - self.started
            if images_per_epoch:
                metrics["throughput/train_images_per_s"] = images_per_epoch / ((self.trained or now) - self.started)
            log_metrics(metrics, step=epoch + 1)

    return EpochMetrics()


def log_dataset(ids, labels, root: Path, name: str, digest: str, context: str) -> None:
    """What a run trained, validated or scored on, as an MLflow dataset input: `id,label` rows."""
    import pandas as pd

    frame = pd.DataFrame({"id": [str(i) for i in ids], "label": [int(v) for v in labels]})
    with warnings.catch_warnings():  # a record of the data, not a model signature: integer labels are right
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(frame, source=str(root), name=name, digest=digest, targets="label")
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            # parallel jobs create the same dataset at once: the loser's insert fails (SQLite: "UNIQUE
            # constraint failed", PostgreSQL: "duplicate key ... unique constraint"), a retry reuses it
            message = str(exc).lower()
            if "unique constraint" not in message or "dataset" not in message or attempt == 2:
                raise


def backfill_epochs(run_id: str, history: list[dict[str, float]], names: tuple[str, ...]) -> None:
    """Log the epochs of `history` that the run lacks (an interruption between checkpoint and logging)."""
    client = mlflow.tracking.MlflowClient()
    logged = {metric.step for metric in client.get_metric_history(run_id, names[0])}
    for step, logs in enumerate(history, start=1):
        if step not in logged:
            mlflow.log_metrics({k: v for k, v in logs.items() if k in names or k == "lr"}, step=step)


def log_keras_model(model, example, folder: Path) -> None:
    """`model` into the active run (model/model.keras, its summary, a servable MLflow model), staged in `folder`."""
    outbox = Outbox(folder, mlflow.active_run().info.run_id, mlflow.get_tracking_uri())
    outbox.keras_model(model, example)
    if not outbox.close(wait_s=0):
        raise MlflowException(f"the tracking server {redact_uri(outbox.uri)} went away while the model was sent")


def sync_run(folder: Path, uri: str | None = None, wait_s: float = 0) -> str:
    """Send what a run left in `folder` (to `uri`, default the store it was recorded in), then end the
    run with its status; returns the run id. scripts/sync_run.py."""
    folder = Path(folder)
    if not (folder / QUEUE).is_file():
        raise UserError(f"{folder}: no {QUEUE} here; pass the folder a run named (<output_dir>/unsent/<run id>)")
    outbox = Outbox.load(folder)
    if uri:
        outbox.uri = uri
    elif "***" in outbox.uri:
        raise UserError(f"{folder}: the store's address was saved without its credentials; pass --tracking-uri")
    deadline = time.monotonic() + wait_s
    while not store_answers(outbox.uri):
        if time.monotonic() >= deadline:
            raise UserError(f"the tracking server {redact_uri(outbox.uri)} does not answer; {len(outbox.pending)} "
                            f"record(s) stay in {folder}: run this again later (or with --wait SECONDS)")
        time.sleep(2)
    if outbox.uri.startswith(("http://", "https://")):  # trusted, and it knows us (credentials from the environment)
        access.check_server(outbox.uri)
        access.current_user(outbox.uri)
    mlflow.set_tracking_uri(outbox.uri)
    mlflow.start_run(run_id=outbox.run_id)  # the logged model attaches to the active run
    if not outbox.flush():
        end_run_locally()
        raise UserError(f"the tracking server {redact_uri(outbox.uri)} went away again; {len(outbox.pending)} "
                        f"record(s) stay in {folder}: run this again later")
    mlflow.end_run(outbox.status or "FINISHED")
    outbox.close(0)  # removes the folder
    return outbox.run_id
