"""Decoding patches: every image must be a readable 96x96 RGB picture, or the file is named in an error."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histo_transfer import IMAGE_SHAPE
from histo_transfer.config.errors import DataError


def read_patch(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not in training
            mode, size = image.mode, image.size
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({exc})") from exc
    if mode != "RGB" or array.shape != IMAGE_SHAPE:
        raise DataError(f"{path}: image is {size[0]}x{size[1]} {mode}; expected 96x96 RGB")
    return array


def read_patches(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Decode all `paths` into one (N, 96, 96, 3) uint8 array; Pillow releases the GIL while decoding."""
    out = np.empty((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for index, array in enumerate(pool.map(read_patch, paths)):
            out[index] = array
    return out


def patch_grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows of equally sized RGB patches as one uint8 image on white, `gap` pixels apart (empty slots
    stay white). One image drawn once: a figure with an axes per patch takes seconds to lay out."""
    height, width = next(patch for row in rows for patch in row).shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, patch in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            grid[top:top + height, left:left + width] = np.clip(patch, 0, 255).astype(np.uint8)[..., :3]
    return grid
