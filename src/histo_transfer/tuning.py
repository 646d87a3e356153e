"""keras-tuner search over the same model builder, data pipeline and objective as train.py.

The search is one MLflow parent run and each trial a nested run. The parent's id is kept in the
tuner's directory, so a resumed search (keras-tuner reloads finished trials) continues that run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import keras_tuner as kt
import mlflow
from omegaconf import DictConfig, OmegaConf

from histo_transfer import tracking
from histo_transfer.sweep import summary_table

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"
TUNERS = {"random": kt.RandomSearch, "hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization}


class ClassifierHyperModel(kt.HyperModel):
    """build_classifier + compile_classifier with the searched values put into the config."""

    def __init__(self, cfg: DictConfig, steps_per_epoch: int):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch

    def build(self, hp):
        from histo_transfer.models.classifier import build_classifier
        from histo_transfer.training import compile_classifier

        cfg = self.cfg.copy()
        space = self.cfg.tuner.search_space
        if space.lr is not None:
            cfg.optimizer.lr = hp.Float("lr", space.lr.min, space.lr.max, sampling="log")
        if space.dropout is not None:
            cfg.head.dropout = hp.Float("dropout", space.dropout.min, space.dropout.max)
        model, _ = build_classifier(cfg.backbone, cfg.head)
        compile_classifier(model, cfg.optimizer, cfg.trainer, self.steps_per_epoch)
        return model


def tracked_tuner(cfg: DictConfig, hypermodel: kt.HyperModel, parent_id: str):
    """The configured keras-tuner class, with each trial run as a nested MLflow run."""
    base = TUNERS[cfg.tuner.name]

    class Tracked(base):
        def run_trial(self, trial, *args, **kwargs):
            tags = {"mlflow.parentRunId": parent_id, "kind": "trial", "trial_id": trial.trial_id}
            with tracking.tracked_run(self._experiment_id, f"trial {trial.trial_id}", tags, nested=True):
                mlflow.log_params(tracking.flat_params(self._base_cfg))
                mlflow.log_params({f"hp.{k}": v for k, v in trial.hyperparameters.values.items()})
                histories = super().run_trial(trial, *args, **kwargs)
                val_auc = [h.history.get("val_auc", [0.0]) for h in histories]
                best = max(max(v) for v in val_auc)
                mlflow.log_metric("best_val_auc", best)
                for name in ("val_loss", "val_accuracy"):
                    at_best = [h.history[name][h.history["val_auc"].index(max(h.history["val_auc"]))]
                               for h in histories if name in h.history]
                    if at_best:
                        mlflow.log_metric(f"best_{name}", float(at_best[0]))
                return histories

    kwargs = {"objective": kt.Objective("val_auc", "max"), "directory": cfg.tuner.directory,
              "project_name": cfg.tuner.project_name, "overwrite": False, "seed": cfg.tuner.seed}
    if cfg.tuner.name == "hyperband":
        kwargs.update(max_epochs=cfg.tuner.max_epochs, factor=cfg.tuner.factor,
                      hyperband_iterations=cfg.tuner.hyperband_iterations)
    else:
        kwargs.update(max_trials=cfg.tuner.max_trials, executions_per_trial=cfg.tuner.executions_per_trial)
    if cfg.tuner.name == "bayesian":
        kwargs.update(num_initial_points=cfg.tuner.num_initial_points)
    tuner = Tracked(hypermodel, **kwargs)
    tuner._experiment_id = mlflow.get_run(parent_id).info.experiment_id
    tuner._base_cfg = cfg
    return tuner


def tune(cfg: DictConfig) -> float:
    """Run (or resume) the keras-tuner search; returns the best trial's val AUC."""
    from histo_transfer.augment import build_augmentation
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.data.pipeline import make_dataset, steps_per_epoch
    from histo_transfer.training import EPOCH_METRICS, configure_precision

    experiment_id = tracking.setup(cfg.tracking)
    project = Path(cfg.tuner.directory) / cfg.tuner.project_name
    parent_id = _parent_run(project, experiment_id, cfg)
    with tracking.tracked_run(experiment_id, None, {}, run_id=parent_id):
        configure_precision(cfg.trainer.mixed_precision)
        keras.utils.set_random_seed(cfg.trainer.seed)
        data = load_training_data(cfg.data)
        batch = cfg.trainer.batch_size
        steps = steps_per_epoch(len(data.train_indices), batch)
        most_epochs = max(cfg.tuner.epochs, cfg.tuner.get("max_epochs", 0))  # Hyperband trains up to max_epochs
        train_ds = make_dataset(data.images, data.labels, data.train_indices, batch, shuffle=True,
                                augment=build_augmentation(cfg.augmentation, cfg.trainer.seed), seed=cfg.trainer.seed,
                                epochs=(0, most_epochs))
        val_ds = make_dataset(data.images, data.labels, data.val_indices, batch)
        hypermodel = ClassifierHyperModel(cfg, steps)
        tuner = tracked_tuner(cfg, hypermodel, parent_id)
        callbacks = [tracking.epoch_metrics_callback(EPOCH_METRICS)]
        if cfg.trainer.early_stopping_patience > 0:  # the notebook's EarlyStopping(patience=2)
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                           patience=cfg.trainer.early_stopping_patience))
        tuner.search(train_ds, validation_data=val_ds, epochs=cfg.tuner.epochs, steps_per_epoch=steps,
                     callbacks=callbacks, verbose=2)
        best_hp = tuner.get_best_hyperparameters(1)[0].values
        best_score = tuner.oracle.get_best_trials(1)[0].score
        # tags, not params: a resumed search may find better values, and MLflow params never change
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best_hp.items()})
        mlflow.log_dict(best_hp, "summary/best_hyperparameters.json")
        mlflow.log_metric("best_val_auc", best_score)
        children = mlflow.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                      output_format="list")
        table = summary_table(children)
        if not table.empty:
            mlflow.set_tag("best_child_run_id", table.iloc[0]["run_id"])
            mlflow.log_table(table, "summary/tuner_summary.json")
        log.info("keras-tuner %s: best val AUC %.4f with %s", cfg.tuner.name, best_score, best_hp)
    return float(best_score)


def _parent_run(project: Path, experiment_id: str, cfg: DictConfig) -> str:
    """The search's parent run: the one recorded in its directory (a resumed search) or a new one."""
    record = project / PARENT_RUN_FILE
    client = mlflow.tracking.MlflowClient()
    if record.exists():
        parent_id = record.read_text().strip()
        for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"):
            if run.info.status == "RUNNING":  # its process died with the interrupted search
                client.set_terminated(run.info.run_id, "KILLED")
        log.info("resuming keras-tuner search %s (MLflow run %s)", project, parent_id)
        return parent_id
    run = client.create_run(experiment_id, run_name=f"keras-tuner {cfg.tuner.name} {cfg.backbone.name}", tags={
        "kind": "keras-tuner", "tuner": cfg.tuner.name, "tuner_directory": str(project),
        "search_space": OmegaConf.to_yaml(cfg.tuner.search_space).strip()})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v)
                                              for k, v in tracking.flat_params(cfg).items()])
    project.mkdir(parents=True, exist_ok=True)
    record.write_text(run.info.run_id)
    return run.info.run_id
