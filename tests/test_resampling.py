"""Pixel-centre-aligned resizing: the same numbers as scipy's grid-mode zoom, and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_reddino.resampling import resize_linear, resize_nearest


@pytest.mark.parametrize(
    ("source", "target"), [((40, 54), (48, 64)), ((48, 64), (40, 53)), ((3, 4), (48, 64)), ((7, 1), (9, 3))]
)
def test_linear_resize_matches_scipy_grid_mode_zoom(source, target):
    plane = np.random.default_rng(0).random(source).astype(np.float32)
    zoom = (target[0] / source[0], target[1] / source[1])
    expected = ndi.zoom(plane, zoom, order=1, mode="nearest", grid_mode=True)[: target[0], : target[1]]
    resized = resize_linear(plane, target)
    assert resized.shape == target and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, atol=1e-6)


def test_linear_resize_known_values():
    # Doubling [0, 1]: output centres fall at -0.25, 0.25, 0.75, 1.25 source px (edges clamp).
    np.testing.assert_allclose(resize_linear(np.array([[0.0, 1.0]]), (1, 4)), [[0.0, 0.25, 0.75, 1.0]])


def test_nearest_resize_takes_the_pixel_under_each_centre():
    labels = np.array([[1, 2], [3, 4]], np.int32)
    assert resize_nearest(labels, (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert resize_nearest(np.arange(6)[None, :], (1, 3)).tolist() == [[1, 3, 5]]
