"""A teacher's probabilities (distill.teacher, pseudo.teacher): computed once per teacher and packed data
set, kept beside the packed cache, read back by every later run (a resumed one, the next fold, a sweep's
jobs) without loading the teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_transfer.config.errors import ConfigError, DiskFull
from histo_transfer.data.cache import PackedPatches, Rows
from histo_transfer.evaluation.inference import ensemble_probabilities
from histo_transfer.tracking.registry import load_model, member_refs, pinned_ref

log = logging.getLogger(__name__)

TEACHERS_DIR = "teachers"  # in the packed cache's folder


@dataclass
class Teacher:
    probabilities: np.ndarray  # float32, one per patch of the data set (its cache order)
    members: list[str]  # the single models it stands for, pinned (pinned_ref)
    path: Path  # where the probabilities are kept

    def tags(self, teacher_cfg, keys: tuple[str, str]) -> dict[str, str]:
        """What a run records of its teacher (schema's *_TEACHER_TAGS): the reference as given and the
        models it stood for."""
        given, members = keys
        return {given: str(teacher_cfg.teacher), members: ",".join(self.members)[:5000]}


def teacher_probabilities(teacher_cfg, patches: PackedPatches, where: str, needed: np.ndarray | None = None,
                          batch_size: int = 256) -> Teacher:
    """The probabilities of `teacher_cfg.teacher` (with its tta; an ensemble's members combined by its
    `method`) for the patches `needed` of `patches` (default: all), read from the file kept for this
    teacher and packed data set (the cache folder's name holds the data's fingerprint), the ones it
    lacks computed and added. The array has one value per patch, NaN where none was needed yet: a
    training run scores its training patches only, the next split or fold adds its own. `where` is the
    config key (distill.teacher, pseudo.teacher) that a bad reference is reported under."""
    with _reported_as(where):
        refs = member_refs(teacher_cfg.teacher, teacher_cfg.top_k)  # a list too
        members = [pinned_ref(ref) for ref in refs]
    folder = Path(patches.folder)
    key = hashlib.sha256(json.dumps({"members": members, "tta": teacher_cfg.tta, "method": teacher_cfg.method,
                                     "data": folder.name}).encode()).hexdigest()[:16]
    path = folder / TEACHERS_DIR / f"{key}.npy"
    count = len(patches.labels)
    needed = np.arange(count) if needed is None else np.unique(np.asarray(needed, dtype=np.int64))
    kept = np.full(count, np.nan, dtype=np.float32)
    if path.is_file():
        stored = np.load(path)
        if stored.shape == (count,):
            kept = stored
        else:
            log.warning("%s holds %s values for %d patches: computed again", path, stored.shape, count)
    missing = needed[np.isnan(kept[needed])]
    if not missing.size:
        log.info("the teacher's probabilities from %s", path)
        return Teacher(kept, members, path)
    log.info("scoring %d patches of %s with the teacher (%d model(s), tta=%s), kept for later runs",
             missing.size, folder.name, len(members), teacher_cfg.tta)
    with _reported_as(where):
        models = [load_model(ref).model for ref in refs]
    kept[missing] = ensemble_probabilities(models, Rows(patches.images, missing), batch_size, teacher_cfg.tta,
                                           teacher_cfg.method)
    _write(path, kept)
    return Teacher(kept, members, path)


@contextlib.contextmanager
def _reported_as(where: str):
    """The registry's errors name `model`, predict.py's key: here the teacher's key is the one to fix."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(where, str(exc).removeprefix(f"{exc.key}: ")) from None


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

