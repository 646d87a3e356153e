"""From a data config to the packed patches and the indices to train and validate on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer.data import pcam_h5
from histo_transfer.data.cache import ImageFiles, PackedPatches, cache_folder, packed
from histo_transfer.data.layout import IMAGE_SUFFIX, fingerprint, files_fingerprint, read_labelled, test_ids
from histo_transfer.data.split import split_indices, subsample
from histo_transfer.data.synthetic import ensure_synthetic

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    root: Path
    fingerprint: str
    patches: PackedPatches  # everything in the cache; images memory-mapped
    train_indices: np.ndarray  # into patches
    val_indices: np.ndarray
    unlisted: list[str]  # files in train/ without a CSV row (ignored)

    @property
    def images(self) -> np.ndarray:
        return self.patches.images

    @property
    def labels(self) -> np.ndarray:
        return self.patches.labels


def data_root(data_cfg) -> Path:
    """The data folder of this config, generating the built-in data when needed."""
    root = Path(data_cfg.root).expanduser().resolve()
    if data_cfg.name == "synthetic":
        ensure_synthetic(root, data_cfg.n_train, data_cfg.n_test)
    return root


def labelled_patches(data_cfg) -> tuple[Path, str, PackedPatches, list[str]]:
    """All labelled patches of the source, from the packed cache (built on first use).

    Returns the data folder, its fingerprint, the packed patches and the ignored unlisted files.
    """
    root = data_root(data_cfg)
    if data_cfg.name == "pcam_h5":
        splits = ("train", "valid")
        key = files_fingerprint(pcam_h5.source_files(root, splits))
        source = pcam_h5.H5Splits(root, splits)
        return root, key, packed(cache_folder(data_cfg.cache_dir, "pcam", key), source, data_cfg.workers), []
    listing = read_labelled(root)
    if listing.unlisted:
        log.warning("%d files in %s have no row in train_labels.csv and are ignored, e.g. %s",
                    len(listing.unlisted), root / "train", listing.unlisted[0])
    key = fingerprint(root)
    source = ImageFiles(listing.paths(), listing.ids, listing.labels, group="train")
    patches = packed(cache_folder(data_cfg.cache_dir, "train", key), source, data_cfg.workers)
    return root, key, patches, listing.unlisted


def load_training_data(data_cfg) -> TrainingData:
    root, key, patches, unlisted = labelled_patches(data_cfg)
    usable = patches.usable(data_cfg.on_bad_image)
    if len(usable) < len(patches.ids):
        log.warning("data.on_bad_image=skip: training without %d bad images", len(patches.ids) - len(usable))
    if data_cfg.name == "pcam_h5":  # the official split decides; frac subsamples the training part
        official_train = usable[patches.groups[usable] == "train"]
        train = official_train[subsample(patches.labels[official_train], data_cfg.frac, data_cfg.seed)]
        val = usable[patches.groups[usable] == "valid"]
    else:
        train, val = split_indices(patches.labels[usable], data_cfg.frac, data_cfg.val_split, data_cfg.seed)
        train, val = usable[train], usable[val]
    log.info("data %s: %d training and %d validation patches", data_cfg.name, len(train), len(val))
    return TrainingData(root, key, patches, np.sort(train), np.sort(val), unlisted)


def test_patches(data_cfg) -> PackedPatches | None:
    """The test patches, packed: a Kaggle layout's unlabelled test/ folder, or PCam's labelled
    official test split; None when the source has none."""
    root = data_root(data_cfg)
    if data_cfg.name == "pcam_h5":
        if not pcam_h5.split_file(root, "test", "x"):
            return None
        key = files_fingerprint(pcam_h5.source_files(root, ["test"]))
        return packed(cache_folder(data_cfg.cache_dir, "pcam-test", key), pcam_h5.H5Splits(root, ["test"]),
                      data_cfg.workers)
    ids = test_ids(root)
    if not ids:
        return None
    paths = [root / "test" / f"{image_id}{IMAGE_SUFFIX}" for image_id in ids]
    source = ImageFiles(paths, ids, group="test")
    return packed(cache_folder(data_cfg.cache_dir, "test", files_fingerprint(paths)), source, data_cfg.workers)


def prepare(cfg) -> None:
    """`scripts/prepare_data.py`: validate the data and build its packed cache ahead of training."""
    from histo_transfer.config import validate

    validate(cfg)
    root, key, patches, unlisted = labelled_patches(cfg.data)
    usable = patches.usable(cfg.data.on_bad_image)
    print(f"{root}: {len(patches.ids)} labelled patches ({int((patches.labels == 1).sum())} with label 1), "
          f"fingerprint {key}\n  cache: {patches.folder}")
    if unlisted:
        print(f"  {len(unlisted)} files without a row in train_labels.csv (ignored), e.g. {unlisted[0]}")
    if len(usable) < len(patches.ids):
        print(f"  {len(patches.ids) - len(usable)} bad images left out (data.on_bad_image=skip):\n"
              + "".join(f"    {line}\n" for line in patches.bad_report().splitlines()))
    test = test_patches(cfg.data)
    if test is not None:
        test.usable("error")  # every test patch must be scored
        print(f"  test: {len(test.ids)} patches, cache: {test.folder}")
