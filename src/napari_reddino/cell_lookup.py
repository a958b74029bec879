"""Map point annotations (cell centres) to segmented cells, one cell per point at most."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def cells_at_points(labels: np.ndarray, points) -> np.ndarray:
    """Label id under each (row, col) point; 0 for background, outside, or a cell claimed twice.

    When several points fall in one cell, the point nearest that cell's centroid keeps it,
    so a split-free merge of two annotated cells counts as one hit, not two.
    """
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    rows, cols = np.round(points).astype(int).T
    inside = (rows >= 0) & (rows < labels.shape[0]) & (cols >= 0) & (cols < labels.shape[1])
    ids = np.zeros(len(points), dtype=np.int64)
    ids[inside] = labels[rows[inside], cols[inside]]
    claimed = np.unique(ids[ids > 0])
    if claimed.size == 0:
        return ids
    centroids = np.array(ndi.center_of_mass(np.ones(labels.shape, bool), labels, claimed)).reshape(-1, 2)
    centre_of = dict(zip(claimed.tolist(), centroids))
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
