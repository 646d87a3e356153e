"""The class-per-folder layout of Keras' image_dataset_from_directory and torchvision's ImageFolder:
<root>/<split>/<class>/<name>.<ext>, e.g. train/0/patch1.jpg, train/1/patch2.jpg, valid/..., and
optionally an unlabelled test folder (any depth). A patch's id is its path inside the split folder,
without extension (`1/patch2`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.cache import ImageFiles, PackedPatches, cache_folder, packed
from histo_transfer.data.sources import SOURCES, DataKeys, DataSource, Labelled, require_root
from histo_transfer.data.split import subsample

log = logging.getLogger(__name__)


@dataclass
class FoldersKeys(DataKeys):
    train_dir: str
    val_dir: Optional[str]  # null: a stratified split of train_dir by data.val_split
    test_dir: Optional[str]  # unlabelled patches for predict.py
    classes: List[str]  # folder names of label 0 and label 1
    extensions: List[str]


@dataclass
class Listing:
    """The image files of one split folder, checked: paths, ids, labels, and what was left out."""

    paths: list[Path] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # other folders and files, relative to the root


@SOURCES.register("folders", FoldersKeys)
class FoldersSource(DataSource):
    @classmethod
    def check(cls, cfg) -> None:
        root = require_root(cfg, f"{cfg.train_dir}/<class>/ folders")
        if not root.is_dir():
            raise ConfigError("data.root", f"{root} is not a folder")
        if len(cfg.classes) != 2 or len(set(cfg.classes)) != 2:
            raise ConfigError("data.classes", f"{list(cfg.classes)} must name two different folders: label 0, label 1")
        if not cfg.extensions:
            raise ConfigError("data.extensions", "must list at least one file extension, e.g. [jpg, png]")
        for key in ("train_dir", "val_dir"):
            if cfg[key] is None:
                continue
            split = root / cfg[key]
            if not split.is_dir():
                raise ConfigError(f"data.{key}", f"{split} is not a folder")
            missing = [name for name in cfg.classes if not (split / name).is_dir()]
            if missing:
                raise ConfigError("data.classes", f"{split} has no class folder {missing[0]!r} (data.classes="
                                  f"{list(cfg.classes)}; folders there: {', '.join(sorted(_subfolders(split)))})")
        if cfg.test_dir is not None and not (root / cfg.test_dir).is_dir():
            raise ConfigError("data.test_dir", f"{root / cfg.test_dir} is not a folder")

    def labelled(self) -> Labelled:
        root = self.root()
        splits = [("train", self.cfg.train_dir)] + ([("valid", self.cfg.val_dir)] if self.cfg.val_dir else [])
        listings = {group: self._list_classes(root / folder) for group, folder in splits}
        ignored = [name for listing in listings.values() for name in listing.ignored]
        if ignored:
            log.warning("%d files or folders under %s are not images of data.classes=%s and are ignored, e.g. %s",
                        len(ignored), root, list(self.cfg.classes), ignored[0])
        source = _concatenate(listings)
        key = _fingerprint([Path(p) for p in source.paths], root, [*self.cfg.classes, *(folder for _, folder in splits)])
        return Labelled(root, key, packed(cache_folder(self.cfg.cache_dir, "folders", key), source, self.cfg.workers),
                        ignored)

    def split(self, patches, usable):
        if not self.cfg.val_dir:
            return super().split(patches, usable)
        return self.cv_pool(patches, usable), usable[patches.groups[usable] == "valid"]

    def cv_pool(self, patches, usable):
        train = usable[patches.groups[usable] == "train"]
        return train[subsample(patches.labels[train], self.cfg.frac, self.cfg.seed)]

    def holdout(self) -> PackedPatches | None:
        if self.cfg.test_dir is None:
            return None
        root = self.root()
        if not (root / self.cfg.test_dir).is_dir():
            raise DataError(f"{root / self.cfg.test_dir}: not a folder")
        listing = Listing()
        self._list_images(root / self.cfg.test_dir, root / self.cfg.test_dir, listing, label=-1, recursive=True)
        if not listing.paths:
            raise DataError(f"{root / self.cfg.test_dir}: no images with extensions {list(self.cfg.extensions)}")
        source = ImageFiles(listing.paths, listing.ids, group="test")
        return packed(cache_folder(self.cfg.cache_dir, "folders-test", _fingerprint(listing.paths, root, [])), source,
                      self.cfg.workers)

    def _list_classes(self, split: Path) -> Listing:
        listing = Listing()
        for name in sorted(_subfolders(split)):
            if name not in self.cfg.classes:
                listing.ignored.append(f"{split.name}/{name}/")
        for label, name in enumerate(self.cfg.classes):
            before = len(listing.paths)
            self._list_images(split / name, split, listing, label, recursive=False)
            if len(listing.paths) == before:
                raise DataError(f"{split / name}: class folder holds no images with extensions "
                                f"{list(self.cfg.extensions)}")
        return listing

    def _list_images(self, folder: Path, split: Path, listing: Listing, label: int, recursive: bool) -> None:
        """Append the images under `folder`; names must be UTF-8, links must stay inside the data root."""
        suffixes = {f".{e.lower().lstrip('.')}" for e in self.cfg.extensions}
        root = self.root()
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(entry.name).decode("utf-8", "backslashreplace")  # the offending bytes as \xNN
                raise DataError(f"{folder / shown}: file name is not valid UTF-8; rename it") from None
            if entry.is_symlink() and not path.resolve().is_relative_to(root):
                raise DataError(f"{path}: symbolic link points outside the data root ({path.resolve()})")
            if entry.is_dir() and recursive:
                self._list_images(path, split, listing, label, recursive)
            elif path.suffix.lower() in suffixes:
                listing.paths.append(path)
                listing.ids.append(path.relative_to(split).with_suffix("").as_posix())
                listing.labels.append(label)
            else:
                listing.ignored.append(path.relative_to(root).as_posix())


def unlabelled_folder(folder: str | Path, cache_dir: str, workers: int | None = None,
                      extensions=("jpg", "jpeg", "png", "tif", "tiff")) -> PackedPatches:
    """Every image under `folder`, at any depth, packed as unlabelled patches (ids: paths inside it);
    checked as a folders source's test_dir is."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "folders", "root": str(folder), "test_dir": ".", "extensions": list(extensions),
                            "cache_dir": cache_dir, "workers": workers})
    return FoldersSource(cfg).holdout()


def _subfolders(folder: Path) -> list[str]:
    return [entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")]


def _concatenate(listings: dict[str, Listing]) -> ImageFiles:
    """The splits' images as one source, in an order that has nothing to do with their class: training
    shuffles through a buffer of pipeline.SHUFFLE_BUFFER patches, which cannot mix class folders packed
    one after the other once a split holds more (its epochs began with one class, and an epoch cut
    short by trainer.steps_per_epoch saw little of the last)."""
    paths, ids, labels, groups = [], [], [], []
    for group, listing in listings.items():
        paths += listing.paths
        ids += listing.ids if len(listings) == 1 else [f"{group}/{i}" for i in listing.ids]
        labels += listing.labels
        groups += [group] * len(listing.paths)
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{labels[i]}/{ids[i]}".encode()).digest())
    return ImageFiles(*([values[i] for i in order] for values in (paths, ids, labels)),
                      group=[groups[i] for i in order])


def _fingerprint(paths: list[Path], root: Path, salt: list[str]) -> str:
    """Relative paths, sizes and modification times (same names may sit in several class folders)."""
    digest = hashlib.sha256("\0".join(salt).encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError:  # unreadable (a dangling link): reported when decoded, so data.on_bad_image applies
            stat = path.lstat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
