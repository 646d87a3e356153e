"""One training run: validated config -> data -> model -> fit -> evaluation, all recorded in MLflow."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histo_transfer.config import validate

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model/model.keras"
LOGGED_MODEL_NAME = "classifier"


def train(cfg: DictConfig) -> float:
    """Run one training job; returns the best validation AUC (what sweepers maximise)."""
    validate(cfg)
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
    overrides = _command_line_overrides()
    run_name = cfg.tracking.run_name or tracking.run_name_from_overrides(overrides)
    tags = {
        "mlflow.source.git.commit": tracking.git_commit(Path(cfg.paths.root_dir)),
        "backbone": cfg.backbone.name,
        "data": cfg.data.name,
        **{str(k): str(v) for k, v in cfg.tracking.tags.items()},
    }
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
        mlflow.log_metrics({"best_val_auc": result.best_val_auc, "best_epoch": result.best_epoch})

        _log_evaluation(model, val_ds, data.labels[data.val_indices], result, out)
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


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # called from Python, not through a Hydra entrypoint
        return []
    return list(HydraConfig.get().overrides.task)


def _log_evaluation(model, val_ds, val_labels, result, out: Path) -> None:
    import mlflow

    from histo_transfer.evaluation import plot_roc, plot_training_curves

    if result.best_epoch > 0:
        mlflow.log_artifact(str(plot_training_curves(result.history, out / "training_curves.png")), "plots")
    probabilities = model.predict(val_ds, verbose=0)[:, 0]
    if len(set(val_labels.tolist())) == 2:
        plot_roc(val_labels, probabilities, out / "val_roc.png")
        mlflow.log_artifact(str(out / "val_roc.png"), "plots")


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
