"""How a cross-validation assigns its folds (config group `cv`): the options by name, with their keys.

Config validation reads this registry, so it imports nothing heavy; cross_validation.py runs the folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from histo_transfer.config.errors import ConfigError
from histo_transfer.config.options import Options, between, one_of
from histo_transfer.data.folds import assign_folds
from histo_transfer.evaluation.inference import TTA


@dataclass
class KFoldKeys:
    name: str
    folds: int = between(2)
    fold: Optional[int] = between(0)  # null: every fold in this process
    tta: str = one_of(TTA)  # also score the out-of-fold predictions with this test-time augmentation


def _check(node, assign) -> None:
    if node.fold is not None and node.fold >= node.folds:
        raise ConfigError("cv.fold", f"{node.fold} is out of range; need 0 <= fold < cv.folds={node.folds}")


CV = Options("cv", check=_check)


@CV.register("kfold", KFoldKeys)
def kfold(cfg, labels: np.ndarray, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """Stratified by label, seeded; grouped by slide when `groups` is known."""
    return assign_folds(labels, groups, cfg.folds, seed)
