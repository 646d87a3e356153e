"""One tracked training run: a validated config -> data -> training session -> evaluation, in one MLflow run.

A run is three steps, each its own function: start (what the run records before training, or the
state of an interrupted run), fit (the session, with checkpoints and per-epoch metrics) and finish
(the model, its evaluation and the run's description).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from histo_transfer.config.context import RunContext
from histo_transfer.config.errors import DiskFull, Terminated, TrainingInterrupted
from histo_transfer.config.identity import run_key
from histo_transfer.config.objective import EPOCH_METRICS, Objective
from histo_transfer.data.augment import plot_examples
from histo_transfer.data.cache import Rows
from histo_transfer.data.loading import TrainingData, load_training_data
from histo_transfer.evaluation.gradcam import grad_cam
from histo_transfer.evaluation.report import plot_training_curves, write_report
from histo_transfer.tracking import remote_checkpoints
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.outbox import Outbox, Unsent
from histo_transfer.tracking.parent_runs import child_runs
from histo_transfer.tracking.schema import (
    BACKBONE_TAG,
    BAD_IMAGES_ARTIFACT,
    CHECKPOINTS_DIR,
    CONFIG_ARTIFACT,
    CONFIG_TAG,
    DATA_ROOT_TAG,
    DISTILL_TEACHER_TAGS,
    DATA_TAG,
    DATASET_FINGERPRINT_TAG,
    EVALUATION_DIR,
    GIT_COMMIT_TAG,
    NOTE_TAG,
    OVERRIDES_ARTIFACT,
    PARENT_TAG,
    PLOTS_DIR,
    PROFILE_DIR,
    UNLISTED_FILES_ARTIFACT,
    WEIGHTS_DIGEST_TAG,
    WEIGHTS_SOURCE_TAG,
)
from histo_transfer.training.checkpoints import Checkpoints, EpochCheckpoint, Progress, ResumeState
from histo_transfer.training.distribution import make_strategy
from histo_transfer.training.session import (
    BestEpoch,
    FitResult,
    TrainingSession,
    WeightAveraging,
    configure_precision,
)
from histo_transfer.workflows.pseudo_labels import pseudo_labelled
from histo_transfer.workflows.teachers import teacher_probabilities

log = logging.getLogger(__name__)


def train_once(cfg: DictConfig, context: RunContext) -> float:
    """One training run (train.py, or one job of a sweep); returns the objective's best value. A resumed
    sweep keeps a job whose config already finished under it instead of training it again."""
    if cfg.trainer.resume and context.parent_run_id:
        kept = finished_in_parent(cfg, context.parent_run_id)
        if kept is not None:
            return kept
    return run_training(cfg, context, parent_run_id=context.parent_run_id).objective_value


def finished_in_parent(cfg: DictConfig, parent_run_id: str) -> float | None:
    """The objective value of a run of this very config that already FINISHED under the parent; None
    when there is none."""
    tracking.setup(cfg.tracking)
    client = mlflow.tracking.MlflowClient()
    finished = child_runs(client, client.get_run(parent_run_id),
                          f"tags.{CONFIG_TAG} = '{run_key(cfg)}' and attributes.status = 'FINISHED'")
    if not finished:
        return None
    log.info("run %s of this config finished in %s: kept", finished[0].info.run_id, parent_run_id)
    return finished[0].data.metrics[Objective.from_config(cfg.objective).best_metric]


@dataclass
class Fold:
    """Train on every patch of the CV pool outside fold `number`, validate on the fold."""

    number: int
    of_patch: np.ndarray  # the fold of each packed patch; -1 outside the CV pool


@dataclass
class TrainingOutcome:
    run_id: str
    objective_value: float  # at the best epoch


def run_training(cfg: DictConfig, context: RunContext, *, parent_run_id: str | None = None, fold: Fold | None = None,
                 tags: dict[str, str] | None = None, run_name: str | None = None,
                 nested: bool = False) -> TrainingOutcome:
    """One complete training run in its own MLflow run (resumed from its checkpoint with trainer.resume)."""
    experiment_id = tracking.setup(cfg.tracking)
    checkpoints = Checkpoints(cfg.trainer.checkpoint_dir, run_key(cfg))
    uploads = remote_checkpoints.uploads_wanted(cfg.tracking.upload_checkpoints, cfg.tracking.uri)
    resumed = checkpoints.latest() if cfg.trainer.resume else None
    if cfg.trainer.resume and uploads:  # the server's copy, where it is later than this machine's
        resumed = remote_checkpoints.resume_state(experiment_id, run_key(cfg), checkpoints, resumed,
                                                  ended=lambda run_id: tracking.ended_unsent(run_id, cfg.paths.output_dir))
    if cfg.trainer.resume and resumed is None:
        log.warning("trainer.resume=true, but %s holds no intact state of this config%s: starting a new run",
                    checkpoints.folder, " (nor does the tracking server)" if uploads else "")
    if resumed is None:
        checkpoints.clear()  # a fresh start: stale state of the same config would only mislead a later resume
    run_tags = {
        GIT_COMMIT_TAG: tracking.git_commit(Path(cfg.paths.root_dir)),
        BACKBONE_TAG: cfg.backbone.name,
        DATA_TAG: cfg.data.name,
        CONFIG_TAG: run_key(cfg),
        **{str(k): str(v) for k, v in cfg.tracking.tags.items()},
        **(tags or {}),
    }
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id  # nests this run under its sweep or CV in the UI
    run_name = run_name or cfg.tracking.run_name or tracking.run_name_from_overrides(list(context.overrides))
    outbox = None
    try:
        with tracking.tracked_run(experiment_id, run_name, run_tags, nested=nested,
                                  run_id=resumed.progress.run_id if resumed else None,
                                  system_metrics=cfg.tracking.system_metrics) as run:
            outbox = tracking.run_outbox(run.info.run_id, cfg.paths.output_dir)
            mirror = remote_checkpoints.CheckpointUploads(outbox) if uploads else None
            best = _run(cfg, context, run.info.run_id, checkpoints, resumed, fold, outbox, mirror)
            if uploads:  # finished: nothing left to resume (sent with the rest, or by sync_run.py)
                outbox.delete_artifacts(CHECKPOINTS_DIR)
            if not outbox.close(wait_s=cfg.tracking.outage_limit_s):
                outbox.keep("FINISHED")
                raise Unsent(outbox.folder)
    except (OSError, DiskFull) as exc:  # a full disk: one line naming where (the run has ended FAILED)
        if isinstance(exc, OSError) and not DiskFull.caused(exc):
            raise
        # an error without a file name (a write to an open file) names the folder runs write to
        where = str(exc) if isinstance(exc, DiskFull) else f"{exc.filename or cfg.paths.output_dir}: no space left on the device"
        resumable = f". Once there is space, resume with: {context.resume_command()}" if checkpoints.latest() else ""
        raise DiskFull(where + resumable) from None
    except KeyboardInterrupt as interruption:
        raise TrainingInterrupted("the run ended KILLED, its last completed epoch is saved; resume with: "
                                  + context.resume_command(), isinstance(interruption, Terminated)) from None
    except Unsent as unsent:
        log.warning("training finished, but the tracking server stayed away past tracking.outage_limit_s "
                    "(%s s): run %s stays RUNNING there; its model and remaining metrics are kept in %s. "
                    "Upload them with: %s", cfg.tracking.outage_limit_s, run.info.run_id, unsent.folder,
                    unsent.upload_hint())
    finally:
        if outbox is not None:
            outbox.discard_if_empty()  # an interrupted or failed run's staging files, when nothing waits
    checkpoints.clear()  # finished: nothing left to resume
    return TrainingOutcome(run.info.run_id, best)


def _run(cfg: DictConfig, context: RunContext, run_id: str, checkpoints: Checkpoints, resumed: ResumeState | None,
         fold: Fold | None, outbox: Outbox, mirror: remote_checkpoints.CheckpointUploads | None) -> float:
    """The body of a training run, inside its MLflow run; `resumed` is the state of an interrupted one.
    Once training starts, every record goes through `outbox`, so a tracking server that goes away
    never stops it; so does each epoch's state when `mirror` is given."""
    strategy = make_strategy(cfg.trainer)  # first: multi-worker and CPU splitting must precede other TF work
    started = _start(cfg, context, run_id, resumed, fold, outbox, strategy)
    with strategy.scope():
        built = _build(started, resumed)
    result = _fit(cfg, started, built, checkpoints, outbox, mirror)
    return _finish(cfg, started, built, result, outbox)


@dataclass
class _Started:
    """What a run knows once its record is opened and its data loaded."""

    run_id: str
    session: TrainingSession
    progress: Progress
    resumed: bool
    clock: float  # perf_counter at the start (or the resume)


@dataclass
class _Built:
    model: keras.Model
    callbacks: list
    best: BestEpoch
    weights_source: str | None
    averaging: WeightAveraging | None  # trainer.swa

def _start(cfg: DictConfig, context: RunContext, run_id: str, resumed: ResumeState | None, fold: Fold | None,
           outbox: Outbox, strategy) -> _Started:
    """Params, config and data of a new run; or the progress of an interrupted one, its missing epochs
    logged. Then the seeds, the precision policy and the data (this fold's split for a CV)."""
    if resumed is None:
        mlflow.log_params(tracking.flat_params(cfg))
        mlflow.log_text(tracking.config_yaml(cfg), CONFIG_ARTIFACT)
        mlflow.log_text(tracking.redact_uri(OmegaConf.to_yaml(list(context.overrides))), OVERRIDES_ARTIFACT)
        progress = Progress(run_id=run_id, epoch=0)
    else:
        progress = resumed.progress
        log.info("resuming run %s after epoch %d of %d", run_id, progress.epoch, cfg.trainer.epochs)
        tracking.backfill_epochs(run_id, progress.history, EPOCH_METRICS)
    mlflow.set_tags({"precision_policy": configure_precision(cfg.trainer.mixed_precision),
                     "replicas": str(strategy.num_replicas_in_sync)})
    keras.utils.set_random_seed(cfg.trainer.seed + progress.epoch)
    clock = time.perf_counter()
    data = load_training_data(cfg.data)
    if fold is not None:
        data = dataclasses.replace(data, train_indices=np.flatnonzero((fold.of_patch >= 0) & (fold.of_patch != fold.number)),
                                   val_indices=np.flatnonzero(fold.of_patch == fold.number))
    _log_data(data, cfg.data.name, outbox)
    teacher = None
    if cfg.distill.teacher is not None:
        teacher = teacher_probabilities(cfg.distill, data.patches, "distill.teacher", needed=data.train_indices)
        outbox.tags(teacher.tags(cfg.distill, DISTILL_TEACHER_TAGS))
    pseudo = pseudo_labelled(cfg, data.root, outbox) if cfg.pseudo.teacher is not None else None
    session = TrainingSession(cfg, data, teacher.probabilities if teacher else None, pseudo)
    return _Started(run_id, session, progress, resumed is not None, clock)


def _build(started: _Started, resumed: ResumeState | None) -> _Built:
    """A new model, or the interrupted run's model with its best epoch so far (inside the strategy's scope)."""
    session, progress = started.session, started.progress
    if resumed is None:
        model, backbone, callbacks = session.build_model()
        mlflow.set_tag(WEIGHTS_SOURCE_TAG, backbone.weights_source)
        return _Built(model, callbacks, BestEpoch(session.objective), backbone.weights_source,
                      WeightAveraging.for_trainer(session.cfg.trainer))
    return _Built(resumed.model(), session.schedule_callbacks(),
                  BestEpoch(session.objective, progress.best_epoch, progress.best_logs, resumed.best_weights()),
                  mlflow.get_run(started.run_id).data.tags.get(WEIGHTS_SOURCE_TAG),
                  WeightAveraging.for_trainer(session.cfg.trainer, resumed.averaged_sum(), progress.averaged_epochs))


def _fit(cfg: DictConfig, started: _Started, built: _Built, checkpoints: Checkpoints, outbox: Outbox,
         mirror) -> FitResult:
    """The session's fit, checkpointed (and the state uploaded, with a `mirror`) and logged after every
    epoch; the profile when asked for."""
    session, progress = started.session, started.progress
    after_best = (EpochCheckpoint(checkpoints, built.best, progress, built.averaging, mirror),
                  tracking.epoch_metrics_callback(EPOCH_METRICS, session.steps * cfg.trainer.batch_size, outbox.metrics))
    if not started.resumed:
        _log_augmentation_examples(session, outbox)
    profile = outbox.staging(PROFILE_DIR) if cfg.trainer.profile_batches else None
    result = session.fit(built.model, initial_epoch=progress.epoch, best=built.best, callbacks=built.callbacks,
                         after_best=after_best, profile_dir=profile, from_checkpoint=started.resumed,
                         averaging=built.averaging)
    if profile is not None and any(profile.iterdir()):
        outbox.artifacts(profile, PROFILE_DIR)
    if progress.history:  # the whole run's curves, also across an interruption
        result.history = {k: [epoch[k] for epoch in progress.history] for k in progress.history[0]}
    return result


def _finish(cfg: DictConfig, started: _Started, built: _Built, result: FitResult, outbox: Outbox) -> float:
    """Weights digest, best-epoch metrics, evaluation, the model and the run's description; returns the
    objective's best value."""
    session, model = started.session, built.model
    digest = weights_digest(model)  # equal on every worker of a multi-worker run
    log.info("final weights: sha256 %s", digest)
    outbox.tags({WEIGHTS_DIGEST_TAG: digest})
    if result.best_epoch == 0:  # the untrained model's validation scores, as step 0
        outbox.metrics(result.best, step=0)
    outbox.metrics(result.best_metrics())
    _log_evaluation(model, session, result, outbox)
    outbox.keras_model(session.for_export(model), session.data.images[session.data.val_indices[:4]])
    objective, best = session.objective, result.best[session.objective.metric]
    scored = (f"{objective.metric} **{best:.4f}** for the average of epochs "
              f"{result.best_epoch - result.averaged_epochs + 1}-{result.best_epoch}" if result.averaged_epochs else
              f"Best {objective.metric} **{best:.4f}** at epoch {result.best_epoch} of {cfg.trainer.epochs}")
    outbox.tags({NOTE_TAG: "\n".join([
        f"**{cfg.backbone.name}** (weights: {built.weights_source}, "
        f"{cfg.backbone.input_size} px) on **{cfg.data.name}** `{session.data.root}`: {len(session.train_indices):,} "
        f"training and {len(session.val_indices):,} validation patches.",
        f"{scored}; {time.perf_counter() - started.clock:.0f} s of wall time"
        + (" since the resume." if started.resumed else "."),
    ])})
    log.info("run %s finished: best %s %.4f at epoch %d", started.run_id, objective.metric, best, result.best_epoch)
    return best


def weights_digest(model) -> str:
    """SHA-256 of every weight of `model` (trainable and not), in layer order."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _log_augmentation_examples(session: TrainingSession, outbox: Outbox) -> None:
    shown = np.sort(session.train_indices[:8])
    path = outbox.staging("augmentation") / "augmentation_examples.png"
    plot_examples(session.augment, session.data.images[shown], path, session.cfg.augmentation.name)
    outbox.artifacts(path, PLOTS_DIR)


def _log_data(data: TrainingData, source: str, outbox: Outbox) -> None:
    """What the run trained on: datasets (the UI's Dataset column), fingerprint, counts, the patches left out."""
    for context, indices in (("training", data.train_indices), ("validation", data.val_indices)):
        tracking.log_dataset(data.patches.ids[indices], data.labels[indices], data.root,
                             f"{source}-{context}", data.fingerprint, context)
    outbox.tags({DATASET_FINGERPRINT_TAG: data.fingerprint, DATA_ROOT_TAG: str(data.root)})
    outbox.metrics({"n_train": len(data.train_indices), "n_val": len(data.val_indices),
                        "n_bad_images": len(data.patches.bad), "n_unlisted_files": len(data.unlisted)})
    if data.patches.bad:
        outbox.text(data.patches.bad_report(), BAD_IMAGES_ARTIFACT)
    if data.unlisted:
        outbox.text("".join(f"{name}\n" for name in data.unlisted), UNLISTED_FILES_ARTIFACT)


def _log_evaluation(model, session: TrainingSession, result: FitResult, outbox: Outbox) -> None:
    """Training curves, and the validation split scored as evaluate.py scores any labelled folder."""
    if result.best_epoch > 0:
        curves = plot_training_curves(result.history, outbox.staging("curves") / "training_curves.png")
        outbox.artifacts(curves, PLOTS_DIR)
    data = session.data
    labels = data.labels[session.val_indices]
    if len(set(labels.tolist())) < 2:
        log.warning("validation split holds one label only: no ROC or calibration report")
        return
    probabilities = model.predict(session.val_dataset(), verbose=0)[:, 0]
    report = outbox.staging(EVALUATION_DIR)
    metrics = write_report(labels, probabilities, Rows(data.images, session.val_indices), report,
                           ids=data.patches.ids[session.val_indices], explain=lambda images: grad_cam(model, images))
    outbox.metrics({f"eval/{k}": v for k, v in metrics.items()})
    outbox.artifacts(report, EVALUATION_DIR)
