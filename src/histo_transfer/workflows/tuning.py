"""keras-tuner searches (config group `tuner`) through the same training session and objective as train.py.

The search is one MLflow parent run and each trial a nested run. The parent's id is kept in the
tuner's directory, so a resumed search (keras-tuner reloads finished trials) continues that run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import mlflow
from omegaconf import DictConfig, OmegaConf

from histo_transfer.config.context import RunContext
from histo_transfer.config.objective import EPOCH_METRICS, Objective
from histo_transfer.data.loading import load_training_data
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.parent_runs import PARENT_RUN_FILE, NewParent, ParentRun
from histo_transfer.tracking.schema import KIND_TAG, SUMMARY_DIR, RunKind
from histo_transfer.training.session import TrainingSession, configure_precision
from histo_transfer.workflows.tuners import TUNERS

log = logging.getLogger(__name__)


def with_hyperparameters(cfg: DictConfig, hp) -> DictConfig:
    """`cfg` with the search space's values drawn by keras-tuner put in."""
    cfg = cfg.copy()
    space = cfg.tuner.search_space
    if space.lr is not None:
        cfg.optimizer.lr = hp.Float("lr", space.lr.min, space.lr.max, sampling="log")
    if space.dropout is not None:
        cfg.head.dropout = hp.Float("dropout", space.dropout.min, space.dropout.max)
    return cfg


def build_tuner(cfg: DictConfig, session, parent, experiment_id: str):
    """The configured keras-tuner class; each trial trains through `session` inside a nested MLflow run."""
    import keras_tuner as kt  # its own import is slow: only when a search runs
    class SessionHyperModel(kt.HyperModel):
        def build(self, hp):
            model, _, self.schedule_callbacks = session.build_model(with_hyperparameters(cfg, hp))
            return model

        def fit(self, hp, model, *args, epochs=None, initial_epoch=0, callbacks=(), **kwargs):
            # Hyperband chooses epochs and initial_epoch per trial; the data comes from the session
            result = session.fit(model, epochs=epochs, initial_epoch=initial_epoch,
                                 callbacks=[*self.schedule_callbacks, *callbacks])
            mlflow.log_metrics(result.best_metrics())
            return result.best

    tuner_class, options = TUNERS[cfg.tuner.name](cfg.tuner)

    class TrackedTuner(tuner_class):
        def run_trial(self, trial, *args, **kwargs):
            tags = {**parent.child_tags, KIND_TAG: RunKind.TRIAL.value, "trial_id": trial.trial_id}
            with tracking.tracked_run(experiment_id, f"trial {trial.trial_id}", tags, nested=True):
                mlflow.log_params(tracking.flat_params(cfg))
                mlflow.log_params({f"hp.{k}": v for k, v in trial.hyperparameters.values.items()})
                return super().run_trial(trial, *args, **kwargs)

    objective = session.objective
    return TrackedTuner(SessionHyperModel(), objective=kt.Objective(objective.metric, objective.mode),
                        directory=cfg.tuner.directory, project_name=cfg.tuner.project_name, overwrite=False,
                        seed=cfg.tuner.seed, **options)


def tune(cfg: DictConfig, context: RunContext | None = None) -> float:
    """Run (or resume) the keras-tuner search; returns the best trial's objective value."""
    experiment_id = tracking.setup(cfg.tracking)
    project = Path(cfg.tuner.directory) / cfg.tuner.project_name
    parent = ParentRun.open(project / PARENT_RUN_FILE, Objective.from_config(cfg.objective),
                            lambda: _new_parent(project, experiment_id, cfg), resume=True)
    with tracking.tracked_run(experiment_id, None, {}, run_id=parent.run_id):
        configure_precision(cfg.trainer.mixed_precision)
        keras.utils.set_random_seed(cfg.trainer.seed)
        session = TrainingSession(cfg, load_training_data(cfg.data))
        tuner = build_tuner(cfg, session, parent, experiment_id)
        tuner.search(epochs=cfg.tuner.epochs, callbacks=[tracking.epoch_metrics_callback(EPOCH_METRICS)], verbose=2)
        best_hp = tuner.get_best_hyperparameters(1)[0].values
        best_score = float(tuner.oracle.get_best_trials(1)[0].score)
        mlflow.log_dict(best_hp, f"{SUMMARY_DIR}/best_hyperparameters.json")
        parent.summarise("tuner_summary")
        log.info("keras-tuner %s: best %s %.4f with %s", cfg.tuner.name, session.objective.metric, best_score, best_hp)
    return best_score


def _new_parent(project: Path, experiment_id: str, cfg: DictConfig) -> NewParent:
    """A search's parent run; a resumed search (keras-tuner reloads its finished trials) continues it."""
    return NewParent(experiment_id, f"keras-tuner {cfg.tuner.name} {cfg.backbone.name}", {
        KIND_TAG: RunKind.KERAS_TUNER.value, "tuner": cfg.tuner.name, "tuner_directory": str(project),
        "search_space": OmegaConf.to_yaml(cfg.tuner.search_space).strip()}, tracking.flat_params(cfg))
