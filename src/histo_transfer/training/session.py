"""One training session: data -> model -> fit. Single runs, keras-tuner trials and CV folds all train
through it; what they record (MLflow, checkpoints) comes in as callbacks, so nothing here logs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from histo_transfer.config.errors import Terminated
from histo_transfer.config.objective import Objective
from histo_transfer.data.augment import build_augmentation
from histo_transfer.data.loading import TrainingData
from histo_transfer.data.pipeline import ExtraPatches, make_dataset, steps_per_epoch
from histo_transfer.models.classifier import build_classifier
from histo_transfer.training.distillation import DistillationLoss, LabelAccuracy, LabelAUC
from histo_transfer.training.optim import SCHEDULES, build_optimizer

log = logging.getLogger(__name__)


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


@dataclass
class FitResult:
    best_epoch: int  # 1-based; 0 = the untrained model (trainer.epochs=0)
    best: dict[str, float]  # the validation metrics of the best epoch
    history: dict[str, list[float]] = field(default_factory=dict)
    averaged_epochs: int = 0  # trainer.swa: `best` scores the average of this many last epochs

    def best_metrics(self) -> dict[str, float]:
        """What a run records about its result: `best_epoch` and `best_<val metric>` (and, averaged,
        `swa_epochs`)."""
        averaged = {"swa_epochs": self.averaged_epochs} if self.averaged_epochs else {}
        return {"best_epoch": self.best_epoch, **{f"best_{k}": v for k, v in self.best.items()}, **averaged}


class BestEpoch(keras.callbacks.Callback):
    """Remembers the weights of the epoch best by the objective and restores them at the end.

    A resumed run starts it from the interrupted run's best epoch, logs and weights.
    """

    def __init__(self, objective: Objective, best_epoch: int = 0, best_logs: dict[str, float] | None = None,
                 weights: list | None = None):
        super().__init__()
        self.objective = objective
        self.best_epoch = best_epoch
        self.best_logs = dict(best_logs or {})
        self.weights = weights

    @property
    def best_value(self) -> float:
        return self.best_logs.get(self.objective.metric, self.objective.worst)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.objective.metric)
        if value is not None and self.objective.better(value, self.best_value):
            self.best_epoch = epoch + 1
            self.best_logs = {k: float(v) for k, v in logs.items() if k.startswith("val_")}
            self.weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


class EMAWeightsInModel(keras.callbacks.SwapEMAWeights):
    """With `optimizer.ema`, the optimizer's moving average of the weights is in the model whenever it is
    validated and at every epoch's end (so BestEpoch, checkpoints and the saved model hold the average);
    training steps run on the raw weights, which wait in the optimizer's average slots meanwhile.

    Goes first among the callbacks: BatchNorm recalibration must see the averaged weights. A checkpoint
    is written at an epoch's end, the average in the model: a run resumed from it says `ema_in_model`.
    """

    def __init__(self, ema_in_model: bool = False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = ema_in_model


def uses_ema(model) -> bool:
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under a loss-scale wrapper
    return bool(getattr(optimizer, "use_ema", False))


class BatchNormRecalibration(keras.callbacks.Callback):
    """Before each validation, sets the moving statistics of every BatchNorm layer that trains to the
    plain average over a few training batches ("precise BN", Wu & Johnson 2021).

    Moving averages with Keras' momentum 0.99 need hundreds of steps to forget their initial values;
    after a short run they describe no data at all, and a model validated with them outputs one
    constant (val AUC exactly 0.5). Pretrained, frozen BatchNorm layers are left as they are.
    """

    def __init__(self, batches_of_epoch):
        super().__init__()
        self.batches_of_epoch = batches_of_epoch  # epoch -> dataset of training batches
        self.epoch: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_test_begin(self, logs=None):
        if self.epoch is None:
            return  # an evaluate() outside fit
        recalibrate_batchnorm(self.model, self.batches_of_epoch(self.epoch))
        self.epoch = None


def recalibrate_batchnorm(model, batches) -> None:
    """Moving statistics of `model`'s training BatchNorm layers = the plain mean over `batches`."""
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    try:
        for count, (images, _) in enumerate(batches):
            for layer in layers:  # the k-th batch gets weight 1/(k+1): a running plain mean
                layer.momentum = count / (count + 1)
            model(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


class WeightAveraging(keras.callbacks.Callback):
    """trainer.swa: sums the weights at the end of each epoch from `first_epoch` (1-based) on, the
    averaged ones when optimizer.ema is on; TrainingSession.fit makes their mean the model's weights
    (stochastic weight averaging, Izmailov et al. 2018). A resumed run starts from the stored sum."""

    def __init__(self, first_epoch: int, total: list | None = None, count: int = 0):
        super().__init__()
        self.first_epoch, self.total, self.count = first_epoch, total, count

    @classmethod
    def for_trainer(cls, trainer, total: list | None = None, count: int = 0) -> "WeightAveraging | None":
        if not trainer.swa:
            return None
        return cls(max(1, trainer.epochs - trainer.swa + 1), total, count)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 < self.first_epoch:
            return
        weights = [np.asarray(v.numpy(), np.float64) for v in self.model.trainable_variables]
        self.total = weights if self.total is None else [t + w for t, w in zip(self.total, weights)]
        self.count += 1

    def apply(self, model) -> None:
        for variable, total in zip(model.trainable_variables, self.total):
            variable.assign((total / self.count).astype(variable.dtype))


class ProfileBatches(keras.callbacks.Callback):
    """A TensorFlow profiler trace of training batches first..last (1-based, counted over the run)."""

    def __init__(self, folder: Path, first: int, last: int):
        super().__init__()
        self.folder, self.first, self.last = folder, first, last
        self.seen = 0
        self.tracing = False

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.first:
            tf.profiler.experimental.start(str(self.folder))
            self.tracing = True

    def on_train_batch_end(self, batch, logs=None):
        if self.tracing and self.seen >= self.last:
            tf.profiler.experimental.stop()
            self.tracing = False

    def on_train_end(self, logs=None):
        if self.tracing:
            tf.profiler.experimental.stop()
            self.tracing = False


class _RaiseOnInterrupt(keras.callbacks.Callback):
    def __init__(self, requested: list[int]):
        super().__init__()
        self.requested = requested  # the signals received, first first

    def _check(self, *args, **kwargs):
        if self.requested:
            raise _interruption(self.requested[0])

    on_train_batch_end = on_test_batch_end = on_epoch_end = _check


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interrupt_between_batches():
    """Ctrl-C or SIGTERM during fit stops at the next batch boundary, after the current epoch's
    checkpoint if the epoch just ended; a second signal stops at once. Yields the callback that
    raises KeyboardInterrupt (Terminated for SIGTERM).

    Python's default handler raises KeyboardInterrupt wherever the main thread happens to be, which
    can be a finaliser whose exceptions Python prints and drops: a Ctrl-C would then be lost.
    """
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield _RaiseOnInterrupt(requested)
        return

    def handler(signum, frame):
        if requested:
            raise _interruption(requested[0])
        requested.append(signum)
        log.warning("%s: stopping at the end of this training step (press Ctrl-C to stop at once)",
                    "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield _RaiseOnInterrupt(requested)
    finally:
        for number, handler_before in previous.items():  # None: one set outside Python, not restorable
            signal.signal(number, handler_before if handler_before is not None else signal.SIG_DFL)
    if requested:  # noticed after the last batch: still an interrupted run
        raise _interruption(requested[0])


def progress_verbosity(progress: str) -> int:
    """Keras' verbose for trainer.progress: a per-step bar in a terminal, one line per epoch in logs."""
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "epoch"
    return {"bar": 1, "epoch": 2, "none": 0}[progress]


def _compile_classifier(model, optimizer, label_smoothing: float) -> None:
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])


class TrainingSession:
    """The data of one training (a run, a trial, a fold), its datasets, model and fit loop."""

    def __init__(self, cfg, data: TrainingData, teacher: np.ndarray | None = None, pseudo=None):
        """`teacher`: a teacher's probability for each training patch of `data` (distill.teacher), trained
        against beside the labels. `pseudo`: pseudo-labelled patches (workflows.pseudo_labels) that join
        the training patches, the teacher's probability as their second target when distilling."""
        self.cfg, self.data, self.teacher = cfg, data, teacher
        self.targets = data.labels if teacher is None else np.stack([data.labels, teacher], axis=1)
        self.extra = None
        if pseudo is not None and not cfg.trainer.overfit_batches:
            labels = pseudo.labels if teacher is None else np.stack([pseudo.labels, pseudo.probabilities], axis=1)
            self.extra = ExtraPatches(pseudo.patches.images, labels, pseudo.kept, pseudo.weight)
        self.objective = Objective.from_config(cfg.objective)
        trainer = cfg.trainer
        self.train_indices, self.val_indices = data.train_indices, data.val_indices
        if trainer.overfit_batches:  # debug=overfit: the same few batches to train and validate on
            self.train_indices = self.val_indices = self.train_indices[: trainer.overfit_batches * trainer.batch_size]
        trained_on = len(self.train_indices) + (len(self.extra.indices) if self.extra else 0)
        self.steps = trainer.steps_per_epoch or steps_per_epoch(trained_on, trainer.batch_size)
        self.augment = build_augmentation(cfg.augmentation, trainer.seed)

    def train_dataset(self, first_epoch: int, last_epoch: int) -> tf.data.Dataset:
        """Epochs first_epoch..last_epoch-1 back to back; each depends only on (seed, epoch)."""
        return make_dataset(self.data.images, self.targets, self.train_indices, self.cfg.trainer.batch_size,
                            shuffle=True, augment=self.augment, seed=self.cfg.trainer.seed,
                            epochs=(first_epoch, max(last_epoch, first_epoch)), steps=self.steps, extra=self.extra)

    def val_dataset(self) -> tf.data.Dataset:
        return make_dataset(self.data.images, self.data.labels, self.val_indices, self.cfg.trainer.batch_size)

    def build_model(self, cfg=None):
        """The compiled classifier of `cfg` (default: the session's; keras-tuner passes its trial's).
        Returns the model, its backbone and the schedule's callbacks."""
        cfg = cfg or self.cfg
        model, backbone = build_classifier(cfg.backbone, cfg.head)
        optimizer, callbacks = build_optimizer(cfg.optimizer, self.steps * cfg.trainer.epochs, self.objective)
        smoothing = cfg.trainer.label_smoothing
        if self.teacher is None:
            _compile_classifier(model, optimizer, smoothing)
        else:
            model.compile(optimizer=optimizer, loss=DistillationLoss(cfg.distill.alpha, cfg.distill.temperature, smoothing),
                          metrics=[LabelAccuracy(name="accuracy"), LabelAUC(name="auc")])
        return model, backbone, callbacks

    def for_export(self, model):
        """`model` as every classifier of this project is saved: a distilling run's loss and metrics, which
        read a teacher's column, replaced by the plain ones, so that predict.py, evaluate.py and `mlflow
        models serve` load it without this package's classes. Checkpoints keep the distilling ones."""
        if self.teacher is not None:
            _compile_classifier(model, model.optimizer, self.cfg.trainer.label_smoothing)
        return model

    def schedule_callbacks(self) -> list:
        """The schedule's callbacks alone, for a model whose optimizer was restored (a resumed run)."""
        return SCHEDULES[self.cfg.optimizer.schedule](self.cfg.optimizer, 0, self.objective).callbacks

    def fit(self, model, *, epochs: int | None = None, initial_epoch: int = 0, best: BestEpoch | None = None,
            callbacks=(), after_best=(), profile_dir: Path | None = None, from_checkpoint: bool = False,
            averaging: WeightAveraging | None = None) -> FitResult:
        """Train up to `epochs` (default trainer.epochs; 0: only evaluate) and leave the best epoch's
        weights in `model`, or with trainer.swa the average of the last epochs' (BatchNorm recomputed).
        `after_best` callbacks see the best epoch and the average updated (checkpoints, logging).
        `from_checkpoint`: `model` is an epoch-end checkpoint (optimizer state and all) of this session."""
        trainer = self.cfg.trainer
        epochs = trainer.epochs if epochs is None else epochs
        val_ds = self.val_dataset()
        if epochs == 0:
            scores = {f"val_{k}": float(v) for k, v in model.evaluate(val_ds, return_dict=True, verbose=0).items()}
            return FitResult(0, scores, {k: [v] for k, v in scores.items()})
        best = best or BestEpoch(self.objective)
        every = [EMAWeightsInModel(ema_in_model=from_checkpoint)] if uses_ema(model) else []
        every += callbacks
        if trainer.bn_recalibration_batches:
            every.append(BatchNormRecalibration(self._recalibration_batches))
        averaging = averaging or WeightAveraging.for_trainer(trainer)
        every += [best, *([averaging] if averaging else []), *after_best]
        if trainer.early_stopping_patience > 0:
            every.append(keras.callbacks.EarlyStopping(monitor=self.objective.metric, mode=self.objective.mode,
                                                       patience=trainer.early_stopping_patience))
        if trainer.profile_batches and profile_dir is not None:
            every.append(ProfileBatches(profile_dir, *trainer.profile_batches))
        if not model.optimizer.built:
            # as Keras does under a distribution strategy (in its scope, where the variables must be
            # made): built at trace time instead, the optimizer's variables would make tf.function
            # trace the training step twice (seconds per run; ~20 s for MobileNetV2 on 2 cores)
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        with interrupt_between_batches() as stop_on_interrupt:
            history = model.fit(self.train_dataset(initial_epoch, epochs), validation_data=val_ds, epochs=epochs,
                                initial_epoch=initial_epoch, steps_per_epoch=self.steps,
                                callbacks=[*every, stop_on_interrupt], shuffle=False,
                                verbose=progress_verbosity(trainer.progress))
        curves = {k: [float(v) for v in values] for k, values in history.history.items()}
        if averaging is None:
            return FitResult(best.best_epoch, best.best_logs, curves)
        return self._averaged(model, averaging, initial_epoch + len(history.epoch), best, curves)

    def _averaged(self, model, averaging: WeightAveraging, last_epoch: int, best: BestEpoch, curves) -> FitResult:
        """The average of the epochs `averaging` summed, BatchNorm statistics recomputed for it (over
        bn_recalibration_batches training batches, a whole epoch's if that is 0), validated."""
        if not averaging.count:
            log.warning("trainer.swa: training stopped after epoch %d, before epoch %d, the first to average: "
                        "the best epoch is kept", last_epoch, averaging.first_epoch)
            return FitResult(best.best_epoch, best.best_logs, curves)
        averaging.apply(model)
        recalibrate_batchnorm(model, self._recalibration_batches(last_epoch))
        scores = model.evaluate(self.val_dataset(), return_dict=True, verbose=0)
        log.info("trainer.swa: the average of epochs %d-%d scores %s", last_epoch - averaging.count + 1, last_epoch,
                 ", ".join(f"val_{k} {v:.4f}" for k, v in scores.items()))
        return FitResult(last_epoch, {f"val_{k}": float(v) for k, v in scores.items()}, curves, averaging.count)

    def _recalibration_batches(self, epoch: int) -> tf.data.Dataset:
        # its own seed stream, so recalibrating never shifts the training batches' order
        return make_dataset(self.data.images, self.data.labels, self.train_indices, self.cfg.trainer.batch_size,
                            shuffle=True, augment=self.augment, seed=self.cfg.trainer.seed + 7919,
                            epochs=(epoch, epoch + 1)).take(self.cfg.trainer.bn_recalibration_batches or -1)  # 0: all

