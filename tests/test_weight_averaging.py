"""Weight averaging: `optimizer.ema` (Keras optimizers' own moving average of the weights) and
`trainer.swa` (the mean of the last epochs' weights, BatchNorm recomputed)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import TINY_RUN, compose_config, run_cli, store_overrides
from mlflow.tracking import MlflowClient

from histo_transfer.data.loading import load_training_data
from histo_transfer.training.checkpoints import Checkpoints, EpochCheckpoint, Progress, ResumeState
from histo_transfer.training.session import BestEpoch, TrainingSession, WeightAveraging

EMA = ["optimizer.ema=true", "optimizer.ema_momentum=0.9", "head.dropout=0.0"]  # no dropout: runs repeat exactly
SWA = ["trainer.epochs=3", "trainer.swa=2", "head.dropout=0.0"]


def _session(tmp_path_factory, overrides):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path_factory.mktemp("averaging")), *overrides])
    return TrainingSession(cfg, load_training_data(cfg.data))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return _session(tmp_path_factory, EMA)


@pytest.fixture(scope="module")
def swa_session(tmp_path_factory):
    return _session(tmp_path_factory, SWA)


class _Record(keras.callbacks.Callback):
    """The raw weights and the optimizer's averages after the last training step; the model's weights at
    each epoch's end (what BestEpoch and the checkpoints take)."""

    def __init__(self):
        super().__init__()
        self.raw, self.average, self.epoch_end, self.statistics = None, None, {}, {}

    def on_train_batch_end(self, batch, logs=None):
        self.raw = [v.numpy() for v in self.model.trainable_variables]
        averages = getattr(self.model.optimizer, "_model_variables_moving_average", [])  # optimizer.ema only
        self.average = [v.numpy() for v in averages]

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end[epoch] = [v.numpy() for v in self.model.trainable_variables]
        self.statistics[epoch] = _batchnorm_statistics(self.model)


def _batchnorm_statistics(model):
    return [v.numpy() for v in model.non_trainable_variables if "moving" in v.path]


def _trainable(model):
    return [v.numpy() for v in model.trainable_variables]


def _new_model(session):
    keras.utils.set_random_seed(0)
    model, _, callbacks = session.build_model()
    return model, callbacks


def _same(a, b, atol=1e-6) -> bool:
    return all(np.allclose(x, y, atol=atol) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_the_averaged_weights_are_validated_and_kept_and_differ_from_the_raw_ones(session):
    model, callbacks = _new_model(session)
    record = _Record()
    result = session.fit(model, epochs=1, callbacks=[*callbacks], after_best=[record])
    kept = _trainable(model)
    assert _same(kept, record.average)  # the model leaves fit with the optimizer's average ...
    assert _same(record.epoch_end[0], record.average)  # ... which is what an epoch's end hands on
    assert not _same(kept, record.raw, atol=1e-4)  # and it is not the last step's raw weights
    # the epoch's validation scored these very weights: scoring them again gives the same AUC
    again = model.evaluate(session.val_dataset(), return_dict=True, verbose=0)
    assert again["auc"] == pytest.approx(result.best["val_auc"], abs=1e-6)


@pytest.mark.slow
def test_a_run_resumed_from_its_checkpoint_averages_as_if_never_stopped(session, tmp_path):
    """A checkpoint holds the average in the model and the raw weights in the optimizer: resuming swaps
    them back before training on (trained on from the average instead, it would drift)."""
    model, callbacks = _new_model(session)
    record, state = _Record(), tmp_path / "state.keras"
    save_epoch_1 = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: model.save(state) if epoch == 0 else None)
    session.fit(model, epochs=2, callbacks=[*callbacks], after_best=[record, save_epoch_1])  # as EpochCheckpoint saves
    for from_checkpoint, same in ((True, True), (False, False)):
        resumed, again = keras.models.load_model(state), _Record()
        session.fit(resumed, epochs=2, initial_epoch=1, after_best=[again], from_checkpoint=from_checkpoint)
        assert _same(again.epoch_end[1], record.epoch_end[1], atol=1e-5) is same


@pytest.mark.slow
def test_swa_keeps_the_mean_of_the_last_epochs_with_batchnorm_recomputed(swa_session):
    model, callbacks = _new_model(swa_session)
    record = _Record()
    result = swa_session.fit(model, callbacks=[*callbacks], after_best=[record])
    assert (result.averaged_epochs, result.best_epoch) == (2, 3)
    mean = [(second + third) / 2 for second, third in zip(record.epoch_end[1], record.epoch_end[2])]
    assert _same(_trainable(model), mean)
    assert not _same(_batchnorm_statistics(model), record.statistics[2], atol=1e-4)  # recomputed for the mean
    again = model.evaluate(swa_session.val_dataset(), return_dict=True, verbose=0)
    assert again["auc"] == pytest.approx(result.best["val_auc"], abs=1e-6)  # the scores are the mean's


@pytest.mark.slow
def test_swa_resumed_from_a_checkpoint_continues_the_sum(swa_session, tmp_path):
    def fit(model, resumed: ResumeState | None = None):
        progress = resumed.progress if resumed else Progress("run", 0)
        best = BestEpoch(swa_session.objective, progress.best_epoch, progress.best_logs,
                         resumed.best_weights() if resumed else None)
        averaging = WeightAveraging.for_trainer(swa_session.cfg.trainer, resumed and resumed.averaged_sum(),
                                                progress.averaged_epochs)
        swa_session.fit(model, initial_epoch=progress.epoch, best=best, averaging=averaging,
                        after_best=[EpochCheckpoint(checkpoints, best, progress, averaging)])
        return _trainable(model)

    checkpoints = Checkpoints(tmp_path, "run")
    straight = fit(_new_model(swa_session)[0])
    folder = checkpoints.folder / "epoch_0002"  # kept: the last epoch's state and the one before
    state = ResumeState(Progress(**json.loads((folder / "progress.json").read_text())), folder)
    assert state.progress.averaged_epochs == 1 and len(state.averaged_sum()) == len(straight)
    assert _same(fit(state.model(), state), straight, atol=1e-5)


@pytest.mark.slow
def test_train_py_with_ema_and_swa_records_them_and_saves_the_average(tmp_path):
    result = run_cli([*TINY_RUN, *store_overrides(tmp_path), *EMA, *SWA])
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs(["1"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["optimizer.ema"], run.data.params["trainer.swa"]) == ("True", "2")
    assert run.data.metrics["swa_epochs"] == 2 and "for the average of epochs 2-3" in run.data.tags["mlflow.note.content"]
    model = keras.models.load_model(client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path)))
    assert model.optimizer.use_ema  # the saved model carries the optimizer that averaged it
