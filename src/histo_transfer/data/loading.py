"""From a data config to decoded training and validation patches."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer.data.images import read_patches
from histo_transfer.data.layout import fingerprint, read_labelled
from histo_transfer.data.split import split_indices
from histo_transfer.data.synthetic import ensure_synthetic

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    root: Path
    fingerprint: str
    ids: np.ndarray  # of the patches in `images`, training ones first
    images: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8
    train_indices: np.ndarray  # into images/labels
    val_indices: np.ndarray


def data_root(data_cfg) -> Path:
    """The Kaggle-layout folder of this config, generating the built-in data when needed."""
    root = Path(data_cfg.root).expanduser().resolve()
    if data_cfg.name == "synthetic":
        ensure_synthetic(root, data_cfg.n_train, data_cfg.n_test)
    return root


def load_training_data(data_cfg) -> TrainingData:
    root = data_root(data_cfg)
    patches = read_labelled(root)
    train, val = split_indices(patches.labels, data_cfg.frac, data_cfg.val_split, data_cfg.seed)
    chosen = np.concatenate([train, val])  # decode only the subsample
    started = time.perf_counter()
    paths = patches.paths()
    images = read_patches([paths[i] for i in chosen])
    log.info("decoded %d patches from %s in %.1f s (train %d, val %d)",
             len(chosen), root, time.perf_counter() - started, len(train), len(val))
    return TrainingData(
        root=root,
        fingerprint=fingerprint(root),
        ids=patches.ids[chosen],
        images=images,
        labels=patches.labels[chosen],
        train_indices=np.arange(len(train)),
        val_indices=np.arange(len(train), len(chosen)),
    )
