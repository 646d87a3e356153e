"""One training run: validated config -> data -> model -> fit -> evaluation, all recorded in MLflow."""

from __future__ import annotations

import logging
import shlex
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histo_transfer.config import validate
from histo_transfer.errors import TrainingInterrupted
from histo_transfer.sweep import parent_run_id

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model/model.keras"
LOGGED_MODEL_NAME = "classifier"


def train(cfg: DictConfig) -> float:
    """Run one training job; returns the best validation AUC (what sweepers maximise)."""
    validate(cfg)
    if cfg.get("tuner") is not None:  # a keras-tuner search instead of one run
        from histo_transfer.tuning import tune

        return tune(cfg)
    from histo_transfer import tracking
    from histo_transfer.checkpoints import Checkpoints, run_key

    experiment_id = tracking.setup(cfg.tracking)
    checkpoints = Checkpoints(cfg.trainer.checkpoint_dir, run_key(cfg))
    resumed = checkpoints.latest() if cfg.trainer.resume else None
    if cfg.trainer.resume and resumed is None:
        log.warning("trainer.resume=true, but %s holds no state of this config: starting a new run",
                    checkpoints.folder)
    if not cfg.trainer.resume:
        checkpoints.clear()  # a fresh start: stale state of the same config would only mislead a later resume
    overrides, in_sweep = _hydra_job()
    run_name = cfg.tracking.run_name or tracking.run_name_from_overrides(overrides)
    tags = {
        "mlflow.source.git.commit": tracking.git_commit(Path(cfg.paths.root_dir)),
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        **{str(k): str(v) for k, v in cfg.tracking.tags.items()},
    }
    if in_sweep and parent_run_id():
        tags["mlflow.parentRunId"] = parent_run_id()  # nests this job under the sweep in the UI
    run_id = resumed[0].run_id if resumed else None
    try:
        with tracking.tracked_run(experiment_id, run_name, tags, run_id=run_id) as run:
            result = _run(cfg, run.info.run_id, overrides, checkpoints, resumed)
    except KeyboardInterrupt:
        command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]] if a != "trainer.resume=true")
        raise TrainingInterrupted(f"the run ended KILLED, its last completed epoch is saved; resume with: "
                                  f"python {command} trainer.resume=true") from None
    checkpoints.clear()  # finished: nothing left to resume
    return result.best_val_auc


def _run(cfg: DictConfig, run_id: str, overrides: list[str], checkpoints, resumed):
    """The body of a training run, inside its MLflow run; `resumed` is the state of an interrupted one."""
    # TensorFlow is imported only once the config is known to be good.
    import keras
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.augment import build_augmentation
    from histo_transfer.checkpoints import EpochCheckpoint, Progress
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.data.pipeline import make_dataset, steps_per_epoch
    from histo_transfer.distribution import make_strategy
    from histo_transfer.models.classifier import build_classifier
    from histo_transfer.optim import schedule_callbacks
    from histo_transfer.training import EPOCH_METRICS, BestEpoch, compile_classifier, configure_precision, fit

    strategy = make_strategy(cfg.trainer)  # first: multi-worker and CPU splitting must precede other TF work
    if resumed is None:
        mlflow.log_params(tracking.flat_params(cfg))
        mlflow.log_text(tracking.config_yaml(cfg), "config/config.yaml")
        mlflow.log_text(tracking.redact_uri(OmegaConf.to_yaml(overrides)), "config/overrides.yaml")
        progress = Progress(run_id=run_id, epoch=0)
    else:
        progress, folder = resumed
        log.info("resuming run %s after epoch %d of %d", run_id, progress.epoch, cfg.trainer.epochs)
        tracking.backfill_epochs(run_id, progress.history, EPOCH_METRICS)
    mlflow.set_tags({"precision_policy": configure_precision(cfg.trainer.mixed_precision),
                     "replicas": str(strategy.num_replicas_in_sync)})
    keras.utils.set_random_seed(cfg.trainer.seed + progress.epoch)
    data = load_training_data(cfg.data)
    _log_data(data)

    batch = cfg.trainer.batch_size
    steps = steps_per_epoch(len(data.train_indices), batch)
    with strategy.scope():
        if resumed is None:
            model, backbone = build_classifier(cfg.backbone, cfg.head)
            mlflow.set_tag("weights_source", backbone.weights_source)
            callbacks = compile_classifier(model, cfg.optimizer, cfg.trainer, steps)
            best = BestEpoch()
        else:  # weights, optimizer state and schedule position as after the last completed epoch
            model = keras.models.load_model(folder / "state.keras")
            callbacks = schedule_callbacks(cfg.optimizer)
            best = BestEpoch(progress.best_epoch, progress.best_logs, checkpoints.best_weights(folder))
    augment = build_augmentation(cfg.augmentation, cfg.trainer.seed)
    train_ds = make_dataset(data.images, data.labels, data.train_indices, batch, shuffle=True, augment=augment,
                            seed=cfg.trainer.seed, epochs=(progress.epoch, max(cfg.trainer.epochs, progress.epoch)))
    val_ds = make_dataset(data.images, data.labels, data.val_indices, batch)
    after_best = (EpochCheckpoint(checkpoints, best, progress), tracking.epoch_metrics_callback(EPOCH_METRICS))
    result = fit(model, train_ds, val_ds, cfg.trainer, callbacks, steps_per_epoch=steps,
                 initial_epoch=progress.epoch, best=best, after_best=after_best)
    if progress.history:  # the whole run's curves, also across an interruption
        result.history = {k: [epoch[k] for epoch in progress.history] for k in progress.history[0]}
    if result.best_epoch == 0:  # the untrained model's validation scores, as step 0
        mlflow.log_metrics(result.best, step=0)
    mlflow.log_metrics({"best_epoch": result.best_epoch, **{f"best_{k}": v for k, v in result.best.items()}})

    with tempfile.TemporaryDirectory() as tmp:
        _log_evaluation(model, val_ds, data, result, Path(tmp))
        _log_model(model, data.images[data.val_indices[:4]], Path(tmp))
    log.info("run %s finished: best val AUC %.4f at epoch %d", run_id, result.best_val_auc, result.best_epoch)
    return result


def _log_data(data) -> None:
    """What the run trained on: fingerprint, counts, and the patches left out."""
    import mlflow

    mlflow.set_tags({"dataset_fingerprint": data.fingerprint, "data_root": str(data.root)})
    mlflow.log_metrics({"n_train": len(data.train_indices), "n_val": len(data.val_indices),
                        "n_bad_images": len(data.patches.bad), "n_unlisted_files": len(data.unlisted)})
    if data.patches.bad:
        mlflow.log_text(data.patches.bad_report(), "data/bad_images.tsv")
    if data.unlisted:
        mlflow.log_text("".join(f"{name}\n" for name in data.unlisted), "data/unlisted_files.txt")


def _hydra_job() -> tuple[list[str], bool]:
    """This job's command-line overrides, and whether it is one job of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # called from Python, not through a Hydra entrypoint
        return [], False
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN


def _log_evaluation(model, val_ds, data, result, out: Path) -> None:
    """Training curves, and the validation split scored as evaluate.py scores any labelled folder."""
    import mlflow

    from histo_transfer.evaluation import evaluate, plot_training_curves

    if result.best_epoch > 0:
        mlflow.log_artifact(str(plot_training_curves(result.history, out / "training_curves.png")), "plots")
    labels = data.labels[data.val_indices]
    if len(set(labels.tolist())) < 2:
        log.warning("validation split holds one label only: no ROC or calibration report")
        return
    probabilities = model.predict(val_ds, verbose=0)[:, 0]
    metrics = evaluate(labels, probabilities, data.images[data.val_indices], out / "evaluation")
    mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
    mlflow.log_artifacts(str(out / "evaluation"), "evaluation")


def _log_model(model, example, out: Path) -> None:
    """The best model as model/model.keras, its summary, and an MLflow-logged (servable) model."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=False)
    mlflow.log_text("\n".join(lines), "model/summary.txt")
    path = out / "model.keras"
    model.save(path)
    mlflow.log_artifact(str(path), "model")
    example = example.astype("float32")
    signature = infer_signature(example, model.predict(example, verbose=0))
    # Explicit requirements: inferring them would re-import TensorFlow in a subprocess.
    mlflow.keras.log_model(model, name=LOGGED_MODEL_NAME, signature=signature,
                           pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"])
