"""Cells and positions: each cell's centroid, and the cell under each annotated point."""

from __future__ import annotations

import numpy as np

from .image_input import check_labels


def cells_at_points(labels: np.ndarray, points) -> np.ndarray:
    """Label id under each (row, col) point; 0 for background, outside, or a cell claimed twice.

    When several points fall in one cell, the point nearest that cell's centroid keeps it,
    so a split-free merge of two annotated cells counts as one hit, not two.
    """
    labels = np.asarray(labels)
    labels = check_labels(labels, labels.shape)
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros(0, dtype=np.int64)
    points = np.atleast_2d(points)  # one (row, col) point
    if points.ndim != 2 or points.shape[1] != 2:
        hint = " (from a 3-D napari points layer, keep the last two columns)" if points.shape[-1] == 3 else ""
        raise ValueError(f"points must be (N, 2) rows of (row, col); got an array of shape {points.shape}{hint}.")
    rows, cols = np.round(points).astype(int).T
    inside = (rows >= 0) & (rows < labels.shape[0]) & (cols >= 0) & (cols < labels.shape[1])
    ids = np.zeros(len(points), dtype=np.int64)
    ids[inside] = labels[rows[inside], cols[inside]]
    claimed = np.unique(ids[ids > 0])
    if claimed.size == 0:
        return ids
    centre_of = _centres_of(labels, claimed)
    best: dict[int, int] = {}
    for i in np.flatnonzero(ids):
        distance = np.hypot(*(points[i] - centre_of[ids[i]]))
        j = best.get(ids[i])
        if j is None or distance < np.hypot(*(points[j] - centre_of[ids[j]])):
            best[ids[i]] = i
    unique = np.zeros_like(ids)
    keep = np.fromiter(best.values(), dtype=int)
    unique[keep] = ids[keep]
    return unique


def _centres_of(labels: np.ndarray, cells: np.ndarray) -> dict[int, np.ndarray]:
    """The centroid (row, col) of each of ``cells`` (ascending ids): sums over their pixels
    only, so a lab's sparse ids (up to 2**24) cost no slot per id."""
    top = int(labels.max())
    if top <= labels.size:  # ids numbered 1, 2, ...: a table of them is quicker than a search
        member = np.zeros(top + 1, bool)
        member[cells] = True
        rows, cols = np.nonzero(member[labels])
    else:
        rows, cols = np.nonzero(np.isin(labels, cells))
    which = np.searchsorted(cells, labels[rows, cols])
    count = np.bincount(which, minlength=cells.size)
    centres = np.stack([np.bincount(which, rows, cells.size), np.bincount(which, cols, cells.size)], axis=1)
    return {cell: centre / size for cell, centre, size in zip(cells.tolist(), centres, count)}


def cell_centres(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid rows and columns of cells 1..max(labels) (NaN for ids not present)."""
    flat = labels.ravel()
    count = np.bincount(flat)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.bincount(flat, rows.ravel())[1:] / count[1:], np.bincount(flat, cols.ravel())[1:] / count[1:])
