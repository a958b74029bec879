"""Thumbnails of single cells, for the Cell map's gallery of the selected cells.

A thumbnail is the smear as napari shows it (scaled by the image layer's contrast limits) in
the cell's window as the model's crop had it (:func:`.crop_windows.square_windows`: at smear
scale, one size for every cell of a smear, so a microcyte looks small next to a macrocyte),
with the cell's outline drawn in so that it stands out from the neighbours in its window.

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


def _blocks(start: float, side: float, factor: int, limit: int) -> tuple[int, int]:
    """First and end source pixel of the blocks of ``factor`` pixels under ``start .. start +
    side`` (and one more either side, for the taps), in step with the window. Blocks wholly
    outside ``0 .. limit`` are left out, so the span overhangs the source by less than a block."""
    first, end = int(np.floor(start)) - factor, int(np.ceil(start + side)) + factor
    first += max(0, -first) // factor * factor
    end = first + -(-(end - first) // factor) * factor
    return first, end - max(0, end - limit) // factor * factor


def _block_means(pixels: np.ndarray, factor: int) -> np.ndarray:
    """float32 means of ``factor`` x ``factor`` blocks (the sides are multiples of ``factor``), as
    strided sums: five times faster than ``np.add.reduceat``."""
    rows = sum(pixels[offset::factor].astype(np.float32) for offset in range(factor))
    return sum(rows[:, offset::factor] for offset in range(factor)) / factor**2


def _resampled(image: np.ndarray, top: float, left: float, side: float, size: int) -> np.ndarray:
    """The ``side``-px square of ``image`` at ``(top, left)`` resampled to ``size`` px, float32:
    rows, then columns, each a blend of two gathers. Where a thumbnail pixel spans two or more
    smear pixels, the smear under the window is first averaged in blocks of that many, so that
    detail finer than a thumbnail pixel (stain grain, a high-resolution scanner) does not alias."""
    factor = max(1, int(side // size))
    height, width = image.shape[:2]
    (top_row, end_row), (left_col, end_col) = _blocks(top, side, factor, height), _blocks(left, side, factor, width)
    if top_row >= end_row or left_col >= end_col:  # the window lies beyond the smear
        return np.zeros((size, size, *image.shape[2:]), dtype=np.float32)
    under = np.asarray(image[max(top_row, 0):end_row, max(left_col, 0):end_col])
    if factor > 1:  # a block the smear's edge cuts is filled out with black, as beyond the smear
        overhang = [(max(0, -top_row), max(0, end_row - height)), (max(0, -left_col), max(0, end_col - width))]
        if any(map(any, overhang)):
            under = np.pad(under, overhang + [(0, 0)] * (under.ndim - 2))
        under = _block_means(under, factor)
    else:
        under = under.astype(np.float32)
    (rows, row_weights), (cols, col_weights) = (
        _linear_taps((top - top_row) / factor, side / factor, size, under.shape[0]),
        _linear_taps((left - left_col) / factor, side / factor, size, under.shape[1]),
    )
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
        thumbnail = display_rgb(_resampled(image, top, left, side, size), contrast_limits)
    thumbnail[mask & ~ndimage.binary_erosion(mask)] = np.asarray(outline, dtype=np.uint8)[:3]
    return thumbnail
