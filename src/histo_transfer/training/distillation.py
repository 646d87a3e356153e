"""Knowledge distillation (Hinton et al. 2015) for a one-probability classifier: the loss against the labels
and a teacher's probabilities, and metrics that score the labels alone.

A distilling run's training targets are pairs (label, teacher's probability), shape (B, 2); validation
batches carry the label alone (B, 1), so val_loss is the labels' loss, comparable with any other run's.
The classes are registered with Keras: checkpoints of a distilling run load with them.
"""

from __future__ import annotations

import keras
from keras import ops

_EPSILON = 1e-7


def _logit(probability):
    probability = ops.clip(probability, _EPSILON, 1 - _EPSILON)
    return ops.log(probability) - ops.log1p(-probability)


@keras.saving.register_keras_serializable("histo_transfer")
class DistillationLoss(keras.losses.Loss):
    """alpha x BCE(label, p) + (1 - alpha) x T^2 x BCE(teacher at T, student at T), where "at T" is
    sigmoid(logit / T): a temperature above 1 makes both softer, so the teacher's confidence in the
    patches it finds hard carries over; T^2 keeps that part's gradients at the labels' scale."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, label_smoothing: float = 0.0,
                 name: str = "distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        hard = keras.losses.binary_crossentropy(y_true[:, :1], y_pred, label_smoothing=self.label_smoothing)
        if y_true.shape[-1] is None:  # it would take the pairs' branch and average over no teacher: NaN
            raise ValueError("distillation targets need a known number of columns (1: labels, 2: with the teacher's)")
        if y_true.shape[-1] == 1:  # validation: the labels alone
            return hard
        t = self.temperature
        teacher = ops.sigmoid(_logit(y_true[:, 1:2]) / t)
        student = ops.sigmoid(_logit(y_pred) / t)
        soft = keras.losses.binary_crossentropy(teacher, student) * t * t
        return self.alpha * hard + (1 - self.alpha) * soft

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "temperature": self.temperature,
                "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable("histo_transfer")
class LabelAUC(keras.metrics.AUC):
    """AUC of the labels, the first column of the targets."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred, sample_weight)


@keras.saving.register_keras_serializable("histo_transfer")
class LabelAccuracy(keras.metrics.BinaryAccuracy):
    """Accuracy on the labels, the first column of the targets."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true[:, :1], y_pred, sample_weight)
