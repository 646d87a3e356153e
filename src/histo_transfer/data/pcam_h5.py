"""The official PatchCamelyon HDF5 files, with their official train / valid / test splits.

<root>/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5, each possibly gzipped (.h5.gz).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from histo_transfer import IMAGE_SHAPE
from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.cache import (
    IMAGES_FILE,
    PackedPatches,
    PatchSource,
    allocated_memmap,
    cache_folder,
    packed,
    progress,
)
from histo_transfer.data.kaggle import files_fingerprint
from histo_transfer.data.sources import SOURCES, DataKeys, DataSource, Labelled, require_root
from histo_transfer.data.split import subsample

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
READ_CHUNK = 4096


def split_file(root: Path, split: str, kind: str) -> Path | None:
    """The x or y file of `split`, plain or gzipped; None when absent."""
    stem = f"camelyonpatch_level_2_split_{split}_{kind}.h5"
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def check_layout(root: Path, splits=("train", "valid")) -> None:
    if not root.is_dir():
        raise ConfigError("data.root", f"{root} is not a folder")
    missing = [f"camelyonpatch_level_2_split_{s}_{k}.h5[.gz]" for s in splits for k in "xy" if not split_file(root, s, k)]
    if missing:
        raise ConfigError("data.root", f"{root} lacks the PCam files {', '.join(missing)}")


def source_files(root: Path, splits) -> list[Path]:
    return [split_file(root, s, k) for s in splits for k in "xy"]


class H5Splits(PatchSource):
    """Patches of several official splits, concatenated; each patch's split is its group."""

    def __init__(self, root: Path, splits=SPLITS):
        self.root, self.splits = root, [s for s in splits if split_file(root, s, "x")]
        labels, groups = [], []
        for split in self.splits:
            with _open(split_file(root, split, "y")) as (h5, path):
                y = np.asarray(h5["y"]).reshape(-1)
            if not np.isin(y, (0, 1)).all():
                raise DataError(f"{path}: labels other than 0 and 1")
            labels.append(y.astype(np.int8))
            groups.append(np.full(len(y), split))
        self.labels, self.groups = np.concatenate(labels), np.concatenate(groups)
        self.ids = np.array([f"{g}_{i}" for g, n in zip(self.splits, map(len, labels)) for i in range(n)])

    def write(self, folder: Path, workers: int | None) -> dict[int, str]:
        images = allocated_memmap(folder / IMAGES_FILE, (len(self), *IMAGE_SHAPE))
        start = 0
        with progress(len(self), "copying PCam patches") as bar:
            for split in self.splits:
                with _open(split_file(self.root, split, "x"), scratch=folder) as (h5, path):
                    x = h5["x"]
                    if x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8:
                        raise DataError(f"{path}: patches are {x.shape[1:]} {x.dtype}; expected (96, 96, 3) uint8")
                    if start + len(x) > len(self) or (self.groups[start:start + len(x)] != split).any():
                        raise DataError(f"{path}: {len(x)} patches, but its y file has a different count")
                    for offset in range(0, len(x), READ_CHUNK):
                        block = x[offset:offset + READ_CHUNK]
                        images[start + offset:start + offset + len(block)] = block
                        bar.update(len(block))
                    start += len(x)
        images.flush()
        return {}


class _open:
    """h5py file of a plain or gzipped path; a gzipped one is inflated to a scratch file first."""

    def __init__(self, path: Path, scratch: Path | None = None):
        self.path, self.scratch = path, scratch
        self.inflated: Path | None = None

    def __enter__(self):
        import h5py

        target = self.path
        if self.path.suffix == ".gz":
            scratch = self.scratch or Path(tempfile.gettempdir())
            self.inflated = scratch / f".{self.path.stem}.inflating-{os.getpid()}"
            try:
                with gzip.open(self.path, "rb") as source, open(self.inflated, "wb") as out:
                    shutil.copyfileobj(source, out, 16 << 20)
            except (OSError, EOFError) as exc:
                self.inflated.unlink(missing_ok=True)
                raise DataError(f"{self.path}: broken gzip file ({exc})") from exc
            target = self.inflated
        try:
            self.file = h5py.File(target, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        return self.file, self.path

    def __exit__(self, *exc):
        self.file.close()
        if self.inflated is not None:
            self.inflated.unlink(missing_ok=True)


@SOURCES.register("pcam_h5", DataKeys)
class PcamH5Source(DataSource):
    """The official files: `train` to train on (frac subsamples it), `valid` to validate on, `test` held out."""

    holdout_labelled = True

    @classmethod
    def check(cls, cfg) -> None:
        check_layout(require_root(cfg, "the camelyonpatch_level_2_split_*.h5 files"))

    def labelled(self) -> Labelled:
        root, splits = self.root(), ("train", "valid")
        key = files_fingerprint(source_files(root, splits))
        return Labelled(root, key, packed(cache_folder(self.cfg.cache_dir, "pcam", key), H5Splits(root, splits),
                                          self.cfg.workers), [])

    def groups(self, labelled: Labelled) -> np.ndarray | None:
        """Slides from the official camelyonpatch_level_2_split_<split>_meta.csv files (column wsi)."""
        import pandas as pd

        patches, slides = labelled.patches, np.empty(len(labelled.patches.ids), dtype=object)
        for split in np.unique(patches.groups):
            path = labelled.root / f"camelyonpatch_level_2_split_{split}_meta.csv"
            rows = np.flatnonzero(patches.groups == split)
            if not path.is_file():
                log.warning("%s is absent: cross-validation folds cannot keep slides apart", path.name)
                return None
            meta = pd.read_csv(path, dtype=str)
            if "wsi" not in meta.columns or len(meta) != len(rows):
                raise DataError(f"{path}: expected a wsi column and {len(rows)} rows, one per patch of the split")
            slides[rows] = meta["wsi"].to_numpy()
        return slides.astype(str)

    def cv_pool(self, patches, usable):
        """The official train split (frac subsamples it); valid stays for validation."""
        official_train = usable[patches.groups[usable] == "train"]
        return official_train[subsample(patches.labels[official_train], self.cfg.frac, self.cfg.seed)]

    def split(self, patches, usable):
        return self.cv_pool(patches, usable), usable[patches.groups[usable] == "valid"]

    def holdout(self) -> PackedPatches | None:
        root = self.root()
        if not split_file(root, "test", "x"):
            return None
        key = files_fingerprint(source_files(root, ["test"]))
        return packed(cache_folder(self.cfg.cache_dir, "pcam-test", key), H5Splits(root, ["test"]), self.cfg.workers)
