"""The Kaggle layout: <root>/train/<id>.tif, <root>/train_labels.csv (id,label), optional <root>/test/."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.cache import ImageFiles, PackedPatches, cache_folder, packed
from histo_transfer.data.sources import SOURCES, DataKeys, DataSource, Labelled, require_root

log = logging.getLogger(__name__)

LABELS_FILE = "train_labels.csv"
IMAGE_SUFFIX = ".tif"


@dataclass
class LabelledPatches:
    """The labelled training set as listed by train_labels.csv."""

    root: Path
    ids: np.ndarray  # str, without .tif
    labels: np.ndarray  # int8, 0 or 1
    unlisted: list[str]  # files in train/ without a CSV row: ignored, but reported

    def paths(self) -> list[Path]:
        train_dir = self.root / "train"
        return [train_dir / f"{image_id}{IMAGE_SUFFIX}" for image_id in self.ids]


def check_layout(root: Path) -> None:
    """Cheap structural check, run at config time (no image is opened)."""
    if not root.is_dir():
        raise ConfigError("data.root", f"{root} is not a folder")
    missing = [name for name in ("train", LABELS_FILE) if not (root / name).exists()]
    if missing:
        raise ConfigError(
            "data.root",
            f"{root} is not a Kaggle layout: missing {' and '.join(missing)} "
            "(expected train/<id>.tif and train_labels.csv with columns id,label)",
        )


def read_labelled(root: Path) -> LabelledPatches:
    """Read and check train_labels.csv against train/; errors name the CSV row or file."""
    import pandas as pd

    csv_path = root / LABELS_FILE
    train_files = {p.name for p in (root / "train").iterdir() if not p.name.startswith(".")}
    if not train_files:
        raise DataError(f"{root / 'train'}: folder is empty; expected one <id>.tif per row of {LABELS_FILE}")
    try:
        # str dtype keeps ids such as "00e1" or "1e5" verbatim; CRLF line endings are accepted.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{csv_path}: file is empty; expected a header id,label and one row per image") from exc

    columns = [str(c).strip().lstrip("\ufeff") for c in table.columns]
    if columns[:2] != ["id", "label"] or len(columns) != 2:
        raise DataError(f"{csv_path}: columns are {','.join(columns)}; expected exactly id,label")
    table.columns = columns
    if table.empty:
        raise DataError(f"{csv_path}: has a header but no rows")

    ids = table["id"].str.strip()
    for row, image_id in enumerate(ids, start=2):  # row 1 is the header
        if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", "..") or os.path.isabs(image_id):
            raise DataError(f"{csv_path} row {row}: id {image_id!r} is not a plain file name")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        row = duplicated.index[0] + 2
        raise DataError(f"{csv_path} row {row}: id {duplicated.iloc[0]} appears more than once "
                        f"({len(duplicated)} duplicate rows in all)")
    labels = table["label"].str.strip()
    bad = labels[~labels.isin(["0", "1"])]
    if len(bad):
        row = bad.index[0] + 2
        raise DataError(f"{csv_path} row {row}: label {bad.iloc[0]!r} is not 0 or 1")

    listed = {f"{image_id}{IMAGE_SUFFIX}" for image_id in ids}
    missing = sorted(listed - train_files)
    if missing:
        raise DataError(f"{root / 'train' / missing[0]}: listed in {csv_path} but not found "
                        f"({len(missing)} missing files in all)")
    unlisted = sorted(train_files - listed)
    return LabelledPatches(root, ids.to_numpy(dtype=str), labels.astype(np.int8).to_numpy(), unlisted)


def unlabelled_ids(root: Path) -> list[str]:
    """Ids of the unlabelled test/ patches, sorted; empty when there is no test/ folder."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        return []
    names = sorted(p.name for p in test_dir.iterdir() if not p.name.startswith("."))
    strangers = [name for name in names if not name.endswith(IMAGE_SUFFIX)]
    if strangers:
        raise DataError(f"{test_dir / strangers[0]}: not a {IMAGE_SUFFIX} patch; test/ must hold only "
                        f"<id>{IMAGE_SUFFIX} files ({len(strangers)} other files in all)")
    return [name[: -len(IMAGE_SUFFIX)] for name in names]


def read_groups(path: Path) -> dict[str, str]:
    """id -> whole-slide image, from a CSV with columns id,wsi (errors name the file)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a CSV with columns id,wsi ({str(exc).splitlines()[0]})") from exc
    columns = [str(c).strip().lstrip("\ufeff") for c in table.columns]
    if "id" not in columns or "wsi" not in columns:
        raise DataError(f"{path}: columns are {','.join(columns)}; expected id,wsi")
    table.columns = columns
    return dict(zip(table["id"].str.strip(), table["wsi"].str.strip()))


def fingerprint(root: Path) -> str:
    """Hash of the labels file and the train/ listing (names, sizes, mtimes); changes when the data does."""
    digest = hashlib.sha256((root / LABELS_FILE).read_bytes())
    return files_fingerprint(sorted((root / "train").iterdir()), digest)


def files_fingerprint(paths: list[Path], digest=None) -> str:
    """Hash of file names, sizes and modification times: cheap, and changes when any file does."""
    digest = digest or hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class KaggleKeys(DataKeys):
    groups_csv: Optional[str]  # id,wsi: the slide of each patch, for grouped CV folds


@SOURCES.register("kaggle", KaggleKeys)
class KaggleSource(DataSource):
    """A folder in the Kaggle layout; validation is a stratified split of train/."""

    @classmethod
    def check(cls, cfg) -> None:
        check_layout(require_root(cfg, "train/ and train_labels.csv"))
        if cfg.groups_csv is not None and not Path(cfg.groups_csv).expanduser().is_file():
            raise ConfigError("data.groups_csv", f"{cfg.groups_csv} is not a file (expected a CSV with columns id,wsi)")

    def groups(self, labelled: Labelled) -> np.ndarray | None:
        """Slides from data.groups_csv; a patch it does not list is a group of its own."""
        if self.cfg.groups_csv is None:
            return None
        slides = read_groups(Path(self.cfg.groups_csv).expanduser())
        ids = labelled.patches.ids
        groups = np.array([slides.get(image_id, f"unlisted:{image_id}") for image_id in ids])
        unlisted = sum(image_id not in slides for image_id in ids)
        if unlisted:
            log.warning("%d of %d patches have no row in %s: each is its own group", unlisted, len(ids),
                        self.cfg.groups_csv)
        return groups

    def labelled(self) -> Labelled:
        root = self.root()
        listing = read_labelled(root)
        if listing.unlisted:
            log.warning("%d files in %s have no row in train_labels.csv and are ignored, e.g. %s",
                        len(listing.unlisted), root / "train", listing.unlisted[0])
        key = fingerprint(root)
        source = ImageFiles(listing.paths(), listing.ids, listing.labels, group="train")
        patches = packed(cache_folder(self.cfg.cache_dir, "train", key), source, self.cfg.workers)
        return Labelled(root, key, patches, listing.unlisted)

    def holdout(self) -> PackedPatches | None:
        """The unlabelled test/ folder (what a submission scores)."""
        root = self.root()
        ids = unlabelled_ids(root)
        if not ids:
            return None
        paths = [root / "test" / f"{image_id}{IMAGE_SUFFIX}" for image_id in ids]
        source = ImageFiles(paths, ids, group="test")
        return packed(cache_folder(self.cfg.cache_dir, "test", files_fingerprint(paths)), source, self.cfg.workers)
