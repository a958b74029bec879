"""Stain model: integer smears take a lookup table, and it gives the logarithm's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from skimage.io import imread

from napari_reddino.image_input import fit_stain_model, stored_mode

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("scale", [1, 257], ids=["uint8", "uint16"])
def test_optical_densities_of_integer_smears_equal_the_logarithm(scale):
    image = imread(DATA / "chula_rbc12" / "1.jpg").astype(np.uint16 if scale > 1 else np.uint8) * scale
    image[:3, :3] = 0  # black pixels take the floor, not -inf
    stain = fit_stain_model(image)
    floor = 1e-3 * max(stain.background)
    for density, plane, level in zip(stain.optical_densities(image), np.moveaxis(image, -1, 0), stain.background):
        expected = np.log10(level / np.maximum(plane.astype(np.float64), floor))
        np.testing.assert_allclose(density, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(stain.density(image)).all()


def test_the_mode_of_a_file_beyond_pillow_s_size_guard_is_read_from_its_header(tmp_path, monkeypatch):
    # napari opens a CMYK scan of any size; its inks must still be told from RGBA
    PIL.Image.new("CMYK", (300, 200)).save(tmp_path / "print.tif")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10_000)  # standing in for a scan beyond 179 Mpx
    assert stored_mode(tmp_path / "print.tif") == "CMYK" and PIL.Image.MAX_IMAGE_PIXELS == 10_000
    assert stored_mode(tmp_path / "missing.tif") is None
