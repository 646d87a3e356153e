"""Whole-slide images: reading a slide, finding its tissue, tiling it like PCam, reading the tiles
in parallel, and turning a grid of tumour probabilities into regions.

PCam patches are 96x96 px at about 0.972 um/px and labelled by their centre 32x32 px, so a slide is
cut into 96-px windows every 32 px at that resolution: each 32x32 centre cell is scored once and a
window's probability belongs to its centre cell. The flow, one concept per module:

- `reader`: `open_slide` (OpenSlide, microns per pixel), a `ReadPlan` (which level, how much to
  resize), RGB regions at the target resolution, a thumbnail.
- `tiling`: the `TileGrid` of centre cells and the `Tiles` to score (grid and level-0 coordinates).
- `tissue`: the tissue mask of a thumbnail and the windows with enough tissue to be worth reading.
- `batches`: `read_tiles`, batches of windows read by worker threads with bounded memory; regions
  that cannot be read are skipped and reported.
- `regions`: tumour polygons in level-0 pixels as QuPath GeoJSON, and areas in mm^2.
- `synthetic`: pyramidal TIFF slides with a known tumour, to try the flow (and benchmark it) with
  no scanner's file at hand.

Nothing here knows about models or tracking; user mistakes are one-line `DataError`s naming the slide.
"""
