"""Thumbnails of single cells, for the Cell map's gallery of the selected cells.

A thumbnail is the smear as napari shows it (scaled by the image layer's contrast limits)
in a square window around the cell, with the same context margin as the model's crops, and
the cell's outline drawn in so that it stands out from the neighbours in its window.

No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from .crops import DEFAULT_MARGIN

THUMBNAIL_PX = 96


def cell_window(box: Sequence[float], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square pixel window around a cell's bounding box
    ``(min_y, min_x, max_y, max_x)`` (max exclusive), ``margin`` of its longer side on each side."""
    min_y, min_x, max_y, max_x = (float(value) for value in box)
    side = max(1, round(max(max_y - min_y, max_x - min_x) * (1 + 2 * margin)))
    top = int(np.floor((min_y + max_y - side) / 2))
    left = int(np.floor((min_x + max_x - side) / 2))
    return top, left, side


def _window(array: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """``array[top:top + side, left:left + side]``, zero where the window leaves the array."""
    height, width = array.shape[:2]
    inner = np.asarray(array[max(top, 0):min(top + side, height), max(left, 0):min(left + side, width)])
    pad = [(max(-top, 0), max(top + side - height, 0)), (max(-left, 0), max(left + side - width, 0))]
    return np.pad(inner, pad + [(0, 0)] * (inner.ndim - 2))


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
    box: Sequence[float],
    *,
    contrast_limits: Sequence[float] = (0, 255),
    outline: Sequence[int] = (255, 255, 255),
    size: int = THUMBNAIL_PX,
) -> np.ndarray:
    """``(size, size, 3)`` uint8: the cell ``label`` of ``labels`` in its window of ``image``
    (pixels outside the smear black), its outline in ``outline``. Without an image (its layer
    was closed), the cell's mask in grey stands in for it."""
    top, left, side = cell_window(box)
    mask = _window(labels, top, left, side) == label
    if image is None:
        rgb = np.where(mask[..., None], np.uint8(160), np.uint8(40)).repeat(3, axis=-1)
    else:
        rgb = display_rgb(_window(image, top, left, side), contrast_limits)
    thumbnail = resize(rgb, (size, size), order=1, preserve_range=True, anti_aliasing=side > size)
    thumbnail = np.round(thumbnail).astype(np.uint8)
    mask = resize(mask, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(bool)
    thumbnail[mask & ~ndimage.binary_erosion(mask)] = np.asarray(outline, dtype=np.uint8)[:3]
    return thumbnail
