"""Reading a slide's windows in batches, on worker threads, with memory bounded whatever the slide's size.

Windows 96 px wide every 32 px overlap three times in each direction: read one by one, every pixel
would be read (and decoded, and resized) nine times. So a worker reads a block of up to
`block_cells` x `block_cells` neighbouring windows as one region and cuts the windows out of it
(8 x 8 windows: 320x320 px instead of 64 x 96x96, 5.8 times fewer pixels).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from histo_transfer.data.slides.reader import ReadPlan, RegionError, Slide
from histo_transfer.data.slides.tiling import Tiles

BLOCK_CELLS = 8


class TileBatch(NamedTuple):
    indices: np.ndarray  # positions in the `Tiles` that were read
    images: np.ndarray  # (len(indices), tile, tile, 3) uint8


@dataclass(frozen=True)
class Unreadable:
    """A window that could not be read: level-0 (x, y, w, h) and the first line of OpenSlide's error."""

    rect: tuple[int, int, int, int]
    reason: str


class TileReader:
    """Iterating yields a `TileBatch` per `batch_size` tiles (fewer where some were unreadable), read by
    `workers` threads (OpenSlide's C calls release the GIL).

    Memory: at most `max_in_flight` = 2 x `workers` batches exist at once, counting those being read,
    those read and waiting, and the one the consumer holds; a batch is released when the consumer asks
    for the next. Windows that cannot be read are skipped and listed in `unreadable`, and the rest of
    the slide is still read.
    """

    def __init__(self, slide: Slide, plan: ReadPlan, tiles: Tiles, batch_size: int, workers: int, block_cells: int):
        if batch_size < 1 or workers < 1 or block_cells < 1:
            raise ValueError("batch_size, workers and block_cells must be positive")
        self.slide, self.plan, self.tiles = slide, plan, tiles
        self.batch_size, self.workers, self.block_cells = batch_size, workers, block_cells
        self.max_in_flight = 2 * workers
        self.unreadable: list[Unreadable] = []

    @property
    def skipped(self) -> int:
        return len(self.unreadable)

    def __iter__(self) -> Iterator[TileBatch]:
        self.unreadable = []
        jobs = iter(_batch_jobs(self.tiles, self.batch_size, self.block_cells))
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="slide-reader") as pool:
            def refill() -> None:
                while len(pending) < self.max_in_flight and (job := next(jobs, None)) is not None:
                    pending.append(pool.submit(_read_batch, self.slide, self.plan, self.tiles, job, self.block_cells))

            try:
                refill()
                while pending:
                    batch, unreadable = pending[0].result()
                    self.unreadable.extend(unreadable)
                    if len(batch.indices):
                        yield batch
                    pending.popleft()  # the consumer asked for more: its batch is released
                    refill()
            finally:  # the consumer stopped early, or a read failed in an unexpected way
                for future in pending:
                    future.cancel()


def read_tiles(slide: Slide, plan: ReadPlan, tiles: Tiles, batch_size: int = 256, workers: int = 2,
               block_cells: int = BLOCK_CELLS) -> TileReader:
    """The windows of `tiles` as uint8 batches (see TileReader); iterate over the result."""
    return TileReader(slide, plan, tiles, batch_size, workers, block_cells)


def _batch_jobs(tiles: Tiles, batch_size: int, block_cells: int) -> Iterator[np.ndarray]:
    """Tile indices in batches, ordered block by block so that a batch covers few blocks."""
    order = np.lexsort((tiles.cols, tiles.rows, tiles.cols // block_cells, tiles.rows // block_cells))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _read_batch(slide: Slide, plan: ReadPlan, tiles: Tiles, indices: np.ndarray,
                block_cells: int) -> tuple[TileBatch, list[Unreadable]]:
    """Read one batch block by block; a block that fails is read again window by window, so only the
    windows that touch the unreadable part are lost."""
    rows, cols = tiles.rows[indices], tiles.cols[indices]
    images = np.empty((len(indices), plan.tile, plan.tile, 3), dtype=np.uint8)
    read = np.ones(len(indices), dtype=bool)
    unreadable: list[Unreadable] = []
    blocks_per_row = tiles.grid.shape[1] // block_cells + 1
    block_of = (rows // block_cells) * blocks_per_row + cols // block_cells
    for block in np.unique(block_of):
        members = np.flatnonzero(block_of == block)
        try:
            images[members] = _cut_windows(slide, plan, tiles, rows[members], cols[members])
        except RegionError:
            for member in members:
                try:
                    images[member] = _cut_windows(slide, plan, tiles, rows[member:member + 1], cols[member:member + 1])[0]
                except RegionError as error:
                    read[member] = False
                    unreadable.append(Unreadable(error.rect, error.reason))
    return TileBatch(indices[read], images[read]), unreadable


def _cut_windows(slide: Slide, plan: ReadPlan, tiles: Tiles, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The windows around cells (rows, cols), cut from one region that covers them all."""
    grid = tiles.grid
    top, left = rows.min(), cols.min()
    x, y = grid.window_origin(top, left)
    width = grid.stride * int(cols.max() - left) + grid.tile
    height = grid.stride * int(rows.max() - top) + grid.tile
    region = slide.read(plan, float(x), float(y), width, height)
    windows = sliding_window_view(region, (grid.tile, grid.tile, 3))[::grid.stride, ::grid.stride, 0]
    return windows[rows - top, cols - left]
