"""Where the tissue is: a mask from a thumbnail, and the windows with enough tissue to be worth reading.

Most of a slide is glass; reading and scoring it would cost most of the time and add false
positives, so windows below `slide.min_tissue` (a share of the window's area) are never read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from histo_transfer.config.errors import ConfigError, DataError
from histo_transfer.data.slides.tiling import TileGrid, Tiles, all_tiles

MIN_TISSUE = 0.25
"""Default `slide.min_tissue`: the share of a window that must be tissue for it to be read."""

MIN_SATURATION = 0.05
"""The lowest threshold: glass stays below it (its noise and JPEG artefacts about 0.03), and without
this floor Otsu would split a blank slide's noise and call half of it tissue."""

MAX_SATURATION = 0.12
"""The highest threshold. Tissue that fills most of the slide leaves Otsu too little glass to split
off, and it splits eosin (pale pink, 0.1 to 0.2) from haematoxylin (purple) instead, dropping the
pink; a slide's glass is never that saturated."""

SPECK_SHARE = 1e-4
"""Tissue pieces and holes smaller than this share of the thumbnail are noise (dust, pen dots,
unstained pixels inside tissue) and are removed or filled."""


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """True where the RGB thumbnail shows tissue.

    H&E stains colour tissue while glass is grey to white, so the HSV saturation separates them:
    Otsu's threshold splits its histogram into glass and stain, kept between MIN_SATURATION (so a
    near-white or uniform slide yields an empty mask) and MAX_SATURATION; then specks are removed and
    small holes filled.
    """
    saturation = rgb2hsv(thumbnail)[..., 1]
    if np.ptp(saturation) < 1e-6:  # a uniform image: Otsu has nothing to split
        return np.zeros(saturation.shape, dtype=bool)
    mask = saturation > np.clip(threshold_otsu(saturation), MIN_SATURATION, MAX_SATURATION)
    speck = max(1, round(SPECK_SHARE * mask.size))
    return remove_small_holes(remove_small_objects(mask, max_size=speck), max_size=speck)


def tile_tissue_share(mask: np.ndarray, dimensions: tuple[int, int], rects: np.ndarray) -> np.ndarray:
    """The share of each level-0 rectangle (x, y, w, h), one per row of `rects`, that `mask` calls tissue.

    The mask covers the whole slide (`dimensions`, level-0 width and height); a rectangle is widened
    to whole mask pixels, and what lies beyond the slide counts as glass. A summed-area table makes
    each rectangle four look-ups, whatever its size.
    """
    height, width = mask.shape
    scale = np.array([width / dimensions[0], height / dimensions[1]])  # mask px per level-0 px
    start = np.floor(rects[:, :2] * scale).astype(np.int64)
    stop = np.maximum(np.ceil((rects[:, :2] + rects[:, 2:]) * scale).astype(np.int64), start + 1)
    area = np.prod(stop - start, axis=1)
    x0, x1 = (np.clip(edge[:, 0], 0, width) for edge in (start, stop))
    y0, y1 = (np.clip(edge[:, 1], 0, height) for edge in (start, stop))
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    tissue = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return tissue / area


def tissue_tiles(grid: TileGrid, mask: np.ndarray, min_tissue: float = MIN_TISSUE, slide: Path | str = "the slide") -> Tiles:
    """The tiles of `grid` whose window is at least `min_tissue` tissue; a DataError naming `slide`
    when there are none."""
    if not 0 <= min_tissue <= 1:
        raise ConfigError("slide.min_tissue", f"must be a share of the window between 0 and 1, got {min_tissue}")
    tiles = all_tiles(grid)
    rects = np.column_stack([tiles.window_xy(), np.full((len(tiles), 2), grid.window_size)])
    keep = tile_tissue_share(mask, grid.dimensions, rects) >= min_tissue
    if not keep.any():
        raise DataError(f"no tissue found in {slide} (slide.min_tissue={min_tissue})")
    return tiles.subset(keep)
