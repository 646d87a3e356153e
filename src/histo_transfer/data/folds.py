"""k-fold assignment for cross-validation: stratified by label, seeded, and grouped by whole-slide
image when the source knows each patch's slide (no slide in two folds)."""

from __future__ import annotations

import numpy as np

from histo_transfer.config.errors import ConfigError


def assign_folds(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each patch."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    placeholder = np.zeros(len(labels))
    try:
        if groups is None:
            parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(placeholder, labels)
        else:
            parts = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
                placeholder, labels, groups)
        fold_of = np.full(len(labels), -1, dtype=np.int64)
        for fold, (_, held_out) in enumerate(parts):
            fold_of[held_out] = fold
    except ValueError as exc:  # fewer patches (or slides) of a label than folds
        raise ConfigError("cv.folds", f"cannot make {folds} folds of {len(labels)} patches"
                          + ("" if groups is None else f" from {len(set(groups))} slides") + f": {exc}") from exc
    return fold_of
