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
    rows, cols = cell_centres(labels)
    centre_of = {cell: np.array([rows[cell - 1], cols[cell - 1]]) for cell in claimed.tolist()}
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


def cell_centres(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid rows and columns of cells 1..max(labels) (NaN for ids not present)."""
    flat = labels.ravel()
    count = np.bincount(flat)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.bincount(flat, rows.ravel())[1:] / count[1:], np.bincount(flat, cols.ravel())[1:] / count[1:])
