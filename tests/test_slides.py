"""Whole-slide images: opening (microns per pixel, the read plan, one-line errors), the tissue mask,
the PCam-like tiling, parallel batched reading (exact windows, bounded memory, unreadable regions
skipped) and tumour regions as QuPath GeoJSON. Slides are small TIFFs written by `slide_helpers`."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from slide_helpers import PCAM_TRAIN, corrupt_tiff_tile, write_test_slide

from histo_transfer.config.errors import DataError
from histo_transfer.data.slides import batches
from histo_transfer.data.slides.batches import read_tiles
from histo_transfer.data.slides.reader import choose_level, open_slide
from histo_transfer.data.slides.regions import (
    cells_area_mm2,
    regions_geojson,
    tissue_area_mm2,
    tumour_area_mm2,
    tumour_regions,
    write_geojson,
)
from histo_transfer.data.slides.tiling import TileGrid, all_tiles
from histo_transfer.data.slides.tissue import MIN_TISSUE, tissue_mask, tissue_tiles

PCAM_MPP = 0.972


@pytest.fixture(scope="module")
def test_slide(tmp_path_factory):
    return write_test_slide(tmp_path_factory.mktemp("slides") / "slide.tif")


def _rect_mask(shape: tuple[int, int], dimensions: tuple[int, int], rect) -> np.ndarray:
    """The level-0 rectangle drawn on a mask of `shape` covering a slide of `dimensions`."""
    rows = (np.arange(shape[0]) + 0.5) * dimensions[1] / shape[0]
    cols = (np.arange(shape[1]) + 0.5) * dimensions[0] / shape[1]
    x, y, width, height = rect
    return ((rows >= y) & (rows < y + height))[:, None] & ((cols >= x) & (cols < x + width))[None, :]


def _overlap(a, b) -> float:
    """Area shared by two (x, y, w, h) rectangles."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def _tissue_tiles(slide, plan):
    grid = TileGrid.for_plan(slide.dimensions, plan)
    return tissue_tiles(grid, tissue_mask(slide.thumbnail(512)), slide=slide.path)


# --- opening a slide, the read plan -------------------------------------------------------------


def test_mpp_comes_from_the_resolution_tags_and_the_plan_reads_the_coarsest_level_not_coarser_than_wanted(test_slide):
    with open_slide(test_slide.path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.dimensions == test_slide.dimensions
        assert slide.level_count == 3 and slide.level_downsamples == pytest.approx((1, 2, 4))
        twice = slide.plan(1.0)  # level 1 is exactly 1 um/px: read it as it is
        assert (twice.level, twice.scale, twice.downsample) == (1, 1.0, 2.0)
        pcam = slide.plan(PCAM_MPP)  # 1.944x: level 1 (2x) would have to be enlarged, so level 0 shrunk
        assert (pcam.level, pcam.level_downsample) == (0, 1.0)
        assert pcam.scale == pytest.approx(PCAM_MPP / 0.5) and pcam.mpp == pytest.approx(PCAM_MPP)


def test_metadata_rounding_does_not_force_a_finer_level(tmp_path):
    written = write_test_slide(tmp_path / "camelyon.tif", mpp=0.2431)  # 4x is 0.9724 um/px, PCam's 0.972
    with open_slide(written.path) as slide:
        plan = slide.plan(PCAM_MPP)
    assert (plan.level, plan.scale) == (2, 1.0)
    assert choose_level((1.0, 2.0, 4.0), 3.8) == 1
    assert choose_level((1.0, 2.0, 4.0), 0.5) == 0  # the slide is coarser than wanted: level 0, enlarged
    assert choose_level((1.0, 2.0, 4.0), 100) == 2


def test_a_slide_without_mpp_asks_for_the_override_and_the_override_is_used(tmp_path):
    written = write_test_slide(tmp_path / "nompp.tif", mpp=None)
    with pytest.raises(DataError, match=r"nompp\.tif.*slide\.mpp_override=<um per px>"):
        open_slide(written.path)
    with open_slide(written.path, mpp_override=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.plan(1.0).level == 2


@pytest.mark.parametrize("kind", ["random.svs", "random.tif", "half.tif", "most.tif", "missing.tif"])
def test_a_file_that_is_not_a_readable_slide_is_a_one_line_data_error_naming_it(tmp_path, kind):
    path = tmp_path / kind
    if kind.startswith("random"):
        path.write_bytes(os.urandom(20_000))
    elif kind != "missing.tif":
        whole = write_test_slide(tmp_path / "whole.tif").path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2] if kind == "half.tif" else whole[:len(whole) * 9 // 10])
    with pytest.raises(DataError) as raised:
        open_slide(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message


def test_a_slide_smaller_than_one_tile_is_a_data_error_with_its_size(tmp_path):
    written = write_test_slide(tmp_path / "tiny.tif", size=(160, 128), tissue=(16, 16, 96, 96), tumour=(32, 32, 16, 16),
                               levels=1)
    with open_slide(written.path) as slide, pytest.raises(DataError, match=r"tiny\.tif.*160x128 px.*one 96x96 tile"):
        slide.plan(PCAM_MPP)


# --- tissue ---------------------------------------------------------------------------------------


def test_a_blank_slide_has_no_tissue(tmp_path):
    written = write_test_slide(tmp_path / "blank.tif", blank=True)
    with open_slide(written.path) as slide:
        mask = tissue_mask(slide.thumbnail(512))
        assert not mask.any()
        grid = TileGrid.for_plan(slide.dimensions, slide.plan(PCAM_MPP))
        with pytest.raises(DataError, match=rf"no tissue found in .*blank\.tif \(slide\.min_tissue={MIN_TISSUE}\)"):
            tissue_tiles(grid, mask, slide=slide.path)


def test_near_white_noise_is_not_tissue():
    rng = np.random.default_rng(0)
    glass = rng.integers(245, 256, size=(200, 300, 3)).astype(np.uint8)  # saturation up to 0.04
    assert not tissue_mask(glass).any()


def test_the_tissue_mask_covers_the_tissue_rectangle_and_not_the_glass(test_slide):
    with open_slide(test_slide.path) as slide:
        mask = tissue_mask(slide.thumbnail(512))
    truth = _rect_mask(mask.shape, test_slide.dimensions, test_slide.tissue)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


@pytest.mark.skipif(not PCAM_TRAIN.is_dir(), reason="../shared/data/pcam_sample is absent (fresh clone)")
def test_a_mosaic_of_real_patches_is_found_as_tissue(tmp_path):
    written = write_test_slide(tmp_path / "mosaic.tif", patches=PCAM_TRAIN)
    with open_slide(written.path) as slide:
        mask = tissue_mask(slide.thumbnail(512))
    truth = _rect_mask(mask.shape, written.dimensions, written.tissue)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.75  # real patches hold some fat and glass themselves


# --- tiling ---------------------------------------------------------------------------------------


def test_tiles_lie_on_tissue_and_every_cell_inside_the_tissue_is_a_tile_exactly_once(test_slide):
    with open_slide(test_slide.path) as slide:
        tiles = _tissue_tiles(slide, slide.plan(PCAM_MPP))
    grid = tiles.grid
    windows = [(x, y, grid.window_size, grid.window_size) for x, y in tiles.window_xy()]
    shares = np.array([_overlap(window, test_slide.tissue) / grid.window_size ** 2 for window in windows])
    assert shares.min() > MIN_TISSUE - 0.1  # never glass; the margin is the thumbnail's pixel size
    cells = list(zip(tiles.rows.tolist(), tiles.cols.tolist()))
    assert len(cells) == len(set(cells))
    every = all_tiles(grid)
    inside = {(row, col) for row, col, (x, y) in zip(every.rows.tolist(), every.cols.tolist(), every.cell_xy())
              if _overlap((x, y, grid.cell_size, grid.cell_size), test_slide.tissue) == pytest.approx(grid.cell_size ** 2)}
    assert inside and inside <= set(cells)


def test_the_grid_covers_the_partial_edge_cells_and_pads_their_windows_with_white(test_slide):
    with open_slide(test_slide.path) as slide:
        plan = slide.plan(PCAM_MPP)
        grid = TileGrid.for_plan(slide.dimensions, plan)
        rows, cols = grid.shape
        assert (cols - 1) * grid.cell_size < slide.dimensions[0] <= cols * grid.cell_size
        assert (rows - 1) * grid.cell_size < slide.dimensions[1] <= rows * grid.cell_size
        corner = slide.read(plan, *(float(v) for v in grid.window_origin(0, 0)), 96, 96)
    assert (corner[:32] == 255).all() and (corner[:, :32] == 255).all()


# --- reading tiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("target_mpp", [1.0, PCAM_MPP], ids=["level-1-as-is", "resized"])
def test_read_tiles_yields_each_window_once_equal_to_reading_it_alone(test_slide, target_mpp):
    with open_slide(test_slide.path) as slide:
        plan = slide.plan(target_mpp)
        tiles = _tissue_tiles(slide, plan)
        reader = read_tiles(slide, plan, tiles, batch_size=20, workers=2, block_cells=4)  # batches split blocks
        batches_read = list(reader)
        indices = np.concatenate([batch.indices for batch in batches_read])
        images = np.concatenate([batch.images for batch in batches_read])
        assert sorted(indices.tolist()) == list(range(len(tiles))) and reader.skipped == 0
        assert images.shape[1:] == (96, 96, 3) and images.dtype == np.uint8
        alone = np.stack([slide.read(plan, x, y, 96, 96) for x, y in tiles.window_xy()[indices]])
    difference = np.abs(images.astype(int) - alone)
    if plan.scale == 1:
        assert difference.max() == 0
    else:  # the same source box resized in one piece or in many: rounding only
        assert difference.max() <= 2 and difference.mean() < 0.05


def test_with_a_slow_consumer_no_more_than_twice_the_workers_batches_are_in_flight(test_slide, monkeypatch):
    started = 0
    lock = threading.Lock()
    read_batch = batches._read_batch

    def counting_read_batch(*args):
        nonlocal started
        with lock:
            started += 1
        return read_batch(*args)

    monkeypatch.setattr(batches, "_read_batch", counting_read_batch)
    with open_slide(test_slide.path) as slide:
        plan = slide.plan(1.0)
        tiles = _tissue_tiles(slide, plan)
        reader = read_tiles(slide, plan, tiles, batch_size=8, workers=2)
        assert reader.max_in_flight == 4
        consumed = peak = 0
        for _ in reader:
            time.sleep(0.02)  # the workers have long finished everything they were allowed to start
            consumed += 1
            with lock:
                peak = max(peak, started - (consumed - 1))  # the batch held counts until the next is asked for
    assert peak == reader.max_in_flight  # read ahead, but no further
    assert consumed == -(-len(tiles) // 8) and started == consumed


def test_an_unreadable_region_is_skipped_reported_with_its_coordinates_and_the_rest_is_read(tmp_path):
    written = write_test_slide(tmp_path / "corrupt.tif")
    bad = corrupt_tiff_tile(written.path, 600, 400)  # a level-0 TIFF tile inside the tissue
    with open_slide(written.path) as slide:
        plan = slide.plan(PCAM_MPP)  # reads level 0, where the bad tile is
        tiles = _tissue_tiles(slide, plan)
        reader = read_tiles(slide, plan, tiles, batch_size=16, workers=1)  # one handle: it must be reopened
        read = np.concatenate([batch.indices for batch in reader])
    window = tiles.grid.window_size
    margin = 8  # a resized read reaches a few px beyond its window
    around_bad = (bad[0] - margin, bad[1] - margin, bad[2] + 2 * margin, bad[3] + 2 * margin)
    near_bad = (around_bad[0] - window, around_bad[1] - window, around_bad[2] + window, around_bad[3] + window)
    far = {i for i, (x, y) in enumerate(tiles.window_xy()) if _overlap((x, y, 1, 1), near_bad) == 0}
    assert 0 < reader.skipped == len(tiles) - len(read) < len(tiles) // 2
    assert far <= set(read.tolist())
    for failure in reader.unreadable:
        assert _overlap(failure.rect, around_bad) > 0 and failure.rect[2:] == (round(window),) * 2
        assert "incorrect header check" in failure.reason and "\n" not in failure.reason


# --- regions --------------------------------------------------------------------------------------


def test_a_square_above_threshold_is_one_polygon_whose_box_matches_the_square(tmp_path):
    probabilities = np.full((20, 30), np.nan)
    probabilities[2:18, 2:28] = 0.1
    probabilities[5:10, 10:16] = 0.8  # rows 5-9, cols 10-15
    probabilities[7, 12] = 0.97
    cell_size = 32 * PCAM_MPP / 0.5
    regions = tumour_regions(probabilities, 0.5, cell_size)
    assert len(regions) == 1 and regions[0].cells == 30 and not regions[0].holes
    ring = regions[0].exterior
    assert (ring[0] == ring[-1]).all()
    expected = np.array([10, 5, 16, 10]) * cell_size  # x0, y0, x1, y1 of the square's cells
    assert np.abs(np.r_[ring.min(axis=0), ring.max(axis=0)] - expected).max() <= cell_size
    collection = json.loads(write_geojson(tmp_path / "tumour.geojson", regions).read_text())
    assert collection["type"] == "FeatureCollection"
    (feature,) = collection["features"]
    assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert feature["properties"]["max_probability"] == pytest.approx(0.97)
    assert all(len(ring) >= 4 and ring[0] == ring[-1] for ring in feature["geometry"]["coordinates"])


def test_separate_regions_are_separate_features_and_a_hole_is_an_inner_ring():
    probabilities = np.zeros((12, 12))
    probabilities[1:6, 1:6] = 0.9
    probabilities[3, 3] = 0.2  # a hole
    probabilities[8:10, 8:10] = 0.7
    regions = tumour_regions(probabilities, 0.5, 10.0)
    assert [region.cells for region in regions] == [24, 4]
    assert len(regions[0].holes) == 1 and not regions[1].holes
    features = regions_geojson(regions)["features"]
    assert [len(feature["geometry"]["coordinates"]) for feature in features] == [2, 1]


def test_areas_in_square_millimetres():
    cell_um = 32 * PCAM_MPP
    probabilities = np.full((10, 10), np.nan)
    probabilities[:5] = 0.2  # 50 cells scored
    probabilities[0, :3] = 0.6  # 3 of them tumour
    assert cells_area_mm2(1, cell_um) == pytest.approx(0.031104 ** 2)
    assert tissue_area_mm2(probabilities, cell_um) == pytest.approx(50 * 0.031104 ** 2)
    assert tumour_area_mm2(probabilities, 0.5, cell_um) == pytest.approx(3 * 0.031104 ** 2)


def test_probabilities_of_tiles_land_in_their_cells():
    grid = TileGrid((640, 320), 1.0, 1.0, 96)
    tiles = all_tiles(grid).subset(np.array([3, 25]))
    assert grid.shape == (10, 20)
    probability_map = tiles.probability_map(np.array([1]), np.array([0.75]))
    assert probability_map[1, 5] == 0.75 and np.isnan(probability_map).sum() == 199
