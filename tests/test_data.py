"""Kaggle layout reading, built-in data, splits, decoding and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PCAM_SAMPLE, write_kaggle_layout
from PIL import Image

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.images import read_patch, read_patches
from histo_transfer.data.kaggle import fingerprint, read_labelled, unlabelled_ids
from histo_transfer.data.split import split_indices
from histo_transfer.data.synthetic import COMPLETE_MARKER, ensure_synthetic


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "v1", n_train=200, n_test=10)


def test_synthetic_data_is_a_kaggle_layout_with_a_centre_signal(synthetic_root):
    patches = read_labelled(synthetic_root)
    assert len(patches.ids) == 200 and len(unlabelled_ids(synthetic_root)) == 10
    assert 0.3 < patches.labels.mean() < 0.5  # about Kaggle's 40 % positives
    images = read_patches(patches.paths()).astype(float)
    centre = images[:, 32:64, 32:64].mean(axis=(1, 2, 3))
    # tumour nuclei are dark, so label 1 centres are darker on average; the border is alike
    assert centre[patches.labels == 1].mean() < centre[patches.labels == 0].mean() - 10
    border = images[:, :16].mean(axis=(1, 2, 3))
    assert abs(border[patches.labels == 1].mean() - border[patches.labels == 0].mean()) < 5


def test_synthetic_data_is_deterministic_and_reused(synthetic_root, tmp_path):
    again = ensure_synthetic(tmp_path / "again", n_train=200, n_test=10)
    first = sorted(p.name for p in (synthetic_root / "train").iterdir())
    assert first == sorted(p.name for p in (again / "train").iterdir())
    name = first[0]
    assert (synthetic_root / "train" / name).read_bytes() == (again / "train" / name).read_bytes()
    stamp = (again / "train_labels.csv").stat().st_mtime_ns
    ensure_synthetic(again, n_train=200, n_test=10)
    assert (again / "train_labels.csv").stat().st_mtime_ns == stamp


def test_interrupted_generation_is_never_read(tmp_path):
    root = tmp_path / "v1"
    (root / "train").mkdir(parents=True)
    (root / "train_labels.csv").write_text("id,label\nhalf-written,1\n")  # no completion marker
    ensure_synthetic(root, n_train=30, n_test=0)
    assert (root / COMPLETE_MARKER).exists()
    assert len(read_labelled(root).ids) == 30
    assert not list(tmp_path.glob("*.tmp-*"))


def test_crlf_labels_are_read(tmp_path):
    ids = write_kaggle_layout(tmp_path, [0, 1, 1])
    assert b"\r\n" in (tmp_path / "train_labels.csv").read_bytes()
    patches = read_labelled(tmp_path)
    assert patches.ids.tolist() == ids and patches.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(("csv", "message"), [
    ("id,lab\n{0},1\n", "columns are id,lab; expected exactly id,label"),
    ("id,label\n{0},2\n", "row 2: label '2' is not 0 or 1"),
    ("id,label\n{0},\n", "row 2: label '' is not 0 or 1"),
    ("id,label\n{0},1\n{0},0\n", "row 3: id {0} appears more than once"),
    ("id,label\n", "has a header but no rows"),
    ("", "file is empty"),
    ("id,label\n../{0},1\n", "row 2: id '../{0}' is not a plain file name"),
    ("id,label\n{0},1\nmissing,0\n", "missing.tif: listed in"),
])
def test_bad_labels_file_names_the_row(tmp_path, csv, message):
    [image_id] = write_kaggle_layout(tmp_path, [1])
    (tmp_path / "train_labels.csv").write_text(csv.format(image_id))
    with pytest.raises(DataError, match=message.format(image_id).replace(".", r"\.").replace("(", r"\(")):
        read_labelled(tmp_path)


def test_non_utf8_labels_file(tmp_path):
    write_kaggle_layout(tmp_path, [1])
    (tmp_path / "train_labels.csv").write_bytes("id,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_labelled(tmp_path)


@pytest.mark.parametrize(("size", "mode", "message"), [
    ((64, 64), "RGB", "image is 64x64 RGB; expected 96x96 RGB"),
    ((96, 96), "L", "image is 96x96 L"),
    ((96, 96), "RGBA", "image is 96x96 RGBA"),
])
def test_wrong_image_shape_names_the_file(tmp_path, size, mode, message):
    [image_id] = write_kaggle_layout(tmp_path, [0], size=size, mode=mode)
    with pytest.raises(DataError, match=f"{image_id}.tif: {message}"):
        read_patch(tmp_path / "train" / f"{image_id}.tif")


def test_corrupt_and_truncated_images_are_reported(tmp_path):
    ids = write_kaggle_layout(tmp_path, [0, 1])
    truncated = tmp_path / "train" / f"{ids[0]}.tif"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (tmp_path / "train" / f"{ids[1]}.tif").write_bytes(b"not an image")
    for image_id in ids:
        with pytest.raises(DataError, match=f"{image_id}.tif: corrupt or unreadable image"):
            read_patches([tmp_path / "train" / f"{image_id}.tif"])


def test_fingerprint_follows_the_data(tmp_path):
    ids = write_kaggle_layout(tmp_path, [0, 1])
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    Image.new("RGB", (96, 96)).save(tmp_path / "train" / f"{ids[0]}.tif", format="PNG")
    assert fingerprint(tmp_path) != before


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 600 + [1] * 400)
    train, val = split_indices(labels, frac=0.5, val_split=0.2, seed=3)
    assert len(train) + len(val) == 500 and len(val) == 100
    assert not set(train) & set(val)
    assert labels[train].mean() == pytest.approx(0.4, abs=0.01) and labels[val].mean() == pytest.approx(0.4, abs=0.01)
    again = split_indices(labels, frac=0.5, val_split=0.2, seed=3)
    assert (again[0] == train).all() and (again[1] == val).all()
    other = split_indices(labels, frac=0.5, val_split=0.2, seed=4)
    assert set(other[1]) != set(val)


def test_split_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="data.frac"):
        split_indices(np.array([0, 0, 0, 1]), frac=0.5, val_split=0.2, seed=0)


@pytest.mark.skipif(not PCAM_SAMPLE.is_dir(), reason="../shared/data/pcam_sample is absent (fresh clone)")
def test_real_pcam_sample_reads_as_kaggle_layout():
    patches = read_labelled(PCAM_SAMPLE)  # CRLF line endings, no test/ folder
    assert len(patches.ids) == 2000 and patches.labels.sum() == 1000
    assert unlabelled_ids(PCAM_SAMPLE) == []
    images = read_patches(patches.paths()[:50])
    assert images.shape == (50, 96, 96, 3) and images.dtype == np.uint8
