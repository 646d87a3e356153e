"""Pseudo-labels (pseudo.data, pseudo.teacher): unlabelled patches that a teacher is sure of, labelled by
it, join a run's training patches; never its validation split, whose patches all carry true labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from histo_transfer.config.errors import DataError
from histo_transfer.data.cache import PackedPatches
from histo_transfer.data.folders import unlabelled_folder
from histo_transfer.data.sources import data_source
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.schema import PSEUDO_TEACHER_TAGS
from histo_transfer.workflows.teachers import teacher_probabilities

log = logging.getLogger(__name__)

DATASET_CONTEXT = "pseudo-labelled"  # the MLflow dataset input of the kept patches


@dataclass
class PseudoLabelled:
    patches: PackedPatches  # the whole unlabelled set, packed
    kept: np.ndarray  # indices into `patches` of the patches trained on
    labels: np.ndarray  # the teacher's label (0/1) of every patch of `patches`
    probabilities: np.ndarray  # the teacher's probability of every patch of `patches`
    weight: float


def confident(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the probabilities at least `threshold` (label 1) or at most 1 - `threshold` (label 0)."""
    return np.flatnonzero((probabilities >= threshold) | (probabilities <= 1 - threshold))


def pseudo_labelled(cfg: DictConfig, data_root: Path, outbox) -> PseudoLabelled:
    """The patches of pseudo.data (`holdout`: those of the data source at `data_root`), scored by
    pseudo.teacher (once per teacher and data set), the confident ones kept; counts, teacher and the kept
    set recorded in the active run."""
    patches = _unlabelled(cfg)
    teacher = teacher_probabilities(cfg.pseudo, patches, "pseudo.teacher")
    usable = np.zeros(len(patches.ids), dtype=bool)
    usable[patches.usable(cfg.data.on_bad_image)] = True  # a bad image: refused, or never trained on
    kept = np.intersect1d(confident(teacher.probabilities, cfg.pseudo.threshold), np.flatnonzero(usable))
    labels = (teacher.probabilities >= 0.5).astype(np.int8)
    log.info("pseudo-labels: %d of %d patches of %s kept (teacher's probability >= %g or <= %g), %d of them tumour",
             len(kept), len(patches.ids), patches.folder.name, cfg.pseudo.threshold, 1 - cfg.pseudo.threshold,
             int(labels[kept].sum()))
    outbox.tags(teacher.tags(cfg.pseudo, PSEUDO_TEACHER_TAGS))
    outbox.metrics({"n_pseudo_kept": len(kept), "n_pseudo_dropped": len(patches.ids) - len(kept)})
    source = data_root if cfg.pseudo.data == "holdout" else Path(cfg.pseudo.data).expanduser()
    tracking.log_dataset(patches.ids[kept], labels[kept], source, "pseudo-labelled",
                         teacher.path.stem, DATASET_CONTEXT)
    return PseudoLabelled(patches, kept, labels, teacher.probabilities, cfg.pseudo.weight)


def _unlabelled(cfg: DictConfig) -> PackedPatches:
    if cfg.pseudo.data != "holdout":
        return unlabelled_folder(Path(cfg.pseudo.data).expanduser(), cfg.data.cache_dir, cfg.data.workers)
    patches = data_source(cfg.data).holdout()
    if patches is None:
        raise DataError(f"pseudo.data=holdout: data={cfg.data.name} at {cfg.data.root} has no held-out test patches")
    return patches
