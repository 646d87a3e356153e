"""The official PCam HDF5 files (plain and gzipped) with their official splits."""

from __future__ import annotations

import gzip
import shutil

import h5py
import numpy as np
import pytest
from conftest import compose_config, store_overrides

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.loading import load_training_data
from histo_transfer.tasks.train import validate as validate_training

SIZES = {"train": 40, "valid": 12, "test": 8}


def write_pcam(root, gzipped=("valid",)):
    """Official file names and shapes: x (N, 96, 96, 3) uint8, y (N, 1, 1, 1)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in SIZES.items():
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        arrays[split] = (x, y)
        for kind, data in (("x", x), ("y", y)):
            path = root / f"camelyonpatch_level_2_split_{split}_{kind}.h5"
            with h5py.File(path, "w") as h5:
                h5.create_dataset(kind, data=data, chunks=True)
            if split in gzipped:
                with open(path, "rb") as source, gzip.open(f"{path}.gz", "wb") as target:
                    shutil.copyfileobj(source, target)
                path.unlink()
    return arrays


def test_official_splits_become_train_and_validation(tmp_path):
    arrays = write_pcam(tmp_path / "pcam")
    cfg = compose_config(["data=pcam_h5", f"data.root={tmp_path / 'pcam'}", *store_overrides(tmp_path)])
    validate_training(cfg)
    data = load_training_data(cfg.data)
    assert len(data.train_indices) == 40 and len(data.val_indices) == 12  # the official sizes
    assert np.array_equal(data.images[data.train_indices], arrays["train"][0])
    assert np.array_equal(data.images[data.val_indices], arrays["valid"][0])  # read from the .gz
    assert np.array_equal(data.labels[data.val_indices], arrays["valid"][1].reshape(-1))
    assert not list((tmp_path / "pcam").glob(".*inflating*"))  # scratch copies removed


def test_frac_subsamples_only_the_training_split(tmp_path):
    write_pcam(tmp_path / "pcam", gzipped=())
    cfg = compose_config(["data=pcam_h5", f"data.root={tmp_path / 'pcam'}", "data.frac=0.5",
                          *store_overrides(tmp_path)])
    data = load_training_data(cfg.data)
    assert len(data.train_indices) == 20 and len(data.val_indices) == 12
    assert data.labels[data.train_indices].mean() == 0.5


def test_missing_files_are_a_config_error(tmp_path):
    write_pcam(tmp_path / "pcam")
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_train_y.h5").unlink()
    cfg = compose_config(["data=pcam_h5", f"data.root={tmp_path / 'pcam'}"])
    with pytest.raises(ConfigError, match="lacks the PCam files camelyonpatch_level_2_split_train_y.h5"):
        validate_training(cfg)


def test_broken_gzip_names_the_file(tmp_path):
    write_pcam(tmp_path / "pcam")
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_valid_x.h5.gz").write_bytes(b"\x1f\x8b\x08broken")
    cfg = compose_config(["data=pcam_h5", f"data.root={tmp_path / 'pcam'}", *store_overrides(tmp_path)])
    with pytest.raises(DataError, match="camelyonpatch_level_2_split_valid_x.h5.gz: broken gzip file"):
        load_training_data(cfg.data)
    assert not list((tmp_path / "cache" / "packed").glob("pcam-*"))  # no cache from a failed build


def test_official_test_split_is_the_test_set(tmp_path):
    from histo_transfer.data.sources import data_source

    arrays = write_pcam(tmp_path / "pcam", gzipped=("test",))
    cfg = compose_config(["data=pcam_h5", f"data.root={tmp_path / 'pcam'}", *store_overrides(tmp_path)])
    test = data_source(cfg.data).holdout()
    assert np.array_equal(test.images, arrays["test"][0])
    assert np.array_equal(test.labels, arrays["test"][1].reshape(-1))
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5.gz").unlink()
    assert data_source(cfg.data).holdout() is None
