"""From a grid of tumour probabilities (one per centre cell, NaN where not scored) to tumour regions:
polygons in level-0 pixels, written as GeoJSON that QuPath opens as annotations, and areas in mm^2.

Cell (row, col) covers level-0 [col, col + 1) x [row, row + 1) times `cell_size`: the grid starts at
the slide's top-left corner (as `tiling.TileGrid` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.measure import approximate_polygon, find_contours, label, regionprops

TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
"""QuPath's class for the annotations (QuPath's built-in class is spelled "Tumor")."""


@dataclass(frozen=True)
class TumourRegion:
    """One connected tumour region: closed rings of level-0 (x, y) points, the outline and its holes."""

    exterior: np.ndarray  # (n, 2), first point repeated last
    holes: list[np.ndarray]
    max_probability: float
    cells: int


def tumour_mask(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """True for cells scored at or above `threshold`; cells not scored (NaN) are not tumour."""
    return np.nan_to_num(probabilities, nan=-np.inf) >= threshold


def tumour_regions(probabilities: np.ndarray, threshold: float, cell_size: float) -> list[TumourRegion]:
    """The connected tumour regions (cells sharing an edge; cells touching only at a corner are two
    regions, as the contour tracing sees them), largest first. `cell_size` is a cell's side in level-0 px.

    Each region's outline is traced on its own mask, padded so that it closes, along the cells' edges
    (corners are cut diagonally, half a cell at most); holes inside a region are kept as inner rings.
    """
    regions = []
    for component in regionprops(label(tumour_mask(probabilities, threshold), connectivity=1)):
        top, left = component.bbox[:2]
        rings = [_to_level0(contour, (top - 1, left - 1), cell_size)
                 for contour in find_contours(np.pad(component.image, 1).astype(np.float32), 0.5)]
        rings.sort(key=_enclosed_area, reverse=True)  # the outline encloses its holes: it is the largest
        cells = probabilities[component.slice][component.image]
        regions.append(TumourRegion(rings[0], rings[1:], float(cells.max()), int(component.area)))
    return sorted(regions, key=lambda region: region.cells, reverse=True)


def _to_level0(contour: np.ndarray, offset: tuple[int, int], cell_size: float) -> np.ndarray:
    """A contour in padded-mask (row, col) coordinates as a closed ring of level-0 (x, y) points.

    Contour points lie halfway between cell centres, that is on cell edges: mask coordinate c is the
    centre of cell c, which is level-0 (c + 0.5) * cell_size. Straight runs are reduced to their ends.
    """
    ring = approximate_polygon((contour + offset + 0.5) * cell_size, tolerance=cell_size / 100)[:, ::-1]
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def _enclosed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2


def regions_geojson(regions: list[TumourRegion]) -> dict:
    """A GeoJSON FeatureCollection that QuPath imports as "Tumor" annotations, one per region."""
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature",
         "geometry": {"type": "Polygon",
                      "coordinates": [np.round(ring, 2).tolist() for ring in (region.exterior, *region.holes)]},
         "properties": {"objectType": "annotation", "classification": TUMOUR_CLASS,
                        "max_probability": round(region.max_probability, 4), "cells": region.cells}}
        for region in regions]}


def write_geojson(path: Path | str, regions: list[TumourRegion]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(regions_geojson(regions)))
    return path


def cells_area_mm2(cells: int, cell_um: float) -> float:
    """The area of `cells` square cells of side `cell_um` um (stride 32 px x target um/px), in mm^2."""
    return cells * (cell_um / 1000) ** 2


def tumour_area_mm2(probabilities: np.ndarray, threshold: float, cell_um: float) -> float:
    return cells_area_mm2(int(tumour_mask(probabilities, threshold).sum()), cell_um)


def tissue_area_mm2(probabilities: np.ndarray, cell_um: float) -> float:
    """The scored area: only cells whose window was on tissue (and readable) are scored."""
    return cells_area_mm2(int(np.isfinite(probabilities).sum()), cell_um)
