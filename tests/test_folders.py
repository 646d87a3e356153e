"""data=folders: the class-per-folder layout, its bad cases, class mapping, given or split validation,
predict.py on a test folder, and a short run on the real 21,873-patch PCam folders."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from conftest import MOBILENET_V1_WEIGHTS, PCAM_FOLDERS, TINY_MODEL, compose_config, run_cli, store_overrides
from mlflow.tracking import MlflowClient
from PIL import Image

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.loading import load_training_data
from histo_transfer.tasks.train import validate as validate_training


def write_folders(root, counts=(6, 4), classes=("0", "1"), split="train", suffix=".jpg", seed=0):
    """A class-per-folder split of random RGB patches; returns the ids by class."""
    rng = np.random.default_rng(seed)
    ids = {}
    for name, count in zip(classes, counts):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        ids[name] = []
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
                root / split / name / f"p{index}{suffix}")
            ids[name].append(f"{name}/p{index}")
    return ids


def config(tmp_path, root, *extra):
    return compose_config([*store_overrides(tmp_path), "data=folders", f"data.root={root}", *extra])


def load(tmp_path, root, *extra):
    cfg = config(tmp_path, root, *extra)
    validate_training(cfg)
    return load_training_data(cfg.data)


def test_layout_ids_and_labels(tmp_path):
    root = tmp_path / "set"
    ids = write_folders(root, counts=(10, 10))
    data = load(tmp_path, root)
    by_id = dict(zip(data.patches.ids, data.labels))
    assert sorted(by_id) == sorted(ids["0"] + ids["1"])
    assert {by_id[i] for i in ids["0"]} == {0} and {by_id[i] for i in ids["1"]} == {1}
    assert len(data.train_indices) == 16 and len(data.val_indices) == 4  # data.val_split=0.2, stratified
    first = Image.open(root / "train" / "1" / "p0.jpg")
    assert np.array_equal(data.images[list(data.patches.ids).index("1/p0")], np.asarray(first))


def test_class_folders_are_packed_mixed_so_a_shuffle_buffer_smaller_than_the_split_still_mixes_them(tmp_path,
                                                                                                   monkeypatch):
    """Packed class after class, an epoch shuffled through a buffer of 8 patches begins with class 0 only."""
    from histo_transfer.data import pipeline

    root = tmp_path / "set"
    write_folders(root, counts=(24, 24))
    data = load(tmp_path, root)
    assert 8 <= data.labels[:24].sum() <= 16  # the first half of the packed set holds both classes
    assert list(load(tmp_path, root).patches.ids) == list(data.patches.ids)  # the same order every time
    monkeypatch.setattr(pipeline, "SHUFFLE_BUFFER", 8)
    first = next(iter(pipeline.make_dataset(data.images, data.labels, data.train_indices, 8, shuffle=True, seed=0)))
    assert 0 < first[1].numpy().sum() < 8


def test_classes_map_named_folders_to_labels(tmp_path):
    root = tmp_path / "set"
    ids = write_folders(root, classes=("normal", "tumor"), suffix=".png")
    data = load(tmp_path, root, "data.classes=[normal,tumor]")
    by_id = dict(zip(data.patches.ids, data.labels))
    assert by_id[ids["tumor"][0]] == 1 and by_id[ids["normal"][0]] == 0


def test_given_validation_folder_is_used_as_is(tmp_path):
    root = tmp_path / "set"
    write_folders(root, counts=(10, 10))
    write_folders(root, counts=(3, 2), split="valid", seed=1)
    data = load(tmp_path, root, "data.val_dir=valid", "data.frac=0.5")
    assert sorted(data.patches.ids[data.val_indices]) == ["valid/0/p0", "valid/0/p1", "valid/0/p2", "valid/1/p0",
                                                         "valid/1/p1"]
    assert len(data.train_indices) == 10 and all(i.startswith("train/") for i in data.patches.ids[data.train_indices])


def test_other_folders_and_files_are_ignored_and_reported(tmp_path, caplog):
    root = tmp_path / "set"
    write_folders(root)
    write_folders(root, counts=(2,), classes=("unsure",))
    (root / "train" / "1" / "notes.txt").write_text("not a patch")
    labelled_ids = load(tmp_path, root).patches.ids
    assert not any(i.startswith("unsure") for i in labelled_ids) and len(labelled_ids) == 10
    assert "2 files or folders" in caplog.text and "train/unsure/" in caplog.text


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"\xff\xd8 not really a jpeg"), "corrupt or unreadable image"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or unreadable image"),
    (lambda p: Image.fromarray(np.zeros((96, 96), np.uint8)).save(p, format="JPEG"), "96x96 L; expected 96x96 RGB"),
    (lambda p: Image.new("CMYK", (96, 96)).save(p, format="JPEG"), "96x96 CMYK; expected 96x96 RGB"),
    (lambda p: Image.new("RGB", (64, 64)).save(p, format="JPEG"), "64x64 RGB; expected 96x96 RGB"),
])
def test_bad_jpeg_names_the_file(tmp_path, make, message):
    root = tmp_path / "set"
    write_folders(root)
    bad = root / "train" / "1" / "p2.jpg"
    make(bad)
    with pytest.raises(DataError, match=f"{bad}: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, root)


@pytest.mark.parametrize(("mode", "described"), [("RGBA", "RGBA"), ("P", "P"), ("L", "L")])
def test_png_that_is_not_rgb_names_the_file(tmp_path, mode, described):
    root = tmp_path / "set"
    write_folders(root, suffix=".png")
    bad = root / "train" / "0" / "p1.png"
    Image.new(mode, (96, 96)).save(bad)
    with pytest.raises(DataError, match=f"{bad}: image is 96x96 {described}; expected 96x96 RGB"):
        load(tmp_path, root)


def test_corrupt_png_and_skip_policy(tmp_path):
    root = tmp_path / "set"
    write_folders(root, counts=(10, 10), suffix=".png")
    (root / "train" / "0" / "p3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="p3.png: corrupt or unreadable image"):
        load(tmp_path, root)
    data = load(tmp_path, root, "data.on_bad_image=skip")
    assert len(data.train_indices) + len(data.val_indices) == 19 and "0/p3" in data.patches.bad_report()


def test_missing_and_empty_class_folders(tmp_path):
    root = tmp_path / "set"
    write_folders(root, counts=(3,), classes=("0",))
    with pytest.raises(ConfigError, match="data.classes: .*train has no class folder '1'"):
        validate_training(config(tmp_path, root))
    (root / "train" / "1").mkdir()
    with pytest.raises(DataError, match=f"{root / 'train' / '1'}: class folder holds no images"):
        load(tmp_path, root)


def test_unreadable_file_is_named(tmp_path):
    root = tmp_path / "set"
    write_folders(root)
    (root / "train" / "0" / "gone.jpg").symlink_to(root / "train" / "0" / "missing.jpg")  # dangling, inside root
    with pytest.raises(DataError, match="gone.jpg: corrupt or unreadable image"):
        load(tmp_path, root)


def test_symlink_outside_the_root_is_refused(tmp_path):
    root = tmp_path / "set"
    write_folders(root)
    outside = tmp_path / "elsewhere.jpg"
    Image.new("RGB", (96, 96)).save(outside)
    (root / "train" / "1" / "link.jpg").symlink_to(outside)
    with pytest.raises(DataError, match="link.jpg: symbolic link points outside the data root"):
        load(tmp_path, root)


def test_file_name_that_is_not_utf8_is_named(tmp_path):
    root = tmp_path / "set"
    write_folders(root)
    folder = os.fsencode(root / "train" / "1")
    with open(os.path.join(folder, b"bad\xff.jpg"), "wb") as out:
        out.write((root / "train" / "1" / "p0.jpg").read_bytes())
    with pytest.raises(DataError, match=r"bad\\xff\.jpg: file name is not valid UTF-8"):
        load(tmp_path, root)


def test_cli_reports_a_bad_folder_in_one_line(tmp_path):
    root = tmp_path / "set"
    write_folders(root)
    (root / "train" / "0" / "p1.jpg").write_bytes(b"broken")
    result = run_cli(["data=folders", f"data.root={root}", *store_overrides(tmp_path)], script="scripts/prepare_data.py")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"error: {root / 'train' / '0' / 'p1.jpg'}: corrupt") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_predict_scores_a_test_folder_by_relative_path(tmp_path):
    root = tmp_path / "set"
    write_folders(root, counts=(12, 12))
    (root / "test" / "batch1").mkdir(parents=True)
    for name in ("a.jpg", "batch1/b.png"):
        Image.fromarray(np.full((96, 96, 3), 120, np.uint8)).save(root / "test" / name)
    train = run_cli([*TINY_MODEL, "trainer.epochs=1", "data=folders", f"data.root={root}", *store_overrides(tmp_path)])
    assert train.returncode == 0, train.stderr[-3000:]
    [run] = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_runs(["1"])
    output = tmp_path / "submission.csv"
    result = run_cli([f"model={run.info.run_id}", "data=folders", f"data.root={root}", "data.test_dir=test",
                      f"output={output}", *store_overrides(tmp_path)], script="predict.py")
    assert result.returncode == 0, result.stderr[-3000:]
    submission = pd.read_csv(output)
    assert sorted(submission["id"]) == ["a", "batch1/b"] and submission["label"].between(0, 1).all()


@pytest.mark.slow
@pytest.mark.skipif(not PCAM_FOLDERS.is_dir(), reason=f"the real PCam folders are not at {PCAM_FOLDERS}")
def test_short_run_on_the_real_pcam_folders(tmp_path):
    """A few hundred real JPEG patches with the offline MobileNet v1 weights learn something."""
    result = run_cli(["data=folders", f"data.root={PCAM_FOLDERS}", "data.frac=0.03", "backbone=mobilenet_v1",
                      f"backbone.weights={MOBILENET_V1_WEIGHTS}", "backbone.fine_tune_fraction=1.0",
                      "trainer.epochs=3", "trainer.early_stopping_patience=0", "head.bn_momentum=0.9",
                      *store_overrides(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_runs(["1"])
    assert run.data.metrics["n_train"] + run.data.metrics["n_val"] == 569  # 3 % of train/'s 18,997, rounded down
    assert run.data.metrics["best_val_auc"] > 0.7  # 0.79 measured
