"""Estimate the red-cell diameter of a smear from the image alone.

Fill every closed outline of the foreground (pale-centred cells become discs), take the
distance-transform maxima (one per cell, also for touching cells) and return twice their
area-weighted median: small maxima on ragged edges and debris weigh little, so one default
works from 20 px cells to 150 px cells. Maxima under :data:`MIN_DIAMETER_PX` do not count, nor
those over :data:`OUTLIER_RADII` times the typical one (bare slide enclosed by a crowd of small
cells, filled into a disc). Where most maxima lie under the smallest that counts, or the typical
one near it, the cells are too small to size well at that resolution (:class:`Sizing`), and
segmentation sizes them at full resolution too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .label_geometry import distance_to_background, fill_holes

DEFAULT_DIAMETER_PX = 40.0
MIN_DIAMETER_PX = 6.0
# Maxima under the floor over those above it: 1.29 at most in the 559 smears of both datasets,
# 2.1 and more where cells are too small to size (Chula smear 1 at 11 px, sized at half resolution)
SMALL_MAXIMA_RATIO = 1.6
FEW_CELLS = 10  # maxima that count: 20 at least in every real smear (Aslan's 256 px fields)
OUTLIER_RADII = 4.0  # maxima over this many times the median one do not count (in fields of many): no real smear has any
# a median maximum under this radius (px) sizes only the larger of cells 2 * NEAR_FLOOR_RADIUS across or less
NEAR_FLOOR_RADIUS = 7.0


@dataclass(frozen=True)
class Sizing:
    """The typical cell diameter (px) of a foreground mask, and how far it can be trusted."""

    diameter: float
    too_small: bool  # most maxima lie under the smallest radius that counts: only gaps blurred shut were sized
    near_floor: bool  # the median maximum lies near that radius: cells under it did not count, and the estimate is high


def sized_foreground(foreground: np.ndarray) -> Sizing:
    """The typical cell diameter (px) of a foreground mask (the default when nothing is there),
    and whether the cells are too small to size at this resolution (most distance maxima lie
    under the smallest radius that counts, more than :data:`SMALL_MAXIMA_RATIO` times those
    above it) or near it (the median maximum under :data:`NEAR_FLOOR_RADIUS`)."""
    radii, small = _maxima(foreground)
    # in a crop of a cell or two, the corners of neighbours the border cuts are small maxima too;
    # where none counts, any maxima at all are cells too small (a sparse field at low power)
    too_small = small > SMALL_MAXIMA_RATIO * max(radii.size, FEW_CELLS) or (radii.size == 0 and small > 0)
    if radii.size == 0:
        return Sizing(DEFAULT_DIAMETER_PX, too_small, too_small)
    typical = float(np.median(radii))
    if radii.size >= FEW_CELLS:  # a crop's one cell beside two platelets is no outlier
        radii = radii[radii <= OUTLIER_RADII * typical]
    weight = np.cumsum(radii**2)
    return Sizing(float(2 * radii[np.searchsorted(weight, weight[-1] / 2)]), too_small, typical < NEAR_FLOOR_RADIUS)


def _maxima(foreground: np.ndarray) -> tuple[np.ndarray, int]:
    """The radii of the distance maxima that count (sorted), and how many lie under them (1 px
    and more: a single pixel's maximum is noise). Where fewer than :data:`FEW_CELLS` count (a
    crop of a cell or two), only those whose disc the image holds whole, if any: the pieces of
    neighbours the border cuts would decide the size otherwise."""
    filled = fill_holes(foreground)
    if filled.all():  # e.g. a dark frame around the smear encloses everything: no cells to measure
        return np.zeros(0, np.float32), 0
    distance = distance_to_background(filled)
    maxima = distance == ndi.maximum_filter(distance, size=7)
    counted = maxima & (distance > MIN_DIAMETER_PX / 2)
    rows, cols = np.nonzero(counted)
    radii = distance[rows, cols]
    if radii.size < FEW_CELLS:
        height, width = foreground.shape
        whole = (np.minimum(rows, height - 1 - rows) >= radii) & (np.minimum(cols, width - 1 - cols) >= radii)
        radii = radii[whole] if whole.any() else radii
    return np.sort(radii), int((maxima & (distance > 1) & ~counted).sum())
