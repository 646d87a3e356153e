"""Distillation (distill.teacher): the loss, the teacher's probabilities kept once per data set, the run's
record of its teacher, resuming (a teacher that is a CV's fold ensemble: test_cross_validation.py)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TINY_RUN, compose_config, store_overrides
from mlflow.tracking import MlflowClient

from histo_transfer.config.errors import ConfigError, TrainingInterrupted
from histo_transfer.data.loading import load_training_data
from histo_transfer.evaluation.inference import predict_probabilities
from histo_transfer.tasks.train import main as train
from histo_transfer.tasks.validation import validate
from histo_transfer.training.checkpoints import EpochCheckpoint
from histo_transfer.training.distillation import DistillationLoss
from histo_transfer.tracking.schema import DISTILL_TEACHER_TAGS
from histo_transfer.workflows import teachers


def _bce(target, p):
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def test_the_loss_weighs_the_labels_and_the_teachers_softened_probabilities():
    label, teacher, student = np.array([[1.0], [0.0]]), np.array([[0.9], [0.3]]), np.array([[0.7], [0.2]])
    targets = np.concatenate([label, teacher], axis=1).astype(np.float32)

    def loss(alpha, t, y=targets):
        return float(DistillationLoss(alpha, t)(y, student.astype(np.float32)))

    def at(p, t):  # sigmoid(logit(p) / t)
        return 1 / (1 + np.exp(-np.log(p / (1 - p)) / t))

    assert loss(1.0, 2.0) == pytest.approx(_bce(label, student), rel=1e-4)  # the labels alone
    assert loss(0.0, 1.0) == pytest.approx(_bce(teacher, student), rel=1e-4)  # the teacher alone
    expected = 0.3 * _bce(label, student) + 0.7 * 4 * _bce(at(teacher, 2), at(student, 2))
    assert loss(0.3, 2.0) == pytest.approx(expected, rel=1e-4)
    assert loss(0.3, 2.0, label.astype(np.float32)) == pytest.approx(_bce(label, student), rel=1e-4)  # validation


def test_distill_keys_are_checked():
    cfg = compose_config([*TINY_RUN, "distill.teacher=x.keras", "distill.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        validate(cfg, training=True)
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        validate(compose_config([*TINY_RUN, "distill.teacher=x.keras", "tuner=random"]), training=True)


def test_a_bad_teacher_is_named_by_its_key_and_its_run_ends_failed(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), f"distill.teacher={tmp_path / 'no.keras'}"])
    with pytest.raises(ConfigError, match=r"^distill\.teacher: '.*no\.keras' is neither an MLflow run id"):
        train(cfg)
    assert [r.info.status for r in MlflowClient(cfg.tracking.uri).search_runs(["1"])] == ["FAILED"]  # not left RUNNING


@pytest.mark.slow
def test_the_teachers_probabilities_are_kept_once_and_read_back_without_the_teacher(teacher_file, tmp_path,
                                                                                    monkeypatch):
    overrides = [*TINY_RUN, *store_overrides(tmp_path), f"distill.teacher={teacher_file}", "distill.tta=flips"]
    cfg = compose_config(overrides)
    train(cfg)
    data = load_training_data(cfg.data)
    [kept] = (data.patches.folder / teachers.TEACHERS_DIR).glob("*.npy")
    expected = predict_probabilities(keras.models.load_model(teacher_file), data.images, tta="flips", progress=False)
    stored = np.load(kept)  # the training patches, as the teacher scores them with its TTA; no other
    assert np.allclose(stored[data.train_indices], expected[data.train_indices], atol=1e-6)
    assert np.isnan(np.delete(stored, data.train_indices)).all()
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs(["1"])
    assert run.info.status == "FINISHED" and run.data.tags[DISTILL_TEACHER_TAGS[0]] == str(teacher_file)
    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert val_loss and all(np.isfinite(val_loss))  # the labels' loss: validation batches carry no teacher
    saved = Path(client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path / "saved")))
    with zipfile.ZipFile(saved) as archive:  # a plain classifier: predict.py and `mlflow models serve` load it
        compiled = json.loads(archive.read("config.json"))["compile_config"]
    assert compiled["loss"]["class_name"] == "BinaryCrossentropy" and "histo_transfer" not in json.dumps(compiled)
    assert run.data.tags[DISTILL_TEACHER_TAGS[1]] == f"{teacher_file} sha256:{hashlib.sha256(teacher_file.read_bytes()).hexdigest()}"

    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded or called again")

    monkeypatch.setattr(teachers, "load_model", never)
    monkeypatch.setattr(teachers, "ensemble_probabilities", never)
    train(compose_config([*overrides, "trainer.seed=7"]))  # another run, the same teacher and data
    assert {r.info.status for r in client.search_runs(["1"])} == {"FINISHED"}
    assert len(list(kept.parent.iterdir())) == 1

    monkeypatch.undo()  # another split of the same data: only its training patches not yet scored
    scored = []
    monkeypatch.setattr(teachers, "ensemble_probabilities",
                        lambda models, images, *args: scored.append(len(images)) or np.full(len(images), 0.5, np.float32))
    other = compose_config([*overrides, "data.seed=3"])
    train(other)
    added = np.setdiff1d(load_training_data(other.data).train_indices, data.train_indices)
    assert scored == [len(added)] and 0 < len(added) < len(data.train_indices)
    assert np.array_equal(np.load(kept)[data.train_indices], stored[data.train_indices])  # kept, not recomputed


@pytest.mark.slow
def test_a_distilling_run_resumed_after_an_interruption_continues_in_the_same_run(teacher_file, tmp_path,
                                                                                   monkeypatch):
    overrides = [*TINY_RUN, *store_overrides(tmp_path), f"distill.teacher={teacher_file}", "trainer.epochs=3"]
    save = EpochCheckpoint.on_epoch_end

    def save_then_stop(self, epoch, logs=None):
        save(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt  # as Ctrl-C does, after the epoch's state is saved

    monkeypatch.setattr(EpochCheckpoint, "on_epoch_end", save_then_stop)
    with pytest.raises(TrainingInterrupted):
        train(compose_config(overrides))
    monkeypatch.setattr(EpochCheckpoint, "on_epoch_end", save)
    client = MlflowClient(compose_config(overrides).tracking.uri)
    [killed] = client.search_runs(["1"])
    assert killed.info.status == "KILLED"

    train(compose_config([*overrides, "trainer.resume=true"]))  # the checkpoint loads with the distillation loss
    [resumed] = client.search_runs(["1"])
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val_auc")] == [1, 2, 3]
    assert resumed.data.tags[DISTILL_TEACHER_TAGS[0]] == str(teacher_file)
