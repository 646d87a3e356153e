"""One tracked training run: validated config -> data -> training session -> evaluation, in one MLflow run."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from histo_transfer.config import validate
from histo_transfer.context import RunContext
from histo_transfer.errors import TrainingInterrupted
from histo_transfer.objective import EPOCH_METRICS
from histo_transfer.outbox import Unsent

log = logging.getLogger(__name__)
CONFIG_TAG = "config_key"  # checkpoints.run_key of the run's config: the same config, the same key


def train(cfg: DictConfig, context: RunContext | None = None) -> float:
    """Run one training job (a keras-tuner search, or a cross-validation); returns the objective's best
    value, which Hydra sweepers optimise."""
    context = context or RunContext()
    validate(cfg)
    if cfg.trainer.strategy == "multi_worker":
        from histo_transfer.distribution import worker_role

        role = worker_role()
        if not role.is_chief:
            return _train_as_worker(cfg, context, role)
    return _train(cfg, context)


def _train(cfg: DictConfig, context: RunContext) -> float:
    if cfg.get("tuner") is not None:  # a keras-tuner search instead of one run
        from histo_transfer.tuning import tune

        return tune(cfg, context)
    if cfg.get("cv") is not None:  # k folds, one nested run each, under one parent
        from histo_transfer.cross_validation import cross_validate

        return cross_validate(cfg, context)
    if cfg.trainer.resume and context.parent_run_id:
        kept = _finished_in_parent(cfg, context.parent_run_id)
        if kept is not None:
            return kept
    return run_training(cfg, context, parent_run_id=context.parent_run_id).objective_value


def _finished_in_parent(cfg: DictConfig, parent_run_id: str) -> float | None:
    """The objective value of a run of this very config that already FINISHED under the parent (a
    resumed sweep keeps the jobs it finished); None when there is none."""
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.checkpoints import run_key
    from histo_transfer.objective import Objective
    from histo_transfer.parent_runs import child_runs

    tracking.setup(cfg.tracking)
    client = mlflow.tracking.MlflowClient()
    finished = child_runs(client, client.get_run(parent_run_id),
                          f"tags.{CONFIG_TAG} = '{run_key(cfg)}' and attributes.status = 'FINISHED'")
    if not finished:
        return None
    log.info("run %s of this config finished in %s: kept", finished[0].info.run_id, parent_run_id)
    return finished[0].data.metrics[Objective.from_config(cfg.objective).best_metric]


def _train_as_worker(cfg: DictConfig, context: RunContext, role) -> float:
    """A non-chief worker of a multi-worker cluster: the same training, step for step with the chief,
    recorded into a scratch store and checkpoint folder that are deleted at the end."""
    with tempfile.TemporaryDirectory(prefix="histo-worker-") as scratch:
        cfg = copy.deepcopy(cfg)
        cfg.tracking.uri = f"sqlite:///{scratch}/mlflow.db"
        cfg.tracking.system_metrics = False
        cfg.tracking.register_best = None
        cfg.trainer.checkpoint_dir = f"{scratch}/checkpoints"
        log.info("worker %d of %d: training with the chief, which alone records the run", role.index, role.workers)
        return _train(cfg, dataclasses.replace(context, parent_run_id=None))


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
    from histo_transfer import tracking
    from histo_transfer.checkpoints import Checkpoints, run_key
    from histo_transfer.parent_runs import PARENT_TAG

    experiment_id = tracking.setup(cfg.tracking)
    checkpoints = Checkpoints(cfg.trainer.checkpoint_dir, run_key(cfg))
    resumed = checkpoints.latest() if cfg.trainer.resume else None
    if cfg.trainer.resume and resumed is None:
        log.warning("trainer.resume=true, but %s holds no state of this config: starting a new run",
                    checkpoints.folder)
    if not cfg.trainer.resume:
        checkpoints.clear()  # a fresh start: stale state of the same config would only mislead a later resume
    run_tags = {
        "mlflow.source.git.commit": tracking.git_commit(Path(cfg.paths.root_dir)),
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
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
            best = _run(cfg, context, run.info.run_id, checkpoints, resumed, fold, outbox)
            if not outbox.close(wait_s=cfg.tracking.outage_limit_s):
                outbox.keep("FINISHED")
                raise Unsent(outbox.folder)
    except KeyboardInterrupt:
        raise TrainingInterrupted("the run ended KILLED, its last completed epoch is saved; resume with: "
                                  + context.resume_command()) from None
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


def _run(cfg: DictConfig, context: RunContext, run_id: str, checkpoints, resumed, fold: Fold | None, outbox) -> float:
    """The body of a training run, inside its MLflow run; `resumed` is the state of an interrupted one.
    Once training starts, every record goes through `outbox`, so a tracking server that goes away
    never stops it."""
    # TensorFlow is imported only once the config is known to be good.
    import keras
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.checkpoints import EpochCheckpoint, Progress
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.distribution import make_strategy
    from histo_transfer.session import BestEpoch, TrainingSession, configure_precision

    strategy = make_strategy(cfg.trainer)  # first: multi-worker and CPU splitting must precede other TF work
    if resumed is None:
        mlflow.log_params(tracking.flat_params(cfg))
        mlflow.log_text(tracking.config_yaml(cfg), "config/config.yaml")
        mlflow.log_text(tracking.redact_uri(OmegaConf.to_yaml(list(context.overrides))), "config/overrides.yaml")
        progress = Progress(run_id=run_id, epoch=0)
    else:
        progress = resumed.progress
        log.info("resuming run %s after epoch %d of %d", run_id, progress.epoch, cfg.trainer.epochs)
        tracking.backfill_epochs(run_id, progress.history, EPOCH_METRICS)
    mlflow.set_tags({"precision_policy": configure_precision(cfg.trainer.mixed_precision),
                     "replicas": str(strategy.num_replicas_in_sync)})
    keras.utils.set_random_seed(cfg.trainer.seed + progress.epoch)
    started = time.perf_counter()
    data = load_training_data(cfg.data)
    if fold is not None:
        data = dataclasses.replace(data, train_indices=np.flatnonzero((fold.of_patch >= 0) & (fold.of_patch != fold.number)),
                                   val_indices=np.flatnonzero(fold.of_patch == fold.number))
    _log_data(data, cfg.data.name, outbox)
    session = TrainingSession(cfg, data)

    with strategy.scope():
        if resumed is None:
            model, backbone, callbacks = session.build_model()
            weights_source = backbone.weights_source
            mlflow.set_tag("weights_source", weights_source)
            best = BestEpoch(session.objective)
        else:
            weights_source = mlflow.get_run(run_id).data.tags.get("weights_source")
            model, callbacks = resumed.model(), session.schedule_callbacks()
            best = BestEpoch(session.objective, progress.best_epoch, progress.best_logs, resumed.best_weights())
    after_best = (EpochCheckpoint(checkpoints, best, progress),
                  tracking.epoch_metrics_callback(EPOCH_METRICS, session.steps * cfg.trainer.batch_size, outbox.metrics))
    if resumed is None:
        _log_augmentation_examples(session, outbox)
    profile = outbox.staging("profile") if cfg.trainer.profile_batches else None
    result = session.fit(model, initial_epoch=progress.epoch, best=best, callbacks=callbacks,
                         after_best=after_best, profile_dir=profile)
    if profile is not None and any(profile.iterdir()):
        outbox.artifacts(profile, "profile")
    digest = weights_digest(model)  # equal on every worker of a multi-worker run
    log.info("final weights: sha256 %s", digest)
    outbox.tags({"weights_sha256": digest})
    if progress.history:  # the whole run's curves, also across an interruption
        result.history = {k: [epoch[k] for epoch in progress.history] for k in progress.history[0]}
    if result.best_epoch == 0:  # the untrained model's validation scores, as step 0
        outbox.metrics(result.best, step=0)
    outbox.metrics(result.best_metrics())
    _log_evaluation(model, session, result, outbox)
    outbox.keras_model(model, data.images[data.val_indices[:4]])
    objective = session.objective
    outbox.tags({tracking.NOTE_TAG: "\n".join([
        f"**{cfg.backbone.name}** (weights: {weights_source}, "
        f"{cfg.backbone.input_size} px) on **{cfg.data.name}** `{data.root}`: {len(session.train_indices):,} training "
        f"and {len(session.val_indices):,} validation patches.",
        f"Best {objective.metric} **{result.best[objective.metric]:.4f}** at epoch {result.best_epoch} of "
        f"{cfg.trainer.epochs}; {time.perf_counter() - started:.0f} s of wall time"
        + (" since the resume." if resumed else "."),
    ])})
    log.info("run %s finished: best %s %.4f at epoch %d", run_id, objective.metric, result.best[objective.metric],
             result.best_epoch)
    return result.best[objective.metric]


def weights_digest(model) -> str:
    """SHA-256 of every weight of `model` (trainable and not), in layer order."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _log_augmentation_examples(session, outbox) -> None:
    from histo_transfer.augment import plot_examples

    shown = np.sort(session.train_indices[:8])
    path = outbox.staging("augmentation") / "augmentation_examples.png"
    plot_examples(session.augment, session.data.images[shown], path, session.cfg.augmentation.name)
    outbox.artifacts(path, "plots")


def _log_data(data, source: str, outbox) -> None:
    """What the run trained on: datasets (the UI's Dataset column), fingerprint, counts, the patches left out."""
    from histo_transfer import tracking

    for context, indices in (("training", data.train_indices), ("validation", data.val_indices)):
        tracking.log_dataset(data.patches.ids[indices], data.labels[indices], data.root,
                             f"{source}-{context}", data.fingerprint, context)
    outbox.tags({"dataset_fingerprint": data.fingerprint, "data_root": str(data.root)})
    outbox.metrics({"n_train": len(data.train_indices), "n_val": len(data.val_indices),
                        "n_bad_images": len(data.patches.bad), "n_unlisted_files": len(data.unlisted)})
    if data.patches.bad:
        outbox.text(data.patches.bad_report(), "data/bad_images.tsv")
    if data.unlisted:
        outbox.text("".join(f"{name}\n" for name in data.unlisted), "data/unlisted_files.txt")


def _log_evaluation(model, session, result, outbox) -> None:
    """Training curves, and the validation split scored as evaluate.py scores any labelled folder."""
    from histo_transfer.data.cache import Rows
    from histo_transfer.evaluation import plot_training_curves, write_report
    from histo_transfer.gradcam import grad_cam

    if result.best_epoch > 0:
        curves = plot_training_curves(result.history, outbox.staging("curves") / "training_curves.png")
        outbox.artifacts(curves, "plots")
    data = session.data
    labels = data.labels[session.val_indices]
    if len(set(labels.tolist())) < 2:
        log.warning("validation split holds one label only: no ROC or calibration report")
        return
    probabilities = model.predict(session.val_dataset(), verbose=0)[:, 0]
    report = outbox.staging("evaluation")
    metrics = write_report(labels, probabilities, Rows(data.images, session.val_indices), report,
                           ids=data.patches.ids[session.val_indices], explain=lambda images: grad_cam(model, images))
    outbox.metrics({f"eval/{k}": v for k, v in metrics.items()})
    outbox.artifacts(report, "evaluation")
