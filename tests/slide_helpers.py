"""Small whole-slide images for tests: tiled, pyramidal TIFFs that OpenSlide's generic-tiff driver reads.

OpenSlide (4.0) takes the first TIFF directory as level 0 and every later tiled directory marked
"reduced resolution" (SubFileType 1) as a coarser level; it reports `openslide.mpp-x/-y` from
XResolution/YResolution when ResolutionUnit is CENTIMETER (or INCH). A slide is white glass with a
rectangle of "tissue" (pink and purple noise, or a mosaic of real PCam patches) and, inside it, a
rectangle of "tumour" (darker purple, or label-1 patches).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

PCAM_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam_sample" / "train"
TIFF_TILE = 256

Rect = tuple[int, int, int, int]  # level-0 (x, y, width, height)


@dataclass(frozen=True)
class WrittenSlide:
    path: Path
    dimensions: tuple[int, int]  # level 0 (width, height)
    mpp: float | None
    tissue: Rect
    tumour: Rect


def write_test_slide(path: Path, size: tuple[int, int] = (1536, 1024), mpp: float | None = 0.5,
                     tissue: Rect = (256, 192, 1024, 640), tumour: Rect = (640, 384, 256, 192), levels: int = 3,
                     blank: bool = False, patches: Path | None = None, seed: int = 0) -> WrittenSlide:
    """Write a zlib-compressed pyramidal TIFF slide of `size` level-0 px at `mpp` um/px (None: no
    resolution tags) with `levels` levels (downsamples 1, 2, 4, ...). `blank` leaves only glass;
    `patches`, a folder of PCam TIFFs with `train_labels.csv` beside it, fills the tissue with label-0
    patches and the tumour with label-1 patches (see PCAM_TRAIN), otherwise the texture is synthetic."""
    image = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    if not blank:
        if patches is None:
            _paint(image, tissue, _synthetic(tissue, seed, dark=False))
            _paint(image, tumour, _synthetic(tumour, seed + 1, dark=True))
        else:
            normal, tumorous = _pcam_patches(patches)
            _paint(image, tissue, _mosaic(tissue, normal))
            _paint(image, tumour, _mosaic(tumour, tumorous))
    _write_pyramid(path, image, mpp, levels)
    return WrittenSlide(path, size, mpp, tissue, tumour)


def corrupt_tiff_tile(path: Path, x: int, y: int) -> Rect:
    """Overwrite the compressed bytes of the level-0 TIFF tile holding level-0 pixel (x, y); returns
    that tile's level-0 rectangle. zlib then fails on it ("incorrect header check")."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        across = -(-page.imagewidth // TIFF_TILE)
        index = (y // TIFF_TILE) * across + x // TIFF_TILE
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * count)
    return (x // TIFF_TILE * TIFF_TILE, y // TIFF_TILE * TIFF_TILE, TIFF_TILE, TIFF_TILE)


def _write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int) -> None:
    base = Image.fromarray(image)
    with tifffile.TiffWriter(path) as tiff:
        for level in range(levels):
            downsample = 2 ** level
            pixels = np.asarray(base.resize((base.width // downsample, base.height // downsample), Image.Resampling.BOX))
            resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * downsample),) * 2, "resolutionunit": "CENTIMETER"}
            tiff.write(pixels, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="zlib",
                       subfiletype=1 if level else 0, metadata=None, **resolution)


def _paint(image: np.ndarray, rect: Rect, texture: np.ndarray) -> None:
    x, y, width, height = rect
    image[y:y + height, x:x + width] = texture


def _synthetic(rect: Rect, seed: int, dark: bool) -> np.ndarray:
    """Eosin pink with haematoxylin purple specks (tumour: mostly dark purple), with pixel noise."""
    rng = np.random.default_rng(seed)
    pink, purple = np.array([236, 160, 205]), np.array([120, 60, 150] if dark else [160, 90, 175])
    share_purple = 0.8 if dark else 0.3
    specks = rng.random((rect[3], rect[2], 1)) < share_purple
    noise = rng.integers(-12, 13, size=(rect[3], rect[2], 3))
    return np.clip(np.where(specks, purple, pink) + noise, 0, 255).astype(np.uint8)


def _pcam_patches(folder: Path) -> tuple[list[Path], list[Path]]:
    """Label-0 and label-1 patch files, from `train_labels.csv` beside `folder` (CRLF line ends)."""
    with open(folder.parent / "train_labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    by_label = {label: [folder / f"{row['id']}.tif" for row in rows if row["label"] == label] for label in ("0", "1")}
    return by_label["0"], by_label["1"]


def _mosaic(rect: Rect, files: list[Path]) -> np.ndarray:
    """`rect` filled with 96x96 patches side by side, cut at its right and bottom edges."""
    width, height = rect[2:]
    across, down = -(-width // 96), -(-height // 96)
    patches = [np.asarray(Image.open(file).convert("RGB")) for file in files[:across * down]]
    rows = [np.concatenate(patches[row * across:(row + 1) * across], axis=1) for row in range(down)]
    return np.concatenate(rows, axis=0)[:height, :width]
