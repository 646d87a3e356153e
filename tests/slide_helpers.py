"""Small whole-slide images for tests: the package's synthetic slides (histo_transfer.data.slides.
synthetic), or a mosaic of real PCam patches (label-0 patches as tissue, label-1 as tumour), and a
helper that corrupts one TIFF tile.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histo_transfer.data.slides.synthetic import TIFF_TILE, Rect, WrittenSlide, write_synthetic_slide

PCAM_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam_sample" / "train"
__all__ = ["PCAM_TRAIN", "WrittenSlide", "corrupt_tiff_tile", "write_test_slide"]


def write_test_slide(path: Path, size: tuple[int, int] = (1536, 1024), mpp: float | None = 0.5,
                     tissue: Rect = (256, 192, 1024, 640), tumour: Rect = (640, 384, 256, 192), levels: int = 3,
                     blank: bool = False, patches: Path | None = None, seed: int = 0) -> WrittenSlide:
    """A synthetic slide (write_synthetic_slide); `patches`, a folder of PCam TIFFs with
    `train_labels.csv` beside it, fills the tissue with label-0 patches and the tumour with label-1."""
    textures = None
    if patches is not None:
        normal, tumorous = _pcam_patches(patches)
        textures = (_mosaic(tissue, normal), _mosaic(tumour, tumorous))
    return write_synthetic_slide(path, size, mpp, tissue, tumour, levels, blank, seed, textures)


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
