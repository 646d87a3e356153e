"""keras-tuner searches (config group `tuner`) through the same training session and objective as train.py.

The search is one MLflow parent run and each trial a nested run. The parent's id is kept in the
tuner's directory, so a resumed search (keras-tuner reloads finished trials) continues that run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from histo_transfer.context import RunContext
from histo_transfer.options import Options, Range, between, check_range

log = logging.getLogger(__name__)


@dataclass
class Bounds:
    min: float
    max: float


@dataclass
class SearchSpace:
    """What a search may vary; null leaves a key at its config value."""

    lr: Optional[Bounds]  # log-uniform
    dropout: Optional[Bounds]


@dataclass
class TunerKeys:
    name: str
    max_trials: int = between(1)
    epochs: int = between(1)
    executions_per_trial: int = between(1)
    seed: int
    directory: str
    project_name: str
    search_space: SearchSpace


@dataclass
class HyperbandKeys(TunerKeys):
    max_epochs: int = between(1)
    factor: int = between(2)
    hyperband_iterations: int = between(1)


@dataclass
class BayesianKeys(TunerKeys):
    num_initial_points: int = between(1)


def _check_search_space(node, tuner_class) -> None:
    """Bounds inside their key's range (lr > 0, dropout < 1), min below max."""
    for key, high in (("lr", None), ("dropout", 1)):
        bounds = node.search_space[key]
        if bounds is not None:
            where = f"tuner.search_space.{key}"
            check_range(bounds.min, f"{where}.min", Range(0, low_open=key == "lr"))
            check_range(bounds.max, f"{where}.max", Range(bounds.min, high, low_open=True, high_open=True))


TUNERS = Options("tuner", check=_check_search_space)


@TUNERS.register("random", TunerKeys)
def random_search(cfg):
    import keras_tuner as kt

    return kt.RandomSearch, {"max_trials": cfg.max_trials, "executions_per_trial": cfg.executions_per_trial}


@TUNERS.register("hyperband", HyperbandKeys)
def hyperband(cfg):
    import keras_tuner as kt

    return kt.Hyperband, {"max_epochs": cfg.max_epochs, "factor": cfg.factor,
                          "hyperband_iterations": cfg.hyperband_iterations}


@TUNERS.register("bayesian", BayesianKeys)
def bayesian(cfg):
    import keras_tuner as kt

    return kt.BayesianOptimization, {"max_trials": cfg.max_trials, "executions_per_trial": cfg.executions_per_trial,
                                     "num_initial_points": cfg.num_initial_points}


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
    import keras_tuner as kt
    import mlflow

    from histo_transfer import tracking

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
            tags = {**parent.child_tags, "kind": "trial", "trial_id": trial.trial_id}
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
    import keras
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.objective import EPOCH_METRICS, Objective
    from histo_transfer.session import TrainingSession, configure_precision

    experiment_id = tracking.setup(cfg.tracking)
    parent = _parent_run(Path(cfg.tuner.directory) / cfg.tuner.project_name, experiment_id, cfg,
                         Objective.from_config(cfg.objective))
    with tracking.tracked_run(experiment_id, None, {}, run_id=parent.run_id):
        configure_precision(cfg.trainer.mixed_precision)
        keras.utils.set_random_seed(cfg.trainer.seed)
        session = TrainingSession(cfg, load_training_data(cfg.data))
        tuner = build_tuner(cfg, session, parent, experiment_id)
        tuner.search(epochs=cfg.tuner.epochs, callbacks=[tracking.epoch_metrics_callback(EPOCH_METRICS)], verbose=2)
        best_hp = tuner.get_best_hyperparameters(1)[0].values
        best_score = float(tuner.oracle.get_best_trials(1)[0].score)
        mlflow.log_dict(best_hp, "summary/best_hyperparameters.json")
        parent.summarise("tuner_summary")
        log.info("keras-tuner %s: best %s %.4f with %s", cfg.tuner.name, session.objective.metric, best_score, best_hp)
    return best_score


def _parent_run(project: Path, experiment_id: str, cfg: DictConfig, objective):
    """The search's parent run: the one recorded in its directory (a resumed search) or a new one."""
    from histo_transfer import tracking
    from histo_transfer.parent_runs import PARENT_RUN_FILE, ParentRun, record_parent, recorded_parent

    record = project / PARENT_RUN_FILE
    previous = recorded_parent(record)
    if previous:
        log.info("resuming keras-tuner search %s (MLflow run %s)", project, previous)
        return ParentRun.resume(previous, objective)
    parent = ParentRun.create(experiment_id, f"keras-tuner {cfg.tuner.name} {cfg.backbone.name}", {
        "kind": "keras-tuner", "tuner": cfg.tuner.name, "tuner_directory": str(project),
        "search_space": OmegaConf.to_yaml(cfg.tuner.search_space).strip()}, objective,
        params=tracking.flat_params(cfg))
    record_parent(record, parent)
    return parent
