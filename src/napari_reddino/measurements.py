"""The per-cell table: shape, size, colour and central pallor of every segmented cell."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import perimeter_crofton

from .image_input import channels, check_labels, check_smear, fit_stain_model
from .label_geometry import convex_corners, distance_to_background, hull_pixels
from .segmentation import pixel_size_refusal

# Depth into the cell, as a share of its deepest point: the centre is the inner part, the rim
# the ring where a discocyte is thickest. The outermost ring is left out of the rim: blur
# spreads it into the slide, which made a uniformly stained cell look denser in its centre.
CENTRE, RIM = 0.6, (0.2, 0.4)
DIAGONAL = 1 / np.sqrt(2)  # a diagonal pixel pair spans sqrt 2 of a row or column pair
_LENGTHS_PX = ["perimeter_px", "equivalent_diameter_px", "major_axis_px", "minor_axis_px"]
STRIP_PIXELS = 2**20  # pixels per strip of rows whose per-cell sums are taken at once
# Every column measure_cells writes, in its order (colour or gray, µm or not): an export of
# colour and gray smears keeps this order whichever comes first.
MEASUREMENT_COLUMNS = (
    "label", "index", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
    "area_px", "perimeter_px", "equivalent_diameter_px", "major_axis_px", "minor_axis_px", "eccentricity",
    "solidity", "circularity", "mean_red", "mean_green", "mean_blue", "mean_gray", "central_pallor",
    "outline_shared", "touches_border", "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um",
    "minor_axis_um",
)


def measure_cells(labels, image, *, pixel_size_um: float | None = None) -> pd.DataFrame:
    """One row per cell (ascending label id) with the measurements napari shows on hover.

    Columns: ``label`` and ``index`` (the label id, which napari uses to find a cell's row),
    centroid and bounding box (pixels; max corner exclusive), area, perimeter, equivalent
    diameter, major and minor axis, eccentricity, circularity (4 pi area / perimeter^2, 1 for a
    disc), solidity, mean colour (``mean_red/green/blue`` or ``mean_gray``), ``central_pallor``,
    ``outline_shared`` and ``touches_border`` (cut by the image's border or the edge of the field). With
    ``pixel_size_um`` the lengths and the area are given in µm too.
    """
    if pixel_size_um is not None and (refusal := pixel_size_refusal(pixel_size_um)):
        raise ValueError(refusal)
    image = check_smear(image)
    labels, ids_of = _numbered_densely(check_labels(labels, image.shape))
    table = shape_table(labels)
    ids = table["label"].to_numpy()
    perimeter = table["perimeter_px"].to_numpy()
    circularity = np.divide(4 * np.pi * table["area_px"].to_numpy(), perimeter**2, out=np.zeros(ids.size), where=perimeter > 0)
    table["circularity"] = np.minimum(circularity, 1.0)
    planes = channels(image)  # views: the sums take each strip's values as they are
    names = ["mean_gray"] if len(planes) == 1 else ["mean_red", "mean_green", "mean_blue"]
    area = table["area_px"].to_numpy()
    sums = sums_per_cell(labels, lambda rows: [plane[rows] for plane in planes])
    for name, total in zip(names, sums):
        table[name] = total[ids] / area
    stain = fit_stain_model(image)
    boxes = table[["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]].to_numpy()
    table["central_pallor"] = central_pallor(labels, lambda rows: stain.density(image[rows]), ids, boxes)
    table["outline_shared"] = outline_shared(labels, ids)
    table["touches_border"] = cut_by_field_edge(labels, ids, boxes, stain.outside_field(image))
    if pixel_size_um is not None:
        table["area_um2"] = table["area_px"] * pixel_size_um**2
        for column in _LENGTHS_PX:
            table[column.replace("_px", "_um")] = table[column] * pixel_size_um
    if ids_of is not None:
        table["label"] = table["index"] = ids_of[table["label"].to_numpy()]
    return table


def _numbered_densely(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``labels`` as they are, or, where their ids are sparse (masks of tiles numbered apart, or
    with most cells deleted), renumbered 1, 2, ... with the ids the new numbers stand for: the
    per-cell sums hold a slot per id up to the largest, which at ids near 2**24 took 0.8 GB and
    2 s for a smear of 124 cells."""
    if int(labels.max(initial=0)) <= labels.size // 8:  # the slots weigh less than the labels themselves
        return labels, None
    ids = np.union1d([0], labels)
    return np.searchsorted(ids, labels).astype(np.int32), ids.astype(np.int64)


def cut_by_field_edge(labels: np.ndarray, ids: np.ndarray, boxes: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Per cell ``ids`` (bounding ``boxes``: min row, min col, max row, max col, max exclusive):
    whether the image's border or the edge of the field (``outside``, a black frame or the dark
    ring of a field stop; :meth:`~.image_input.StainModel.outside_field`) cuts the cell, which
    then shows only in part."""
    height, width = labels.shape
    cut = (boxes[:, 0] == 0) | (boxes[:, 1] == 0) | (boxes[:, 2] == height) | (boxes[:, 3] == width)
    if not outside.any():
        return cut
    beside = ndi.binary_dilation(outside) & (labels > 0)
    return cut | np.isin(ids, labels[beside])


def outline_shared(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per cell ``ids``: the share of its outline that borders another cell. 0 for a cell
    standing free; one that overlaps a neighbour was split from it along a line (mostly
    0.1-0.5), and its outline there is where the segmentation split them, not the cell's.

    The outline is counted in neighbouring pixel pairs that cross it, across and along both
    diagonals (weighted 1/sqrt 2), so a contact's share hardly depends on its direction: a disc
    cut at 0.6 of its radius (exactly 0.265) reads 0.254-0.270 at any angle, where counting only
    row and column pairs read 0.222-0.286. The image's border is no outline; the edge of the
    field (a black frame) counts as free outline.
    """
    count = int(labels.max()) + 1 if labels.size else 1
    outline, shared = np.zeros(count), np.zeros(count)
    neighbours = (((labels[1:], labels[:-1]), 1.0), ((labels[:, 1:], labels[:, :-1]), 1.0),
                  ((labels[1:, 1:], labels[:-1, :-1]), DIAGONAL), ((labels[1:, :-1], labels[:-1, 1:]), DIAGONAL))
    for (after, before), weight in neighbours:
        differ = after != before
        for mine, theirs in ((after[differ], before[differ]), (before[differ], after[differ])):
            outline += weight * np.bincount(mine, minlength=count)
            shared += weight * np.bincount(mine, weights=theirs > 0, minlength=count)
    return np.divide(shared[ids], outline[ids], out=np.zeros(len(ids)), where=outline[ids] > 0)


def central_pallor(labels: np.ndarray, density_of: Callable[[slice], np.ndarray], ids: np.ndarray,
                   boxes: np.ndarray) -> np.ndarray:
    """1 - (stain density in a cell's centre / density in its rim), per cell ``ids`` (bounding
    ``boxes`` as :func:`cut_by_field_edge` takes them); ``density_of(rows)`` gives the density of
    a slice of the image's rows.

    About 0 for a uniformly stained cell (spherocyte), 0.3-0.6 for a normal biconcave cell,
    near 1 for a hypochromic ghost; lower than normal for a target cell's dense centre. Centre and rim
    are taken from the distance to the cell's own outline, so touching cells do not mix.
    """
    if ids.size == 0:
        return np.zeros(0)
    interior = _interior(labels)
    depth = distance_to_background(interior)
    del interior
    deepest = np.zeros(int(labels.max()) + 1)
    for i, (top, left, bottom, right) in zip(ids, boxes):  # np.maximum.at over the image: 2.5 s at 48 M pixels
        box = slice(top, bottom), slice(left, right)
        deepest[i] = depth[box][labels[box] == i].max()

    def centre_and_rim(rows: slice) -> list[np.ndarray]:
        cells = labels[rows]
        relative = depth[rows] / np.maximum(deepest[cells], 1e-9)
        density = density_of(rows)
        centre, rim = relative >= CENTRE, (relative >= RIM[0]) & (relative < RIM[1])
        return [density * centre, centre, density * rim, rim]

    centre_sum, centre_count, rim_sum, rim_count = (total[ids] for total in sums_per_cell(labels, centre_and_rim))
    with np.errstate(divide="ignore", invalid="ignore"):  # a cell of a few pixels may have no rim: 0
        pallor = 1.0 - (centre_sum / centre_count) / (rim_sum / rim_count)
    return np.nan_to_num(np.clip(pallor, -1.0, 1.0))


def _interior(labels: np.ndarray) -> np.ndarray:
    """Cell pixels whose four neighbours belong to the same cell (beyond the image's border
    counts as the same): ``find_boundaries(mode="inner")``'s complement, from four comparisons
    instead of two grey-level filters (2.7 s at 48 M pixels)."""
    interior = labels > 0
    interior[1:] &= labels[1:] == labels[:-1]
    interior[:-1] &= labels[:-1] == labels[1:]
    interior[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    interior[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    return interior


def sums_per_cell(labels: np.ndarray, values_of: Callable[[slice], list[np.ndarray]]) -> list[np.ndarray]:
    """Per label id, the sum over its pixels of each array ``values_of(rows)`` gives for a slice of
    rows (arrays of that strip's shape, or broadcast to it). Strip by strip, so that no value
    ever spans the whole image: its memory stays that of a strip, and a large smear no slower
    per pixel than a small one."""
    height, width = labels.shape
    count = int(labels.max(initial=0)) + 1
    step = max(1, STRIP_PIXELS // max(width, 1))
    totals: list[np.ndarray] | None = None
    for top in range(0, height, step):
        rows = slice(top, min(top + step, height))
        cells = labels[rows].ravel()
        shape = labels[rows].shape
        parts = [np.bincount(cells, weights=np.broadcast_to(values, shape).ravel(), minlength=count)
                 for values in values_of(rows)]
        totals = parts if totals is None else [total + part for total, part in zip(totals, parts)]
    return totals or []


def shape_table(labels: np.ndarray) -> pd.DataFrame:
    """Position, size and shape columns, from image moments computed for all cells at once."""
    count = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1).astype(float)
    ids = np.flatnonzero(count)
    ids = ids[ids > 0]
    cols = np.arange(labels.shape[1], dtype=np.float64)

    def moments(rows: slice) -> list[np.ndarray]:
        row = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
        return [row, cols, row * row, cols * cols, row * cols]

    sy, sx, syy, sxx, sxy = (total[ids] / count[ids] for total in sums_per_cell(labels, moments))
    cy, cx = sy, sx
    # Central second moments (+1/12: a pixel is a unit square, not a point).
    mu_yy = syy - cy**2 + 1 / 12
    mu_xx = sxx - cx**2 + 1 / 12
    mu_xy = sxy - cy * cx
    spread = np.sqrt(((mu_yy - mu_xx) / 2) ** 2 + mu_xy**2)
    major_var = (mu_yy + mu_xx) / 2 + spread
    minor_var = np.maximum((mu_yy + mu_xx) / 2 - spread, 0)
    slices = ndi.find_objects(labels)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (slices[i - 1] for i in ids)],
                     dtype=np.int64).reshape(-1, 4)  # int64 with no cells too: concatenated tables keep integer boxes
    perimeter, convex_area = np.zeros(ids.size), np.zeros(ids.size)
    for k, i in enumerate(ids):
        mask = labels[slices[i - 1]] == i
        perimeter[k] = perimeter_crofton(mask, directions=4)
        convex_area[k] = _convex_area(mask)
    area = count[ids]
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.sqrt(1 - np.divide(minor_var, major_var, out=np.ones_like(major_var), where=major_var > 0))
    return pd.DataFrame({
        "label": ids,
        "index": ids,
        "centroid_y": cy,
        "centroid_x": cx,
        "bbox_min_y": boxes[:, 0],
        "bbox_min_x": boxes[:, 1],
        "bbox_max_y": boxes[:, 2],
        "bbox_max_x": boxes[:, 3],
        "area_px": area,
        "perimeter_px": perimeter,
        "equivalent_diameter_px": np.sqrt(4 * area / np.pi),
        "major_axis_px": 4 * np.sqrt(major_var),
        "minor_axis_px": 4 * np.sqrt(minor_var),
        "eccentricity": eccentricity,
        "solidity": area / np.maximum(convex_area, area),
    })


def _convex_area(mask: np.ndarray) -> float:
    """Pixels (centres) inside or on the convex hull of the cell's pixel centres."""
    corners = convex_corners(mask)
    return float(mask.sum()) if corners is None else hull_pixels(corners)  # a line of pixels is its own hull
