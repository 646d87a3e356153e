"""One training run: validated config -> data -> model -> fit -> evaluation, all recorded in MLflow."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histo_transfer.config import validate
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
    # TensorFlow is imported only once the config is known to be good.
    import keras
    import mlflow

    from histo_transfer import tracking
    from histo_transfer.augment import build_augmentation
    from histo_transfer.data.loading import load_training_data
    from histo_transfer.data.pipeline import make_dataset
    from histo_transfer.models.classifier import build_classifier
    from histo_transfer.training import EPOCH_METRICS, compile_classifier, configure_precision, fit

    experiment_id = tracking.setup(cfg.tracking)
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
    with tracking.tracked_run(experiment_id, run_name, tags) as run, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mlflow.log_params(tracking.flat_params(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        mlflow.log_text(OmegaConf.to_yaml(overrides), "config/overrides.yaml")

        mlflow.set_tag("precision_policy", configure_precision(cfg.trainer.mixed_precision))
        keras.utils.set_random_seed(cfg.trainer.seed)
        data = load_training_data(cfg.data)
        _log_data(data)

        model, backbone = build_classifier(cfg.backbone, cfg.head)
        mlflow.set_tag("weights_source", backbone.weights_source)

        batch = cfg.trainer.batch_size
        augment = build_augmentation(cfg.augmentation, cfg.trainer.seed)
        train_ds = make_dataset(data.images, data.labels, data.train_indices, batch,
                                shuffle=True, augment=augment, seed=cfg.trainer.seed)
        val_ds = make_dataset(data.images, data.labels, data.val_indices, batch)
        steps_per_epoch = -(-len(data.train_indices) // batch)
        callbacks = compile_classifier(model, cfg.optimizer, cfg.trainer, steps_per_epoch)
        result = fit(model, train_ds, val_ds, cfg.trainer, [*callbacks, tracking.epoch_metrics_callback(EPOCH_METRICS)])
        if result.best_epoch == 0:  # the untrained model's validation scores, as step 0
            mlflow.log_metrics(result.best, step=0)
        mlflow.log_metrics({"best_epoch": result.best_epoch, **{f"best_{k}": v for k, v in result.best.items()}})

        _log_evaluation(model, val_ds, data, result, out)
        _log_model(model, data.images[data.val_indices[:4]], out)
        log.info("run %s finished: best val AUC %.4f at epoch %d",
                 run.info.run_id, result.best_val_auc, result.best_epoch)
    return result.best_val_auc


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
