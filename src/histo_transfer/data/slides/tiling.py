"""The PCam-like tiling of a slide: centre cells of 32 px, each scored through the 96-px window around it.

Edge handling: the cells cover the slide up to and including its last, partial row and column, and a
window that reaches past the slide's edge is filled with white (OpenSlide's transparent background
composited on white, which is what glass looks like). So a cell at the border is scored like any
other and the outermost 32 px of the slide are not lost; the tissue gate drops windows that are
mostly white anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histo_transfer.data.slides.reader import ReadPlan

STRIDE = 32
"""Target px between neighbouring windows: PCam's label is the centre 32x32 px of a 96x96 patch."""


@dataclass(frozen=True)
class TileGrid:
    """Centre cells of `stride` target px from the slide's top-left corner, each scored through the
    `tile`-px window centred on it. Level-0 coordinates are floats: a target px is `downsample`
    level-0 px, which is rarely a whole number."""

    dimensions: tuple[int, int]  # the slide's level 0 (width, height)
    downsample: float  # level-0 px per target px
    mpp: float  # um per target px
    tile: int
    stride: int = STRIDE

    def __post_init__(self) -> None:
        if self.tile <= self.stride or (self.tile - self.stride) % 2:
            raise ValueError(f"a {self.tile}-px window cannot be centred on a {self.stride}-px cell")

    @classmethod
    def for_plan(cls, dimensions: tuple[int, int], plan: ReadPlan, stride: int = STRIDE) -> TileGrid:
        return cls(dimensions, plan.downsample, plan.mpp, plan.tile, stride)

    @property
    def cell_size(self) -> float:
        """Side of a centre cell in level-0 px."""
        return self.stride * self.downsample

    @property
    def cell_um(self) -> float:
        """Side of a centre cell in um."""
        return self.stride * self.mpp

    @property
    def window_size(self) -> float:
        """Side of a window in level-0 px."""
        return self.tile * self.downsample

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of cells, a partial cell at the right and bottom edges included."""
        width, height = self.dimensions
        return math.ceil(height / self.cell_size - 1e-9), math.ceil(width / self.cell_size - 1e-9)

    def cell_origin(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of the top-left corner of cells (rows, cols)."""
        return np.asarray(cols) * self.cell_size, np.asarray(rows) * self.cell_size

    def window_origin(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of the top-left corner of the windows around cells (rows, cols); may be negative."""
        margin = (self.tile - self.stride) / 2 * self.downsample
        x, y = self.cell_origin(rows, cols)
        return x - margin, y - margin


@dataclass(frozen=True)
class Tiles:
    """The windows to score, named by their centre cell: tile i is cell (rows[i], cols[i]) of `grid`."""

    grid: TileGrid
    rows: np.ndarray
    cols: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> Tiles:
        return Tiles(self.grid, self.rows[keep], self.cols[keep])

    def cell_xy(self) -> np.ndarray:
        """(N, 2) level-0 (x, y) of each tile's centre cell."""
        return np.column_stack(self.grid.cell_origin(self.rows, self.cols))

    def window_xy(self) -> np.ndarray:
        """(N, 2) level-0 (x, y) of each tile's window."""
        return np.column_stack(self.grid.window_origin(self.rows, self.cols))

    def probability_map(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The grid of probabilities, one per cell: `values` for tiles `indices`, NaN where nothing was scored."""
        grid = np.full(self.grid.shape, np.nan, dtype=np.float32)
        grid[self.rows[indices], self.cols[indices]] = values
        return grid


def all_tiles(grid: TileGrid) -> Tiles:
    """Every cell of the grid, row by row."""
    rows, cols = np.indices(grid.shape).reshape(2, -1)
    return Tiles(grid, rows, cols)
