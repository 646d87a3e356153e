"""Data sources (config group `data`): each layout on disk registers one DataSource class here.

A source knows its config-time checks (cheap: no image opened), where its labelled patches are and
how they are packed into the cache, how they split into training and validation, and its held-out
test patches. Everything downstream (splits, pipeline, training, scoring) sees only packed patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import Options, between, one_of
from histo_transfer.data.cache import PackedPatches
from histo_transfer.data.split import split_indices, subsample


@dataclass
class DataKeys:
    """Keys every source shares (conf/data/_common.yaml)."""

    name: str
    root: Optional[str]
    frac: float = between(0, 1, low_open=True)
    val_split: float = between(0, 1, low_open=True, high_open=True)
    seed: int
    cache_dir: str
    workers: Optional[int] = between(1)
    on_bad_image: str = one_of(("error", "skip"))


@dataclass
class Labelled:
    """A source's labelled patches, packed."""

    root: Path
    fingerprint: str  # changes when the data does
    patches: PackedPatches
    unlisted: list[str]  # files present but not part of the data set (ignored, reported)


class DataSource:
    holdout_labelled = False  # whether its held-out test patches carry labels (PCam's test split does)

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg) -> None:
        """Config-time check of `cfg` (no image opened); raises ConfigError."""

    def root(self) -> Path:
        return Path(self.cfg.root).expanduser().resolve()

    def labelled(self) -> Labelled:
        raise NotImplementedError

    def holdout(self) -> PackedPatches | None:
        """The held-out test patches, packed; None when the source has none."""
        return None

    def groups(self, labelled: Labelled) -> np.ndarray | None:
        """The whole-slide image of each packed patch, when the source knows it (for grouped CV folds)."""
        return None

    def cv_pool(self, patches: PackedPatches, usable: np.ndarray) -> np.ndarray:
        """The patches cross-validation divides into folds: a stratified `frac` of the usable ones."""
        return usable[subsample(patches.labels[usable], self.cfg.frac, self.cfg.seed)]

    def split(self, patches: PackedPatches, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation indices among `usable`: stratified, seeded, `frac` of them."""
        train, val = split_indices(patches.labels[usable], self.cfg.frac, self.cfg.val_split, self.cfg.seed)
        return usable[train], usable[val]


def require_root(cfg, holds: str) -> Path:
    """The configured data.root, which must be given; `holds` says what the folder should contain."""
    if OmegaConf.is_missing(cfg, "root") or cfg.root in (None, ""):
        raise ConfigError("data.root", f"data={cfg.name} needs data.root=PATH, the folder holding {holds}")
    return Path(cfg.root).expanduser()


SOURCES = Options("data", check=lambda node, source: source.check(node))


def data_source(cfg) -> DataSource:
    """The source named by `cfg.name` (data config)."""
    return SOURCES[cfg.name](cfg)
