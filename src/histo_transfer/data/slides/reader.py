"""Opening a whole-slide image with OpenSlide and reading RGB regions of it at a chosen resolution."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import openslide
from PIL import Image

from histo_transfer import IMAGE_SHAPE
from histo_transfer.config.errors import ConfigError, DataError

TILE = IMAGE_SHAPE[0]

LEVEL_TOLERANCE = 0.01
"""How far (as a share) a level may be coarser than wanted and still be read, and how close to 1 a
resize factor must be to be skipped. Metadata is rounded: Camelyon's 0.2431 um/px at 4x is
0.9724 um/px, not quite PCam's 0.972, and without the tolerance that slide would be read at 2x
finer resolution and shrunk (4x the pixels). 1% is well inside the spread between scanners."""

CACHE_BYTES = 64 << 20
"""OpenSlide's tile cache, shared by every handle of one slide: neighbouring blocks share tiles."""

_RESAMPLE = Image.Resampling.LANCZOS
_RESAMPLE_REACH = 3  # source pixels LANCZOS reads on either side of a target pixel, times the shrink factor


def first_line(error: BaseException) -> str:
    """The first line of an error's message (OpenSlide's and libtiff's can run on), else its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RegionError(DataError):
    """A region that OpenSlide could not read (a corrupt or missing tile); `rect` is (x, y, w, h) at level 0."""

    def __init__(self, slide: Path, rect: tuple[int, int, int, int], reason: str):
        x, y, w, h = rect
        super().__init__(f"{slide}: cannot read the region x={x} y={y} w={w} h={h} (level-0 px): {reason}")
        self.rect = rect
        self.reason = reason


@dataclass(frozen=True)
class ReadPlan:
    """How to read a slide at `target_mpp`: read `level`, then shrink by `scale` (level px per target px).

    `scale` is 1 when the level is the target resolution (within LEVEL_TOLERANCE), so nothing is resized.
    """

    target_mpp: float
    mpp: float  # um per target px as actually read (target_mpp, or the level's own within the tolerance)
    level: int
    level_downsample: float  # level-0 px per level px
    scale: float
    tile: int

    @property
    def downsample(self) -> float:
        """Level-0 px per target px."""
        return self.level_downsample * self.scale


def choose_level(level_downsamples: tuple[float, ...], wanted: float) -> int:
    """The coarsest level not coarser than `wanted` (level-0 px per target px), up to LEVEL_TOLERANCE.

    Shrinking a finer level loses nothing while enlarging a coarser one invents detail, so a coarser
    level is never chosen; when even level 0 is coarser than wanted, level 0 it is (and it is enlarged).
    """
    fitting = [level for level, downsample in enumerate(level_downsamples) if downsample <= wanted * (1 + LEVEL_TOLERANCE)]
    return max(fitting, key=lambda level: level_downsamples[level], default=0)


class Slide:
    """An open whole-slide image: level-0 `dimensions` (width, height), `mpp` (level-0 um per px), the
    pyramid, and RGB regions at a `ReadPlan`'s resolution.

    Several threads may read at once: each read borrows an OpenSlide handle of its own. OpenSlide
    refuses every call on a handle once one read failed, so a handle that raised is closed and a
    later read opens a fresh one: one corrupt tile costs that region, not the rest of the slide.
    """

    def __init__(self, path: Path, handle: openslide.OpenSlide, mpp: float):
        self.path = path
        self.mpp = mpp
        self.dimensions: tuple[int, int] = handle.dimensions
        self.level_count: int = handle.level_count
        self.level_downsamples: tuple[float, ...] = tuple(handle.level_downsamples)
        self._cache = openslide.OpenSlideCache(CACHE_BYTES)
        handle.set_cache(self._cache)
        self._idle = [handle]
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            handles, self._idle = self._idle, []
        for handle in handles:
            handle.close()

    def plan(self, target_mpp: float, tile: int = TILE) -> ReadPlan:
        """Which level to read and how much to shrink it for `target_mpp` um/px; a DataError when the
        whole slide is smaller than one `tile` at that resolution."""
        wanted = target_mpp / self.mpp
        level = choose_level(self.level_downsamples, wanted)
        scale = wanted / self.level_downsamples[level]
        if abs(scale - 1) <= LEVEL_TOLERANCE:
            scale = 1.0
        plan = ReadPlan(target_mpp, self.mpp * self.level_downsamples[level] * scale, level,
                        self.level_downsamples[level], scale, tile)
        width, height = (round(side / plan.downsample) for side in self.dimensions)
        if min(width, height) < tile:
            raise DataError(f"{self.path}: the slide is {self.dimensions[0]}x{self.dimensions[1]} px at level 0, "
                            f"{width}x{height} px at {target_mpp} um/px: smaller than one {tile}x{tile} tile")
        return plan

    def thumbnail(self, max_size: int = 2048) -> np.ndarray:
        """The whole slide as RGB uint8, its longer side at most `max_size` px, background white.

        OpenSlide reads the coarsest level that is still larger: on a slide without a pyramid that is
        level 0, whole."""
        try:
            with self._borrowed_handle() as handle:
                image = handle.get_thumbnail((max_size, max_size))
        except openslide.OpenSlideError as error:
            raise DataError(f"{self.path}: cannot read the thumbnail: {first_line(error)}") from error
        return np.asarray(image.convert("RGB"))

    def read(self, plan: ReadPlan, x: float, y: float, width: int, height: int) -> np.ndarray:
        """The RGB uint8 image (height, width, 3) at the plan's resolution whose top-left corner is
        level-0 (x, y); what lies beyond the slide, or is transparent in it, is white (glass).

        The plan's level is read with a margin and resized with PIL over the exact (fractional) source
        box, so a large region read once and cut into pieces equals the pieces read one by one, up to
        rounding: that is what lets `read_tiles` read a block of neighbouring windows at once.
        Raises RegionError (naming the slide and the level-0 rectangle) when OpenSlide cannot read it.
        """
        try:
            if plan.scale == 1 and float(x / plan.level_downsample).is_integer() and float(y / plan.level_downsample).is_integer():
                return np.asarray(self._read_on_white((round(x), round(y)), plan.level, (width, height)))
            location, size, box = _source_window(plan, x, y, width, height)
            region = self._read_on_white(location, plan.level, size)
        except openslide.OpenSlideError as error:
            rect = (round(x), round(y), round(width * plan.downsample), round(height * plan.downsample))
            raise RegionError(self.path, rect, first_line(error)) from error
        return np.asarray(region.resize((width, height), _RESAMPLE, box=box))

    def _read_on_white(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """OpenSlide's RGBA region composited on white: transparent means no tissue was scanned there."""
        with self._borrowed_handle() as handle:
            rgba = handle.read_region(location, level, size)
        region = Image.new("RGB", size, "white")
        region.paste(rgba, mask=rgba)
        return region

    @contextmanager
    def _borrowed_handle(self) -> Iterator[openslide.OpenSlide]:
        """An idle handle (or a new one) for this thread's call; one that raised is closed, not returned."""
        with self._lock:
            handle = self._idle.pop() if self._idle else None
        if handle is None:
            handle = openslide.OpenSlide(self.path)
            handle.set_cache(self._cache)
        try:
            yield handle
        except openslide.OpenSlideError:
            handle.close()
            raise
        with self._lock:
            self._idle.append(handle)


def _source_window(plan: ReadPlan, x: float, y: float, width: int,
                   height: int) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float, float, float]]:
    """What to read at the plan's level for a target-resolution region at level-0 (x, y): the level-0
    location and level size of a region with a margin all round (so the resampling filter sees real
    neighbours at the edges, as it would inside a larger region), and the exact, fractional box of
    the wanted region inside it, in level px."""
    left, top = x / plan.level_downsample, y / plan.level_downsample
    margin = math.ceil(_RESAMPLE_REACH * max(plan.scale, 1)) + 1
    origin = (math.floor(left) - margin, math.floor(top) - margin)
    box = (left - origin[0], top - origin[1], left - origin[0] + width * plan.scale, top - origin[1] + height * plan.scale)
    size = (math.ceil(box[2]) + margin, math.ceil(box[3]) + margin)
    location = (round(origin[0] * plan.level_downsample), round(origin[1] * plan.level_downsample))
    return location, size, box


def _metadata_mpp(properties: Mapping[str, str]) -> float | None:
    """Level-0 um per px from OpenSlide's normalised properties, the mean of x and y; None if absent."""
    try:
        values = [float(properties[key]) for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)]
    except (KeyError, ValueError):
        return None
    return sum(values) / 2 if min(values) > 0 else None


def open_slide(path: Path | str, mpp_override: float | None = None) -> Slide:
    """Open a whole-slide image in any format OpenSlide reads; `mpp_override` (um per level-0 px)
    replaces the slide's own metadata, and is required when the slide has none.

    Every way this can fail is a one-line DataError naming the file.
    """
    path = Path(path)
    if mpp_override is not None and not mpp_override > 0:
        raise ConfigError("slide.mpp_override", f"must be a positive number of um per pixel, got {mpp_override}")
    if not path.is_file():
        raise DataError(f"{path}: no such slide file")
    try:
        handle = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as error:
        raise DataError(f"{path}: not a whole-slide image in a format OpenSlide reads") from error
    except (openslide.OpenSlideError, OSError) as error:  # OSError includes PIL's UnidentifiedImageError
        raise DataError(f"{path}: corrupt or truncated slide: {first_line(error)}") from error
    mpp = mpp_override or _metadata_mpp(handle.properties)
    if mpp is None:
        handle.close()
        raise DataError(f"{path}: the slide does not say how many microns a pixel is (no openslide.mpp-x/-y); "
                        "pass slide.mpp_override=<um per px>")
    return Slide(path, handle, mpp)
