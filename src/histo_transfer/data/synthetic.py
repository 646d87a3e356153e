"""Built-in data: H&E-like patches generated deterministically, written in the Kaggle layout.

Label 1 patches carry a cluster of large, dark, crowded nuclei in the centre 32x32 region,
the Kaggle label rule ("tumour tissue in the centre"); every patch has scattered normal nuclei.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from histo_transfer.data.layout import IMAGE_SUFFIX, LABELS_FILE

log = logging.getLogger(__name__)

GENERATOR_SEED = 20240601  # part of the data's definition, not a training knob
POSITIVE_SHARE = 0.4  # close to Kaggle's 40.5 %
COMPLETE_MARKER = ".complete"
SIZE = 96
_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE]


def ensure_synthetic(root: Path, n_train: int, n_test: int) -> Path:
    """Generate the data set at `root` unless a complete copy is already there.

    Written to a temporary sibling and renamed, so an interrupted generation is never read.
    """
    if (root / COMPLETE_MARKER).exists():
        return root
    log.info("generating built-in synthetic data (%d train, %d test) into %s", n_train, n_test, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write(staging, n_train, n_test)
        shutil.rmtree(root, ignore_errors=True)  # a leftover without the marker is incomplete
        staging.rename(root)
    except OSError:
        if not (root / COMPLETE_MARKER).exists():  # lost a race only if the winner finished
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write(folder: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(GENERATOR_SEED)
    labels = (rng.random(n_train) < POSITIVE_SHARE).astype(int)
    rows = [f"{_save(folder, 'train', index, rng, bool(label))},{label}\n" for index, label in enumerate(labels)]
    (folder / LABELS_FILE).write_text("id,label\n" + "".join(rows))
    for index in range(n_test):  # unlabelled, like Kaggle's test/
        _save(folder, "test", index, rng, bool(rng.random() < POSITIVE_SHARE))
    (folder / COMPLETE_MARKER).write_text("synthetic v1\n")


def _save(folder: Path, split: str, index: int, rng: np.random.Generator, tumour: bool) -> str:
    image_id = hashlib.sha1(f"synthetic-{split}-{index}".encode()).hexdigest()
    (folder / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_patch(rng, tumour)).save(folder / split / f"{image_id}{IMAGE_SUFFIX}")
    return image_id


def synthetic_patch(rng: np.random.Generator, tumour: bool) -> np.ndarray:
    """One 96x96 RGB uint8 patch: pink stroma, scattered nuclei, and a central tumour cluster if asked."""
    stroma = np.array([232.0, 182.0, 206.0]) + rng.normal(0, 8, 3)
    coarse = rng.normal(0, 12, (12, 12, 1))
    image = stroma + np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 7, (SIZE, SIZE, 3))
    for _ in range(rng.integers(6, 22)):
        _nucleus(image, rng, rng.uniform(0, SIZE, 2), rng.uniform(1.5, 3.2), (150, 100, 175))
    if tumour:
        for _ in range(rng.integers(3, 13)):
            _nucleus(image, rng, rng.uniform(34, 62, 2), rng.uniform(3.0, 5.5), (90, 45, 128))
    return np.clip(image, 0, 255).astype(np.uint8)


def _nucleus(image, rng, centre, radius, colour) -> None:
    mask = (_GRID_Y - centre[0]) ** 2 + (_GRID_X - centre[1]) ** 2 <= radius**2
    opacity = rng.uniform(0.55, 0.9)
    image[mask] = (1 - opacity) * image[mask] + opacity * (np.array(colour) + rng.normal(0, 10, 3))
