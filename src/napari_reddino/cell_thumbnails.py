"""Thumbnails of single cells, for the Cell map's gallery of the selected cells.

A thumbnail is the smear as napari shows it (scaled by the image layer's contrast limits) in
the cell's window (:func:`.crop_windows.square_windows`: at smear scale, one size for every
cell of a smear, so a microcyte looks small next to a macrocyte), with the cell's outline
drawn in so that it stands out from the neighbours in its window.

No Qt, no napari, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

THUMBNAIL_PX = 96


def _linear_taps(start: float, side: float, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` output pixels spanning source pixels ``start .. start + side``: the two
    source indices around its centre (clipped into ``0 .. limit - 1``) and their weights, zero for
    an index outside the source (so the smear fades to black beyond its edge)."""
    position = start + (np.arange(size) + 0.5) * side / size - 0.5
    low = np.floor(position).astype(np.intp)
    above = (position - low).astype(np.float32)
    indices = np.stack([low, low + 1])
    weights = np.stack([1 - above, above]) * ((indices >= 0) & (indices < limit))
    return np.clip(indices, 0, limit - 1), weights


def _nearest(start: float, side: float, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The source index nearest each output pixel's centre (clipped) and whether it is inside."""
    index = np.floor(start + (np.arange(size) + 0.5) * side / size).astype(np.intp)
    return np.clip(index, 0, limit - 1), (index >= 0) & (index < limit)


def _bilinear(image: np.ndarray, top: float, left: float, side: float, size: int) -> np.ndarray:
    """The ``side``-px square of ``image`` at ``(top, left)`` resampled to ``size`` px, float32:
    rows, then columns, each a blend of two gathers from the part of the smear under the window."""
    (rows, row_weights), (cols, col_weights) = (_linear_taps(top, side, size, image.shape[0]),
                                                _linear_taps(left, side, size, image.shape[1]))
    under = np.asarray(image[rows.min():rows.max() + 1, cols.min():cols.max() + 1], dtype=np.float32)
    rows, cols = rows - rows.min(), cols - cols.min()
    if under.ndim == 3:
        row_weights, col_weights = row_weights[..., None, None], col_weights[..., None]
    else:
        row_weights = row_weights[..., None]
    blended_rows = under.take(rows[0], axis=0) * row_weights[0] + under.take(rows[1], axis=0) * row_weights[1]
    return blended_rows.take(cols[0], axis=1) * col_weights[0] + blended_rows.take(cols[1], axis=1) * col_weights[1]


def display_rgb(pixels: np.ndarray, contrast_limits: Sequence[float]) -> np.ndarray:
    """Smear pixels (grayscale, RGB or RGBA) as uint8 RGB, scaled as napari draws them."""
    low, high = (float(value) for value in contrast_limits)
    colour = pixels[..., :3] if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
    scaled = (colour.astype(np.float32) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def cell_thumbnail(
    image: np.ndarray | None,
    labels: np.ndarray,
    label: int,
    window: Sequence[float],
    *,
    contrast_limits: Sequence[float] = (0, 255),
    outline: Sequence[int] = (255, 255, 255),
    size: int = THUMBNAIL_PX,
) -> np.ndarray:
    """``(size, size, 3)`` uint8: the square ``window`` (x0, y0, x1, y1 in pixel edges) of
    ``image`` (black beyond the smear) with the outline of cell ``label`` of ``labels`` in
    ``outline``. Without an image (its layer was closed), the cell's mask in grey stands in."""
    left, top, right, _ = (float(value) for value in window)
    side = right - left
    height, width = labels.shape[:2]
    (rows, row_in), (cols, col_in) = _nearest(top, side, size, height), _nearest(left, side, size, width)
    mask = (np.asarray(labels[rows[:, None], cols[None, :]]) == label) & row_in[:, None] & col_in[None, :]
    if image is None:
        thumbnail = np.where(mask[..., None], np.uint8(160), np.uint8(40)).repeat(3, axis=-1)
    else:
        thumbnail = display_rgb(_bilinear(image, top, left, side, size), contrast_limits)
    thumbnail[mask & ~ndimage.binary_erosion(mask)] = np.asarray(outline, dtype=np.uint8)[:3]
    return thumbnail
