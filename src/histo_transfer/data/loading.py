"""From a data config to the packed patches and the indices to train and validate on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer.data.cache import PackedPatches
from histo_transfer.data.sources import data_source

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    root: Path
    fingerprint: str
    patches: PackedPatches  # everything in the cache; images memory-mapped
    train_indices: np.ndarray  # into patches
    val_indices: np.ndarray
    unlisted: list[str]  # files in the source that are not part of the data set (ignored)

    @property
    def images(self) -> np.ndarray:
        return self.patches.images

    @property
    def labels(self) -> np.ndarray:
        return self.patches.labels


def load_training_data(data_cfg) -> TrainingData:
    source = data_source(data_cfg)
    labelled = source.labelled()
    patches = labelled.patches
    usable = patches.usable(data_cfg.on_bad_image)
    if len(usable) < len(patches.ids):
        log.warning("data.on_bad_image=skip: training without %d bad images", len(patches.ids) - len(usable))
    train, val = source.split(patches, usable)
    log.info("data %s: %d training and %d validation patches", data_cfg.name, len(train), len(val))
    return TrainingData(labelled.root, labelled.fingerprint, patches, np.sort(train), np.sort(val), labelled.unlisted)


def prepare(cfg, context=None) -> None:
    """`scripts/prepare_data.py`: check the data and build its packed cache ahead of training."""
    source = data_source(cfg.data)
    labelled = source.labelled()
    patches, unlisted = labelled.patches, labelled.unlisted
    usable = patches.usable(cfg.data.on_bad_image)
    print(f"{labelled.root}: {len(patches.ids)} labelled patches ({int((patches.labels == 1).sum())} with label 1), "
          f"fingerprint {labelled.fingerprint}\n  cache: {patches.folder}")
    if unlisted:
        print(f"  {len(unlisted)} files without a row in train_labels.csv (ignored), e.g. {unlisted[0]}")
    if len(usable) < len(patches.ids):
        print(f"  {len(patches.ids) - len(usable)} bad images left out (data.on_bad_image=skip):\n"
              + "".join(f"    {line}\n" for line in patches.bad_report().splitlines()))
    holdout = source.holdout()
    if holdout is not None:
        holdout.usable("error")  # every test patch must be scored
        print(f"  test: {len(holdout.ids)} patches, cache: {holdout.folder}")
