"""Built-in data: H&E-like patches generated deterministically, written in the Kaggle layout.

Label 1 patches carry a cluster of large, dark, crowded nuclei in the centre 32x32 region,
the Kaggle label rule ("tumour tissue in the centre"); every patch has scattered normal nuclei.
Changing what is generated means a new version in conf/data/synthetic.yaml's root (v2, ...).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histo_transfer.config.options import between
from histo_transfer.data.kaggle import IMAGE_SUFFIX, LABELS_FILE, KaggleKeys, KaggleSource
from histo_transfer.data.sources import SOURCES

log = logging.getLogger(__name__)

GENERATOR_SEED = 20240601  # part of the data's definition, not a training knob
POSITIVE_SHARE = 0.4  # close to Kaggle's 40.5 %
PERIPHERAL_SHARE = 0.3  # label-0 patches with a tumour-like cluster outside the centre
NORMAL_NUCLEUS, TUMOUR_NUCLEUS = (150, 100, 175), (100, 55, 140)
COMPLETE_MARKER = ".complete"
SIZE = 96
_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE]


@dataclass
class SyntheticKeys(KaggleKeys):
    n_train: int = between(20)
    n_test: int = between(0)


@SOURCES.register("synthetic", SyntheticKeys)
class SyntheticSource(KaggleSource):
    """The built-in data: a Kaggle layout generated on first use."""

    @classmethod
    def check(cls, cfg) -> None:
        pass  # generated, so always there (data.groups_csv is checked when read)

    def root(self) -> Path:
        return ensure_synthetic(super().root(), self.cfg.n_train, self.cfg.n_test)


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
        if root.exists() and not (root / COMPLETE_MARKER).exists():
            shutil.rmtree(root)  # a leftover without the marker is incomplete
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
    (folder / COMPLETE_MARKER).write_text("synthetic v2\n")


def _save(folder: Path, split: str, index: int, rng: np.random.Generator, tumour: bool) -> str:
    image_id = hashlib.sha1(f"synthetic-{split}-{index}".encode()).hexdigest()
    (folder / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_patch(rng, tumour)).save(folder / split / f"{image_id}{IMAGE_SUFFIX}")
    return image_id


def synthetic_patch(rng: np.random.Generator, tumour: bool) -> np.ndarray:
    """One 96x96 RGB uint8 patch: pink stroma, scattered nuclei, and a central tumour cluster if asked.

    Like Kaggle's rule, only the centre counts: some label-0 patches carry a tumour-like cluster
    in their outer region, and some label-1 clusters are small, so the task is learnable, not trivial.
    """
    stroma = np.array([232.0, 182.0, 206.0]) + rng.normal(0, 8, 3)
    coarse = Image.fromarray(rng.normal(0, 12, (12, 12)).astype(np.float32), mode="F")
    tissue = np.asarray(coarse.resize((SIZE, SIZE), Image.Resampling.BILINEAR))[..., None]  # smooth density
    image = stroma + tissue + rng.normal(0, 7, (SIZE, SIZE, 3))
    for _ in range(rng.integers(6, 26)):
        _nucleus(image, rng, rng.uniform(0, SIZE, 2), rng.uniform(1.5, 3.6), NORMAL_NUCLEUS)
    if tumour:
        _cluster(image, rng, centre=rng.uniform(44, 52, 2), count=rng.integers(1, 10))
    elif rng.random() < PERIPHERAL_SHARE:
        _cluster(image, rng, centre=_outer_point(rng), count=rng.integers(3, 10))
    return np.clip(image, 0, 255).astype(np.uint8)


def _cluster(image, rng, centre, count) -> None:
    for _ in range(count):
        _nucleus(image, rng, centre + rng.uniform(-9, 9, 2), rng.uniform(2.8, 5.0), TUMOUR_NUCLEUS)


def _outer_point(rng) -> np.ndarray:
    """A cluster centre whose nuclei stay outside the central 32x32 region."""
    while True:
        point = rng.uniform(8, SIZE - 8, 2)
        if np.abs(point - SIZE / 2).max() > 30:
            return point


def _nucleus(image, rng, centre, radius, colour) -> None:
    mask = (_GRID_Y - centre[0]) ** 2 + (_GRID_X - centre[1]) ** 2 <= radius**2
    opacity = rng.uniform(0.55, 0.9)
    image[mask] = (1 - opacity) * image[mask] + opacity * (np.array(colour) + rng.normal(0, 10, 3))
