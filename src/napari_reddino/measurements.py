"""The per-cell table: shape, size, colour and central pallor of every segmented cell."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import perimeter_crofton
from skimage.segmentation import find_boundaries

from .cell_separation import convex_corners, distance_to_background, hull_pixels
from .image_input import check_labels, check_smear, colour_planes, fit_stain_model

# Depth into the cell, as a share of its deepest point: the centre is the inner part, the rim
# the ring where a discocyte is thickest. The outermost ring is left out of the rim: blur
# spreads it into the slide, which made a uniformly stained cell look denser in its centre.
CENTRE, RIM = 0.6, (0.2, 0.4)
DIAGONAL = 1 / np.sqrt(2)  # a diagonal pixel pair spans sqrt 2 of a row or column pair
_LENGTHS_PX = ["perimeter_px", "equivalent_diameter_px", "major_axis_px", "minor_axis_px"]


def measure_cells(labels, image, *, pixel_size_um: float | None = None) -> pd.DataFrame:
    """One row per cell (ascending label id) with the measurements napari shows on hover.

    Columns: ``label`` and ``index`` (the label id, which napari uses to find a cell's row),
    centroid and bounding box (pixels; max corner exclusive), area, perimeter, equivalent
    diameter, major and minor axis, eccentricity, circularity (4 pi area / perimeter^2, 1 for a
    disc), solidity, mean colour (``mean_red/green/blue`` or ``mean_gray``), ``central_pallor``,
    ``outline_shared`` and ``touches_border`` (cut by the image's border or the edge of the field). With
    ``pixel_size_um`` the lengths and the area are given in µm too.
    """
    image = check_smear(image)
    labels = check_labels(labels, image.shape)
    table = shape_table(labels)
    ids = table["label"].to_numpy()
    perimeter = table["perimeter_px"].to_numpy()
    circularity = np.divide(4 * np.pi * table["area_px"].to_numpy(), perimeter**2, out=np.zeros(ids.size), where=perimeter > 0)
    table["circularity"] = np.minimum(circularity, 1.0)
    planes = colour_planes(image)
    names = ["mean_gray"] if len(planes) == 1 else ["mean_red", "mean_green", "mean_blue"]
    for name, plane in zip(names, planes):
        table[name] = ndi.mean(plane, labels, ids) if ids.size else []
    stain = fit_stain_model(image)
    table["central_pallor"] = central_pallor(labels, stain.density(image), ids)
    table["outline_shared"] = outline_shared(labels, ids)
    boxes = table[["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]].to_numpy()
    table["touches_border"] = cut_by_field_edge(labels, ids, boxes, stain.outside_field(image))
    if pixel_size_um is not None:
        if not pixel_size_um > 0:
            raise ValueError(f"pixel_size_um must be positive; got {pixel_size_um}.")
        table["area_um2"] = table["area_px"] * pixel_size_um**2
        for column in _LENGTHS_PX:
            table[column.replace("_px", "_um")] = table[column] * pixel_size_um
    return table


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


def central_pallor(labels: np.ndarray, density: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1 - (stain density in a cell's centre / density in its rim), per cell.

    About 0 for a uniformly stained cell (spherocyte), 0.3-0.6 for a normal biconcave cell,
    near 1 for a hypochromic ghost; lower than normal for a target cell's dense centre. Centre and rim
    are taken from the distance to the cell's own outline, so touching cells do not mix.
    """
    if ids.size == 0:
        return np.zeros(0)
    interior = (labels > 0) & ~find_boundaries(labels, mode="inner")
    depth = distance_to_background(interior)
    deepest = np.zeros(int(labels.max()) + 1)
    np.maximum.at(deepest, labels.ravel(), depth.ravel())  # ~15x faster than ndi.maximum
    relative = depth / np.maximum(deepest[labels], 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):  # a cell of a few pixels may have no rim: 0
        centre = ndi.mean(density, np.where(relative >= CENTRE, labels, 0), ids)
        rim = ndi.mean(density, np.where((relative >= RIM[0]) & (relative < RIM[1]), labels, 0), ids)
        pallor = 1.0 - np.asarray(centre) / np.asarray(rim)
    return np.nan_to_num(np.clip(pallor, -1.0, 1.0))


def shape_table(labels: np.ndarray) -> pd.DataFrame:
    """Position, size and shape columns, from image moments computed for all cells at once."""
    rows, cols = np.indices(labels.shape, sparse=True)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=int(labels.max()) + 1).astype(float)
    ids = np.flatnonzero(count)
    ids = ids[ids > 0]

    def per_cell(values) -> np.ndarray:
        sums = np.bincount(flat, weights=np.broadcast_to(values, labels.shape).ravel(), minlength=count.size)
        return sums[ids] / count[ids]

    cy, cx = per_cell(rows), per_cell(cols)
    # Central second moments (+1/12: a pixel is a unit square, not a point).
    mu_yy = per_cell(rows.astype(float) ** 2) - cy**2 + 1 / 12
    mu_xx = per_cell(cols.astype(float) ** 2) - cx**2 + 1 / 12
    mu_xy = per_cell(rows * cols) - cy * cx
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
