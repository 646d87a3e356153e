"""A teacher's probabilities for distillation (distill.teacher): computed once per teacher and data set,
kept beside the packed cache, read back by every later run (a resumed one, the next fold, a sweep's jobs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer.config.errors import DiskFull
from histo_transfer.data.loading import TrainingData
from histo_transfer.evaluation.inference import ensemble_probabilities
from histo_transfer.tracking.registry import load_model, member_refs, pinned_ref
from histo_transfer.tracking.schema import TEACHER_MEMBERS_TAG, TEACHER_TAG

log = logging.getLogger(__name__)

TEACHERS_DIR = "teachers"  # in the packed cache's folder


@dataclass
class Teacher:
    probabilities: np.ndarray  # float32, one per patch of the data set (its cache order)
    members: list[str]  # the single models it stands for, pinned (pinned_ref)
    path: Path  # where the probabilities are kept

    def tags(self, distill_cfg) -> dict[str, str]:
        return {TEACHER_TAG: str(_plain(distill_cfg.teacher)), TEACHER_MEMBERS_TAG: ",".join(self.members)[:5000]}


def teacher_probabilities(distill_cfg, data: TrainingData, batch_size: int = 256) -> Teacher:
    """The probabilities of distill.teacher (with its tta; an ensemble's members combined by `method`) for
    every patch of `data`, from the file kept for this teacher and data set, else computed and kept."""
    refs = member_refs(_plain(distill_cfg.teacher), distill_cfg.top_k)
    members = [pinned_ref(ref) for ref in refs]
    key = hashlib.sha256(json.dumps({"members": members, "tta": distill_cfg.tta, "method": distill_cfg.method,
                                     "data": data.fingerprint}).encode()).hexdigest()[:16]
    path = Path(data.patches.folder) / TEACHERS_DIR / f"{key}.npy"
    if path.is_file():
        kept = np.load(path)
        if kept.shape == (len(data.labels),):
            log.info("distill: the teacher's probabilities from %s", path)
            return Teacher(kept, members, path)
        log.warning("distill: %s holds %s values for %d patches: computed again", path, kept.shape, len(data.labels))
    log.info("distill: scoring %d patches with the teacher (%d model(s), tta=%s), once for this data set",
             len(data.labels), len(members), distill_cfg.tta)
    models = [load_model(ref).model for ref in refs]
    probabilities = ensemble_probabilities(models, data.images, batch_size, distill_cfg.tta, distill_cfg.method)
    _write(path, probabilities.astype(np.float32))
    return Teacher(probabilities, members, path)


def _write(path: Path, values: np.ndarray) -> None:
    """Whole or not at all: a crash or a full disk leaves no half-written file to be read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as stream:
            np.save(stream, values)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if DiskFull.caused(exc):
            raise DiskFull(f"{path}: no space left on the device for the teacher's probabilities") from None
        raise


def _plain(teacher):
    """A reference or a list of them, as plain Python (Hydra hands lists over as ListConfig)."""
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(teacher) if isinstance(teacher, ListConfig) else teacher
