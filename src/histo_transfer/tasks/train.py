"""train.py: one training run, a keras-tuner search (`tuner=`) or a cross-validation (`cv=`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from histo_transfer.config.context import RunContext
from histo_transfer.tasks import validation
from histo_transfer.training.distribution import worker_role

log = logging.getLogger(__name__)

CONFIG_NAME = "config"
LOADS_TENSORFLOW = True  # tasks.cli imports TensorFlow before main, dropping its load-time banners


def validate(cfg: DictConfig) -> None:
    validation.validate(cfg, training=True)


def main(cfg: DictConfig, context: RunContext | None = None) -> float:
    """Validate, then train; returns the objective's best value, which Hydra sweepers optimise."""
    context = context or RunContext()
    validate(cfg)
    if cfg.trainer.strategy == "multi_worker":
        role = worker_role()
        if not role.is_chief:
            return _train_as_worker(cfg, context, role)
    best = _train(cfg, context)
    if context.parent_run_id is None:  # a sweep's jobs leave the screen to the sweep's summary
        _print_summary(cfg)
    return best


def _print_summary(cfg: DictConfig) -> None:
    """The screen the run ends with: what it found and the command that opens it in the UI. Skipped
    when the tracking server is away: the run then waits in its outbox, and the run said how to send it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from histo_transfer.tasks.summary import run_summary
    from histo_transfer.tracking.outbox import store_answers

    uri = mlflow.get_tracking_uri()
    if not store_answers(uri):
        return
    try:
        run = mlflow.last_active_run()  # the run this process ended last: the run, or a CV's or search's parent
        if run is not None:
            print(run_summary(run.info.run_id, uri, Path(cfg.paths.root_dir), metric=cfg.objective.metric), flush=True)
    except MlflowException as error:  # the server went away since: the summary is a courtesy, the run is safe
        log.info("no summary: the tracking store did not answer (%s)", str(error).splitlines()[0])


def _train(cfg: DictConfig, context: RunContext) -> float:
    # TensorFlow comes with the workflows: imported only once the config is known to be good
    from histo_transfer.workflows import cross_validation, training_run, tuning

    if cfg.get("tuner") is not None:  # a keras-tuner search instead of one run
        return tuning.tune(cfg, context)
    if cfg.get("cv") is not None:  # k folds, one nested run each, under one parent
        return cross_validation.cross_validate(cfg, context)
    return training_run.train_once(cfg, context)


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
