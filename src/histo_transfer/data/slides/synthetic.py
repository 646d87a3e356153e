"""Synthetic whole-slide images: tiled, pyramidal TIFFs that OpenSlide's generic-tiff driver reads,
for trying predict_slide.py and scripts/bench_slide.py without a scanner's file, and for the tests.

OpenSlide (4.0) takes the first TIFF directory as level 0 and every later tiled directory marked
"reduced resolution" (SubFileType 1) as a coarser level; it reports `openslide.mpp-x/-y` from
XResolution/YResolution when ResolutionUnit is CENTIMETER. A slide is white glass with a rectangle
of "tissue" (pink with purple specks) and, inside it, a rectangle of "tumour" (mostly dark purple).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TIFF_TILE = 256
Rect = tuple[int, int, int, int]  # level-0 (x, y, width, height)


@dataclass(frozen=True)
class WrittenSlide:
    path: Path
    dimensions: tuple[int, int]  # level 0 (width, height)
    mpp: float | None
    tissue: Rect
    tumour: Rect


def write_synthetic_slide(path: Path, size: tuple[int, int] = (1536, 1024), mpp: float | None = 0.5,
                          tissue: Rect = (256, 192, 1024, 640), tumour: Rect = (640, 384, 256, 192),
                          levels: int = 3, blank: bool = False, seed: int = 0,
                          textures: tuple[np.ndarray, np.ndarray] | None = None) -> WrittenSlide:
    """Write a zlib-compressed pyramidal TIFF slide of `size` level-0 px at `mpp` um/px (None: no
    resolution tags) with `levels` levels (downsamples 1, 2, 4, ...). `blank` leaves only glass;
    `textures` (tissue, tumour), arrays of the two rectangles' shapes, replace the synthetic ones."""
    image = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    if not blank:
        normal, tumorous = textures or (_texture(tissue, seed, dark=False), _texture(tumour, seed + 1, dark=True))
        _paint(image, tissue, normal)
        _paint(image, tumour, tumorous)
    write_pyramid(path, image, mpp, levels)
    return WrittenSlide(Path(path), size, mpp, tissue, tumour)


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int) -> None:
    """`image` (level 0, RGB) and its halvings as one tiled TIFF."""
    import tifffile

    base = Image.fromarray(image)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tiff:
        for level in range(levels):
            downsample = 2 ** level
            pixels = np.asarray(base.resize((base.width // downsample, base.height // downsample), Image.Resampling.BOX))
            resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * downsample),) * 2, "resolutionunit": "CENTIMETER"}
            tiff.write(pixels, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="zlib",
                       subfiletype=1 if level else 0, metadata=None, **resolution)


def _paint(image: np.ndarray, rect: Rect, texture: np.ndarray) -> None:
    x, y, width, height = rect
    image[y:y + height, x:x + width] = texture


def _texture(rect: Rect, seed: int, dark: bool) -> np.ndarray:
    """Eosin pink with haematoxylin purple specks (tumour: mostly dark purple), with pixel noise."""
    rng = np.random.default_rng(seed)
    pink, purple = np.array([236, 160, 205]), np.array([120, 60, 150] if dark else [160, 90, 175])
    share_purple = 0.8 if dark else 0.3
    specks = rng.random((rect[3], rect[2], 1)) < share_purple
    noise = rng.integers(-12, 13, size=(rect[3], rect[2], 3))
    return np.clip(np.where(specks, purple, pink) + noise, 0, 255).astype(np.uint8)
