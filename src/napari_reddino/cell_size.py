"""Estimate the red-cell diameter of a smear from the image alone.

Fill every closed outline of the foreground (pale-centred cells become discs), take the
distance-transform maxima (one per cell, also for touching cells) and return twice their
area-weighted median: small maxima on ragged edges and debris weigh little, so one default
works from 20 px cells to 150 px cells.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .cell_separation import distance_to_background, fill_holes

DEFAULT_DIAMETER_PX = 40.0
MIN_DIAMETER_PX = 6.0


def diameter_from_foreground(foreground: np.ndarray) -> float:
    """Typical cell diameter (px) of a foreground mask; the default when nothing is there."""
    filled = fill_holes(foreground)
    if filled.all():  # e.g. a dark frame around the smear encloses everything: no cells to measure
        return DEFAULT_DIAMETER_PX
    distance = distance_to_background(filled)
    peaks = (distance == ndi.maximum_filter(distance, size=7)) & (distance > MIN_DIAMETER_PX / 2)
    radii = np.sort(distance[peaks])
    if radii.size == 0:
        return DEFAULT_DIAMETER_PX
    weight = np.cumsum(radii**2)
    return float(2 * radii[np.searchsorted(weight, weight[-1] / 2)])
