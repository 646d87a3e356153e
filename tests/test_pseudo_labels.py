"""Pseudo-labels (pseudo.data, pseudo.teacher): which patches are kept, how they join the training batches,
and a run that trains on them without touching its validation split."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import TINY_RUN, compose_config, store_overrides
from mlflow.tracking import MlflowClient
from PIL import Image

from histo_transfer.config.errors import ConfigError
from histo_transfer.data.folders import unlabelled_folder
from histo_transfer.data.loading import load_training_data
from histo_transfer.data.pipeline import ExtraPatches, make_dataset
from histo_transfer.evaluation.inference import predict_probabilities
from histo_transfer.tasks.train import main as train
from histo_transfer.tasks.validation import validate
from histo_transfer.workflows import pseudo_labels
from histo_transfer.training.session import TrainingSession
from histo_transfer.workflows.pseudo_labels import PseudoLabelled, confident


def test_exactly_the_patches_the_teacher_is_sure_of_are_kept():
    probabilities = np.array([0.99, 0.5, 0.02, 0.95, 0.0501, 0.949, 0.05, 1.0], np.float32)
    assert confident(probabilities, 0.95).tolist() == [0, 2, 3, 6, 7]


def test_extra_patches_join_each_epoch_once_with_their_weight_and_labels():
    main_images = np.stack([np.full((96, 96, 3), i, np.uint8) for i in range(10)])  # pixel value = patch number
    extra_images = np.stack([np.full((96, 96, 3), 100 + i, np.uint8) for i in range(6)])
    extra = ExtraPatches(extra_images, np.array([1, 0, 1, 1, 0, 0], np.int8), np.array([0, 2, 5]), weight=0.25)
    labels = np.arange(10) % 2
    dataset = make_dataset(main_images, labels, np.array([1, 3, 4, 8]), 3, shuffle=True, seed=1, epochs=(0, 2),
                           extra=extra)
    seen = [(int(x[k, 0, 0, 0]), float(y[k, 0]), float(w[k])) for x, y, w in dataset.as_numpy_iterator()
            for k in range(len(x))]
    expected = {(1, 1.0, 1.0), (3, 1.0, 1.0), (4, 0.0, 1.0), (8, 0.0, 1.0), (100, 1.0, 0.25), (102, 1.0, 0.25),
                (105, 0.0, 0.25)}
    assert sorted(seen[:7]) == sorted(expected) and sorted(seen[7:]) == sorted(expected)  # each epoch: each once
    assert seen[:7] != seen[7:]  # reshuffled per epoch, the extra patches mixed in


def test_pseudo_keys_are_checked(tmp_path):
    for overrides, key in ((["pseudo.data=holdout"], "pseudo.teacher"), (["pseudo.teacher=x.keras"], "pseudo.data"),
                           ([f"pseudo.data={tmp_path / 'none'}", "pseudo.teacher=x.keras"], "pseudo.data"),
                           (["pseudo.data=holdout", "pseudo.teacher=x.keras", "pseudo.threshold=0.4"], "pseudo.threshold")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose_config([*TINY_RUN, *overrides]), training=True)


def test_holdout_is_the_data_sources_unlabelled_patches(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path), "pseudo.data=holdout", "pseudo.teacher=x.keras"])
    load_training_data(cfg.data)  # generates the built-in data set
    assert len(pseudo_labels._unlabelled(cfg).ids) == 8  # TINY_RUN's data.n_test


def test_a_session_trains_on_its_patches_and_the_kept_ones_and_validates_on_its_own(tmp_path):
    cfg = compose_config([*TINY_RUN, *store_overrides(tmp_path)])
    data = load_training_data(cfg.data)
    count = len(data.labels)
    pseudo = PseudoLabelled(data.patches, np.arange(10), np.zeros(count, np.int8), np.zeros(count, np.float32), 0.5)
    session = TrainingSession(cfg, data, pseudo=pseudo)
    trained = [w for _, _, w in session.train_dataset(0, 1).as_numpy_iterator()]
    assert sum(len(w) for w in trained) == len(data.train_indices) + 10 == sum(w.sum() for w in trained) + 5
    assert session.steps == len(trained)
    assert sum(len(y) for _, y in session.val_dataset().as_numpy_iterator()) == len(data.val_indices)


@pytest.mark.slow
def test_a_run_trains_on_a_folders_confident_patches_and_validates_on_true_labels_only(teacher_file, tmp_path):
    folder = tmp_path / "other-lab" / "slides"
    folder.mkdir(parents=True)
    overrides = [*TINY_RUN, *store_overrides(tmp_path), f"pseudo.data={folder.parent}", f"pseudo.teacher={teacher_file}"]
    cfg = compose_config(overrides)
    data = load_training_data(cfg.data)
    for number, index in enumerate(np.random.default_rng(0).choice(len(data.labels), 24, replace=False)):
        Image.fromarray(np.asarray(data.images[index])).save(folder / f"p{number:02d}.png")  # unlabelled copies
    unlabelled = unlabelled_folder(folder.parent, cfg.data.cache_dir)
    probabilities = predict_probabilities(keras.models.load_model(teacher_file), unlabelled.images, progress=False)
    threshold = 0.5 + float(np.median(np.abs(probabilities - 0.5)))  # about half of them sure enough
    kept = confident(probabilities, threshold)
    assert 0 < len(kept) < 24, probabilities

    train(compose_config([*overrides, f"pseudo.threshold={threshold}"]))
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs(["1"])
    assert run.info.status == "FINISHED"
    assert (run.data.metrics["n_pseudo_kept"], run.data.metrics["n_pseudo_dropped"]) == (len(kept), 24 - len(kept))
    assert run.data.tags["pseudo_teacher"] == str(teacher_file)
    inputs = {i.tags[0].value: json.loads(i.dataset.profile)["num_rows"] for i in run.inputs.dataset_inputs}
    # the pseudo-labelled set is a dataset of its own; validation is the labelled split, as without them
    assert inputs == {"training": len(data.train_indices), "validation": len(data.val_indices),
                      "pseudo-labelled": len(kept)}
    assert run.data.metrics["n_val"] == len(data.val_indices)
