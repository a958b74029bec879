"""The geometry of masks and label images, at any scale: distances to the background, holes,
convex hulls, and cells in pieces. Segmentation, sizing and measuring share these."""

from __future__ import annotations

import edt
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import label as measure_label


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (float32) from each foreground pixel to the nearest background pixel.

    Exact, like ``scipy.ndimage.distance_transform_edt``, and about 3x faster (no feature
    transform); one thread, since tiles already run in parallel. A mask with no background
    at all measures to the image border (``edt`` would give infinity).
    """
    return edt.edt(mask, black_border=bool(mask.all()), parallel=1)


def fill_holes(mask: np.ndarray, max_area: float = np.inf) -> np.ndarray:
    """Fill holes smaller than ``max_area`` (pale cell centres), not gaps between cells.

    Labels the background once instead of scipy's iterative fill: several times faster.
    """
    gaps, area, open_ = background_gaps(~mask)
    area[open_] = np.inf
    return mask | (area < max_area)[gaps]


def background_gaps(background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The connected regions of ``background`` (labels), per region id its area in pixels
    (infinity for id 0), and whether it reaches the image border."""
    gaps, n = ndi.label(background)
    area = np.bincount(gaps.ravel(), minlength=n + 1).astype(float)
    area[0] = np.inf
    open_ = np.zeros(n + 1, bool)
    open_[np.unique(np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]]))] = True
    return gaps, area, open_


def padded(box: tuple[slice, ...], pad: int) -> tuple[slice, ...]:
    """``box`` (from ``ndimage.find_objects``) grown by ``pad`` pixels on every side, clipped at 0."""
    return tuple(slice(max(0, side.start - pad), side.stop + pad) for side in box)


def convex_corners(mask: np.ndarray) -> np.ndarray | None:
    """Corners (row, col), in order, of the convex hull of the pixel centres of ``mask``; None
    for a line of pixels (its own hull). Only outline pixels can be corners, so only they go in."""
    edge = np.argwhere(mask & ~ndi.binary_erosion(mask))
    try:
        return edge[ConvexHull(edge).vertices]
    except QhullError:
        return None


def hull_pixels(corners: np.ndarray) -> float:
    """Pixels (centres) inside or on the convex polygon with these integer ``corners``, in order.

    By Pick's theorem, from its area and the pixels on its edges (gcd of each edge's steps),
    with no per-pixel test.
    """
    following = np.roll(corners, -1, axis=0)
    area = abs(float(np.sum(corners[:, 0] * following[:, 1] - following[:, 0] * corners[:, 1]))) / 2
    steps = np.abs(following - corners)
    return float(round(area + int(np.gcd(steps[:, 0], steps[:, 1]).sum()) / 2 + 1))


def keep_segments(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with only the ids where ``keep[id]`` is true, renumbered 1..k in order."""
    keep = keep.copy()
    keep[0] = False
    relabel = np.zeros(keep.size, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def largest_pieces(labels: np.ndarray) -> np.ndarray:
    """Each cell as its largest 4-connected piece: specks cut off by an outline's trim, or left
    beyond a target cell's rim, would count in its area and stretch its perimeter."""
    pieces, owner = _pieces(labels)
    if pieces.max() == np.count_nonzero(np.bincount(labels.ravel())[1:]):  # one piece a cell: nothing to drop
        return labels
    sizes = np.bincount(pieces.ravel())
    order = np.lexsort((sizes[1:], owner[1:])) + 1  # by cell, then by size
    largest = order[np.append(owner[order][1:] != owner[order][:-1], True)]  # each cell's last piece
    keep = np.zeros(sizes.size, bool)
    keep[largest] = True
    return np.where(keep[pieces], labels, 0).astype(labels.dtype, copy=False)


def cells_in_pieces(labels: np.ndarray) -> np.ndarray:
    """The ids of the cells in more than one 4-connected piece, as an eraser stroke across a cell
    leaves it: measured and cut as one cell, though the lab meant two."""
    _, owner = _pieces(labels)
    ids, counts = np.unique(owner[1:], return_counts=True)
    return ids[counts > 1]


def _pieces(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's 4-connected pieces, apart from its neighbours', and the cell of each piece."""
    pieces = measure_label(labels, connectivity=1)
    owner = np.zeros(int(pieces.max()) + 1, labels.dtype)
    owner[pieces.ravel()] = labels.ravel()
    return pieces, owner
