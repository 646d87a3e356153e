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
