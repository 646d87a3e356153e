"""Fit-loop wiring: precision policy, compile, callbacks, keeping the best epoch by val AUC."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from histo_transfer.optim import build_optimizer

log = logging.getLogger(__name__)

EPOCH_METRICS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


def configure_precision(mixed_precision: bool) -> str:
    """mixed_float16 on a GPU when asked; float32 otherwise. Returns the policy name."""
    policy = "float32"
    if mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            policy = "mixed_float16"
        else:
            log.info("trainer.mixed_precision skipped: no GPU, training in float32")
    keras.mixed_precision.set_global_policy(policy)
    return policy


def compile_classifier(model: keras.Model, optimizer_cfg, trainer_cfg, steps_per_epoch: int) -> list:
    """Compile with BCE + label smoothing, AUC and accuracy; returns the schedule's callbacks."""
    optimizer, callbacks = build_optimizer(optimizer_cfg, steps_per_epoch, trainer_cfg.epochs)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=trainer_cfg.label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return callbacks


class BestEpoch(keras.callbacks.Callback):
    """Remembers the weights of the epoch with the highest val_auc and restores them at the end.

    A resumed run starts it from the interrupted run's best epoch, logs and weights.
    """

    def __init__(self, best_epoch: int = 0, best_logs: dict[str, float] | None = None, weights: list | None = None):
        super().__init__()
        self.best_epoch = best_epoch
        self.best_logs = dict(best_logs or {})
        self.weights = weights

    @property
    def best_auc(self) -> float:
        return self.best_logs.get("val_auc", -np.inf)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if logs.get("val_auc", -np.inf) > self.best_auc:
            self.best_epoch = epoch + 1
            self.best_logs = {k: float(v) for k, v in logs.items() if k.startswith("val_")}
            self.weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


@dataclass
class FitResult:
    best_epoch: int  # 1-based; 0 = the untrained model (trainer.epochs=0)
    best: dict[str, float]  # val_loss, val_accuracy, val_auc of the best epoch
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def best_val_auc(self) -> float:
        return self.best["val_auc"]


def fit(model: keras.Model, train_ds, val_ds, trainer_cfg, callbacks: list, *, steps_per_epoch: int,
        initial_epoch: int = 0, best: BestEpoch | None = None, after_best: tuple = ()) -> FitResult:
    """Train up to `trainer_cfg.epochs` epochs (0: only evaluate) and leave the best epoch's weights in `model`.

    `train_ds` holds the epochs from `initial_epoch` on, back to back (see make_dataset);
    `after_best` callbacks run after the best epoch is updated (checkpoints, metric logging).
    """
    if trainer_cfg.epochs == 0:
        scores = {f"val_{k}": float(v) for k, v in model.evaluate(val_ds, return_dict=True, verbose=0).items()}
        return FitResult(0, scores, {k: [v] for k, v in scores.items()})
    best = best or BestEpoch()
    callbacks = [*callbacks, best, *after_best]
    if trainer_cfg.early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=trainer_cfg.early_stopping_patience))
    history = model.fit(train_ds, validation_data=val_ds, epochs=trainer_cfg.epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=2)
    return FitResult(best.best_epoch, best.best_logs, {k: [float(v) for v in vs] for k, vs in history.history.items()})
