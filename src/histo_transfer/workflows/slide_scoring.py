"""Whole-slide images scored with any model reference (predict_slide.py), each slide a tracked run.

One slide: open it, plan the read at `slide.mpp`, keep the windows on tissue, read them in batches
on worker threads, score them with the project's TensorFlow inference (TTA and ensembles as
predict.py's), and turn the scores into a probability map, a heat-map overlay, tiles.csv, QuPath
GeoJSON regions and slide metrics, written to `output=` and logged as the run's artifacts.

Many slides (`slides=DIR` or a glob): one parent run (kind `slide-folder`) with a child per slide; a
slide that fails ends its own run FAILED and the others go on; the parent's table ranks the slides
by `slide/top_k_mean`, the order in which a pathologist might look at them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib  # its colour maps only: no plotting backend is chosen
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image

from histo_transfer.config.errors import DataError
from histo_transfer.data.slides.batches import TileBatch, TileReader, read_tiles
from histo_transfer.data.slides.reader import ReadPlan, Slide, first_line, open_slide
from histo_transfer.data.slides.regions import tissue_area_mm2, tumour_area_mm2, tumour_regions, write_geojson
from histo_transfer.data.slides.tiling import TileGrid, Tiles
from histo_transfer.data.slides.tissue import tissue_mask, tissue_tiles
from histo_transfer.evaluation.inference import COMBINE, predict_probabilities, scoring_step
from histo_transfer.tracking import runs as tracking
from histo_transfer.tracking.registry import load_models
from histo_transfer.tracking.schema import (
    KIND_TAG,
    PARENT_TAG,
    SLIDE_DIR,
    SLIDE_OVERLAY_PNG,
    SLIDE_PATH_TAG,
    SLIDE_PROBABILITY_NPY,
    SLIDE_PROBABILITY_PNG,
    SLIDE_REGIONS_GEOJSON,
    SLIDE_SOURCE_TAG,
    SLIDE_SUMMARY_ARTIFACT,
    SLIDE_TILES_CSV,
    SLIDE_UNREADABLE_CSV,
    RunKind,
)
from histo_transfer.workflows.scoring import model_tags

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 2048
"""Longer side of the thumbnail the tissue mask is found on (and the overlay drawn on): a 100k-px
slide's mask pixel is then about 50 level-0 px, a seventh of a 0.25 um/px slide's window."""

CHUNK_TILES = 4096
"""Tiles scored per call of the inference path (113 MB of 96-px RGB). The model scores one chunk on
a thread of its own while the readers fill the next."""

DEFAULT_OUTPUT = "slide_predictions"  # under paths.output_dir, when output= is not given

HEAT_ALPHA = 0.5
HEAT_COLOURMAP = "turbo"  # blue (0) to red (1); glass and tissue below min_tissue are left unpainted


@dataclass
class PreparedSlide:
    """A slide opened and planned, with the tiles on its tissue: what can fail on bad input, done
    before any model runs."""

    slide: Slide
    plan: ReadPlan
    tiles: Tiles
    thumbnail: np.ndarray

    def __enter__(self) -> PreparedSlide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.slide.close()


def prepare_slide(path: Path, slide_cfg: DictConfig) -> PreparedSlide:
    """Open `path`, plan its read at `slide.mpp`, and keep the windows with `slide.min_tissue`; every
    bad input is a one-line DataError naming the slide (data.slides)."""
    slide = open_slide(path, slide_cfg.mpp_override)
    try:
        plan = slide.plan(slide_cfg.mpp)
        grid = TileGrid.for_plan(slide.dimensions, plan, slide_cfg.stride)
        thumbnail = slide.thumbnail(thumbnail_size(slide))
        tiles = tissue_tiles(grid, tissue_mask(thumbnail), slide_cfg.min_tissue, path)
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(slide, plan, tiles, thumbnail)


def thumbnail_size(slide: Slide) -> int:
    """THUMBNAIL_SIZE, or less on a small slide with a pyramid: OpenSlide then reads the thumbnail from
    level 1 rather than level 0, so that a corrupt level-0 tile costs its own windows (read_tiles skips
    them), not the whole slide's tissue mask. A large slide's thumbnail comes from a coarse level anyway."""
    if slide.level_count < 2:
        return THUMBNAIL_SIZE
    return min(THUMBNAIL_SIZE, int(max(slide.dimensions) / slide.level_downsamples[1]))


def predict_slides(cfg: DictConfig, paths: list[Path], folder: bool, context=None) -> list[Path]:
    """Score `paths` (validated by tasks.predict_slide) and return the output folder of each slide
    scored. One slide: its bad input fails before any run starts. A folder: see the module's note; a
    DataError at the end names the slides that failed."""
    experiment_id = tracking.setup(cfg.tracking)
    output = Path(cfg.output or Path(cfg.paths.output_dir) / DEFAULT_OUTPUT).expanduser().resolve()
    folders = _output_folders(paths, output)
    if not folder:
        [path] = paths
        tags = {PARENT_TAG: context.parent_run_id} if context is not None and context.parent_run_id else {}
        with prepare_slide(path, cfg.slide) as prepared:  # bad input fails here: before the model loads, no run
            members = load_models(cfg.model, cfg.ensemble.top_k)
            with _slide_run(experiment_id, path, cfg, members, tags):
                score_slide(prepared, [m.model for m in members], cfg, folders[path])
        return [folders[path]]

    members = load_models(cfg.model, cfg.ensemble.top_k)
    rows = []
    parent_tags = {KIND_TAG: RunKind.SLIDE_FOLDER.value, SLIDE_SOURCE_TAG: str(cfg.slides), "tta": cfg.tta,
                   **model_tags(cfg, members)}
    with tracking.tracked_run(experiment_id, f"slides {cfg.slides} tta={cfg.tta}", parent_tags) as parent:
        for number, path in enumerate(paths, start=1):
            log.info("slide %d of %d: %s", number, len(paths), path)
            run = None
            try:
                with _slide_run(experiment_id, path, cfg, members, {}, nested=True) as run:
                    with prepare_slide(path, cfg.slide) as prepared:
                        metrics = score_slide(prepared, [m.model for m in members], cfg, folders[path])
                rows.append({"slide_file": str(path), "run_id": run.info.run_id, "status": "FINISHED", **metrics})
            except Exception as exc:  # noqa: BLE001 - its run ended FAILED with the error; the next slide goes on
                log.error("%s: %s", path, first_line(exc))
                rows.append({"slide_file": str(path), "run_id": run.info.run_id if run else "", "status": "FAILED",
                             "error": first_line(exc)})
        failed = [row for row in rows if row["status"] == "FAILED"]
        _log_folder_summary(rows)
        if failed:
            names = ", ".join(Path(row["slide_file"]).name for row in failed)
            raise DataError(f"{len(failed)} of {len(paths)} slides failed ({names}); each one's run ended FAILED with "
                            f"its error as tag `error`, the others are under parent run {parent.info.run_id}")
    print(f"scored {len(paths)} slides under parent run {parent.info.run_id}; outputs in {output}")
    return [folders[path] for path in paths]


def _slide_run(experiment_id: str, path: Path, cfg: DictConfig, members, tags: dict[str, str], nested: bool = False):
    tags = {KIND_TAG: RunKind.SLIDE.value, SLIDE_PATH_TAG: str(path), "tta": cfg.tta, **model_tags(cfg, members), **tags}
    return tracking.tracked_run(experiment_id, f"slide {path.name} tta={cfg.tta}", tags, nested=nested,
                                system_metrics=cfg.tracking.system_metrics)


def _output_folders(paths: list[Path], output: Path) -> dict[Path, Path]:
    """One folder per slide, named after its file; slides of the same name (a glob over several
    folders) are told apart by a number."""
    folders, taken = {}, set()
    for path in paths:
        name, number = path.stem, 1
        while name in taken:
            number += 1
            name = f"{path.stem}-{number}"
        taken.add(name)
        folders[path] = output / name
    return folders


def score_slide(prepared: PreparedSlide, models: list, cfg: DictConfig, folder: Path) -> dict[str, float]:
    """Score the tiles of a prepared slide inside the active run: outputs into `folder` and the run's
    `slide/` artifacts, slide metrics returned and logged."""
    slide, plan, tiles = prepared.slide, prepared.plan, prepared.tiles
    mlflow.log_params({**{f"slide.{key}": value for key, value in tracking.flat_params(cfg.slide).items()},
                       "read.slide_mpp": round(slide.mpp, 5), "read.level": plan.level,
                       "read.scale": round(plan.scale, 5), "read.dimensions": "x".join(map(str, slide.dimensions))})
    log.info("%s: %dx%d px at %.4f um/px, level %d shrunk %.3fx, %d tissue tiles of %d",
             slide.path, *slide.dimensions, slide.mpp, plan.level, plan.scale, len(tiles),
             int(np.prod(tiles.grid.shape)))
    reader = read_tiles(slide, plan, tiles, cfg.slide.batch_size, cfg.slide.workers)
    started = time.perf_counter()
    indices, probabilities = score_tiles(models, reader, len(tiles), cfg, slide.path.name)
    seconds = time.perf_counter() - started
    for region in reader.unreadable:
        x, y, width, height = region.rect
        log.warning("%s: skipped the unreadable region x=%d y=%d w=%d h=%d (level-0 px): %s",
                    slide.path, x, y, width, height, region.reason)
    if not len(indices):
        raise DataError(f"{slide.path}: none of its {len(tiles)} tissue tiles could be read")
    grid = tiles.probability_map(indices, probabilities)
    regions = tumour_regions(grid, cfg.slide.threshold, tiles.grid.cell_size)
    top_k = np.sort(probabilities)[-cfg.slide.top_k:]
    metrics = {"slide/max_prob": float(probabilities.max()), "slide/top_k_mean": float(top_k.mean()),
               "slide/tumour_area_mm2": tumour_area_mm2(grid, cfg.slide.threshold, tiles.grid.cell_um),
               "slide/tissue_area_mm2": tissue_area_mm2(grid, tiles.grid.cell_um),
               "slide/tiles_scored": len(indices), "slide/regions_unreadable": reader.skipped,
               "slide/tumour_regions": len(regions), "slide/tiles_per_second": len(indices) / max(seconds, 1e-9)}
    folder.mkdir(parents=True, exist_ok=True)
    _write_outputs(folder, prepared, indices, probabilities, grid, reader)
    write_geojson(folder / SLIDE_REGIONS_GEOJSON, regions)
    mlflow.log_artifacts(str(folder), SLIDE_DIR)
    mlflow.log_metrics(metrics)
    print(f"{slide.path}: {len(indices)} tiles ({metrics['slide/tiles_per_second']:.0f} tiles/s), "
          f"max {metrics['slide/max_prob']:.3f}, top-{len(top_k)} mean {metrics['slide/top_k_mean']:.3f}, "
          f"tumour {metrics['slide/tumour_area_mm2']:.3f} of {metrics['slide/tissue_area_mm2']:.3f} mm^2 "
          f"in {len(regions)} regions; {reader.skipped} unreadable; wrote {folder}")
    return metrics


def score_tiles(models: list, reader: TileReader, total: int, cfg: DictConfig, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(tile indices, probabilities) of the tiles read: chunks of tiles go to the model on a thread of
    its own, so that reading the next chunk overlaps scoring this one. Memory: the chunk being scored,
    the one being gathered, and the readers' batches in flight."""
    each: list[list[np.ndarray]] = [[] for _ in models]
    indices: list[np.ndarray] = []
    started = time.perf_counter()

    steps = [scoring_step(model, cfg.tta) for model in models]  # traced once per slide, not once per chunk

    def score(images: np.ndarray) -> list[np.ndarray]:
        return [predict_probabilities(model, images, cfg.slide.batch_size, cfg.tta, progress=False, step=step)
                for model, step in zip(models, steps)]

    def collect(chunk_indices: np.ndarray, scored) -> None:
        for member, values in zip(each, scored.result()):
            member.append(values)
        indices.append(chunk_indices)
        done, seconds = sum(map(len, indices)), time.perf_counter() - started
        rate = done / max(seconds, 1e-9)
        log.info("%s: %d/%d tiles, %.0f tiles/s, ETA %.0f s", name, done, total, rate, max(total - done, 0) / rate)

    with ThreadPoolExecutor(1, thread_name_prefix="slide-model") as model_thread:
        pending = None
        for chunk_indices, images in _chunks(reader, CHUNK_TILES):
            if pending is not None:
                collect(*pending)
            pending = (chunk_indices, model_thread.submit(score, images))
        if pending is not None:
            collect(*pending)
    if not indices:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    members = np.stack([np.concatenate(member) for member in each])
    # combined over the whole slide, not chunk by chunk: `rank` ranks a tile among all of the slide's
    combined = members[0] if len(members) == 1 else COMBINE[cfg.ensemble.method](members).astype(np.float32)
    return np.concatenate(indices), combined


def _chunks(batches: Iterable[TileBatch], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive batches joined into chunks of at least `size` tiles (the last one may be smaller)."""
    indices, images, count = [], [], 0
    for batch in batches:
        indices.append(batch.indices)
        images.append(batch.images)
        count += len(batch.indices)
        if count >= size:
            yield np.concatenate(indices), np.concatenate(images)
            indices, images, count = [], [], 0
    if count:
        yield np.concatenate(indices), np.concatenate(images)


def _write_outputs(folder: Path, prepared: PreparedSlide, indices: np.ndarray, probabilities: np.ndarray,
                   grid: np.ndarray, reader: TileReader) -> None:
    """The probability map (8-bit PNG, p x 255 with 0 also where nothing was scored, and the exact
    float32 grid with NaN there as .npy), the overlay, tiles.csv and the unreadable regions, if any."""
    Image.fromarray(np.round(np.nan_to_num(grid, nan=0.0) * 255).astype(np.uint8), "L").save(folder / SLIDE_PROBABILITY_PNG)
    np.save(folder / SLIDE_PROBABILITY_NPY, grid)
    Image.fromarray(heat_overlay(prepared.thumbnail, grid, prepared.tiles.grid)).save(folder / SLIDE_OVERLAY_PNG)
    tiles = prepared.tiles
    centres = tiles.cell_xy()[indices] + tiles.grid.cell_size / 2  # the window's centre is its cell's
    order = np.argsort(indices)
    pd.DataFrame({"x": np.round(centres[order, 0], 1), "y": np.round(centres[order, 1], 1),
                  "row": tiles.rows[indices][order], "col": tiles.cols[indices][order],
                  "probability": np.round(probabilities[order], 5)}).to_csv(folder / SLIDE_TILES_CSV, index=False)
    if reader.unreadable:
        pd.DataFrame([(*region.rect, region.reason) for region in reader.unreadable],
                     columns=["x", "y", "width", "height", "reason"]).to_csv(folder / SLIDE_UNREADABLE_CSV, index=False)


def heat_overlay(thumbnail: np.ndarray, grid: np.ndarray, tile_grid: TileGrid) -> np.ndarray:
    """The thumbnail with each scored cell painted in HEAT_COLOURMAP by its probability; cells not
    scored (NaN) are left as they are."""
    height, width = thumbnail.shape[:2]
    slide_width, slide_height = tile_grid.dimensions
    rows = np.minimum(((np.arange(height) + 0.5) * slide_height / height / tile_grid.cell_size).astype(int), grid.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * slide_width / width / tile_grid.cell_size).astype(int), grid.shape[1] - 1)
    cells = grid[rows[:, None], cols[None, :]]
    colours = matplotlib.colormaps[HEAT_COLOURMAP](np.nan_to_num(cells, nan=0.0))[..., :3] * 255
    alpha = np.where(np.isfinite(cells), HEAT_ALPHA, 0.0)[..., None]
    return np.round(thumbnail * (1 - alpha) + colours * alpha).astype(np.uint8)


def _log_folder_summary(rows: list[dict]) -> None:
    """The parent's table (most suspicious slide first, failed ones last) and its counts."""
    table = pd.DataFrame(rows)
    if "slide/top_k_mean" in table:
        table = table.sort_values("slide/top_k_mean", ascending=False, na_position="last")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(SLIDE_SUMMARY_ARTIFACT).name
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(SLIDE_SUMMARY_ARTIFACT).parent))
    mlflow.log_metrics({"slides_scored": int((table["status"] == "FINISHED").sum()),
                        "slides_failed": int((table["status"] == "FAILED").sum())})
