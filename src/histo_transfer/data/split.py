"""Stratified, seeded subsampling (data.frac) and train/validation split, on indices."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from histo_transfer.config.errors import ConfigError


def subsample(labels: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified `frac` share of the patches (all of them for frac=1)."""
    indices = np.arange(len(labels))
    if frac >= 1:
        return indices
    try:
        chosen, _ = train_test_split(indices, train_size=frac, stratify=labels, random_state=seed)
    except ValueError as exc:  # e.g. too few patches of a class for the requested share
        raise ConfigError("data.frac", f"cannot take data.frac={frac} of {len(labels)} patches: {exc}") from exc
    return np.sort(chosen)


def split_indices(labels: np.ndarray, frac: float, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation patches, both sorted (sequential reads)."""
    indices = subsample(labels, frac, seed)
    try:
        train, val = train_test_split(indices, test_size=val_split, stratify=labels[indices], random_state=seed)
    except ValueError as exc:
        raise ConfigError("data.val_split", f"cannot split {len(indices)} patches with data.frac={frac}, "
                                            f"data.val_split={val_split}: {exc}") from exc
    return np.sort(train), np.sort(val)
