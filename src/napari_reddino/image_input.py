"""Turn whatever a user loads into the one form the segmentation works on.

Smears arrive as RGB or RGBA photographs or grayscale scans, as uint8, uint16 or float
arrays, under any white balance and any stain shade. Segmentation wants one "red-cell
density" plane: optical density relative to the smear's own background, taken in green
(where haemoglobin absorbs most) minus a share of red. Subtracting red cancels what dims all
channels alike (uneven lighting, dust, hairs, ink overlays) and most of the nuclei and
platelets, which absorb red as well; how much red to subtract is chosen per smear, since
pink, lilac and grey-stained smears differ.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from math import ceil

import numpy as np
from scipy import ndimage as ndi

ACCEPTED = (
    "a 2-D smear: grayscale (H, W), RGB (H, W, 3) or RGBA (H, W, 4), "
    "with integer or floating-point pixels"
)
RED_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
_SAMPLE_PIXELS = 250_000
MAX_SPARSE_LABEL = 2**24  # ids above this and the pixel count are sparse: a slot per id takes GBs
OPAQUE_DENSITY = 1.0  # optical density of 10 % transmission: darker in every channel is not sample
NEGATIVE_SHARE = 0.001  # of the pixels, below 0: more is signed data, not noise around black


class ImageInputError(ValueError):
    """The array cannot be read as a smear; the message says what is accepted."""


class LabelsInputError(ImageInputError):
    """The array cannot be read as the label image of this smear."""


def check_labels(labels, image_shape: tuple[int, ...]) -> np.ndarray:
    """``labels`` as an integer array of the image's (H, W), or :class:`LabelsInputError`."""
    array = np.asarray(labels)
    if array.shape != tuple(image_shape[:2]):
        raise LabelsInputError(
            f"The labels have shape {array.shape} but the image is {tuple(image_shape[:2])} (H, W): "
            "they must be the label image of this smear, pixel for pixel."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise LabelsInputError(f"Labels must be integers (a label image), not {array.dtype}.")
    if array.size and array.min() < 0:
        raise LabelsInputError("Labels must not be negative (0 is background, 1, 2, ... are cells).")
    top = int(array.max(initial=0))
    if top > max(array.size, MAX_SPARSE_LABEL):
        raise LabelsInputError(
            f"Label ids go up to {top:,} in a {array.shape[0]}x{array.shape[1]} image; number the cells "
            "1, 2, ... first (skimage.segmentation.relabel_sequential keeps their order)."
        )
    return array


def is_positive(value, *, whole: bool = False) -> bool:
    """Whether ``value`` is a finite number above 0 (a whole one with ``whole``); not a bool or a string."""
    kinds = (int, np.integer) if whole else (int, float, np.integer, np.floating)
    return isinstance(value, kinds) and not isinstance(value, bool | np.bool_) and 0 < value < float("inf")


def check_smear(image) -> np.ndarray:
    """Validate ``image`` and return it as an ndarray, or raise :class:`ImageInputError`."""
    array = np.asarray(image)
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == bool or not numeric:
        raise ImageInputError(f"Cannot read pixels of dtype {array.dtype}; expected {ACCEPTED}.")
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise ImageInputError(
            f"Cannot read an image of shape {array.shape}: the last axis has {array.shape[-1]} "
            f"channels (a 3-D stack or a {array.shape[-1]}-channel image?); expected {ACCEPTED}."
        )
    if array.ndim not in (2, 3):
        raise ImageInputError(f"Cannot read an image of shape {array.shape}; expected {ACCEPTED}.")
    if array.size == 0:
        raise ImageInputError(f"The image is empty (shape {array.shape}); expected {ACCEPTED}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageInputError(
            "The image contains NaN or infinite pixels; replace them (numpy.nan_to_num) first."
        )
    if array.dtype.kind in "if" and (negative := float(np.mean(subsample(array) < 0))) > NEGATIVE_SHARE:
        raise ImageInputError(  # a difference image, or signed data; a few noisy pixels below 0 are clipped
            f"{negative:.1%} of the image's pixels are negative (down to {array.min():g}); expected intensities "
            "from 0 (black) up: rescale it, or clip it (numpy.clip(image, 0, None)) if the negatives are noise."
        )
    return array


def read_smear(path: str | os.PathLike) -> np.ndarray:
    """The pixels of the image file ``path``; a file that is no image says so in a sentence
    (imageio's own message suggests installing video plugins). A CMYK JPEG (from a print
    workflow) comes as RGB: read as it is stored, its ink planes would pass for RGB and alpha.
    A gray file stored with one channel, or with alpha, comes as one gray plane."""
    from PIL import Image  # on first read: the widgets, which import this module, read no files
    from skimage.io import imread

    try:
        image = imread(path)
    except (FileNotFoundError, PermissionError):
        raise
    except Image.DecompressionBombError as error:
        raise OSError("more pixels than Pillow reads (its guard against decompression bombs, about 179 million): "
                      "cut the scan into fields, with QuPath or vips say, and analyse those") from error
    except (OSError, ValueError, SyntaxError, struct.error) as error:  # the latter two: Pillow on a few bytes
        raise OSError("not an image that can be read (PNG, JPEG or TIFF), or a damaged one") from error
    if image.ndim == 3 and image.shape[-1] in (2, 4):
        mode = stored_mode(path)
        if mode in CMYK:
            with Image.open(path) as stored:
                return np.asarray(stored.convert("RGB"))
        if mode in GRAY_ALPHA:  # gray and alpha: the gray plane (another 2-channel image is refused as such)
            return np.ascontiguousarray(image[..., 0])
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


CMYK, GRAY_ALPHA = ("CMYK",), ("LA", "La")  # Pillow's modes of files napari's reader shows as stored planes


def stored_mode(path: str | os.PathLike) -> str | None:
    """Pillow's mode of the image file ``path`` ("RGB", "CMYK", "LA", ...; read from its header,
    whatever its size), or None where Pillow cannot tell."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a header is no decompression bomb
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged header's: napari's reader says what it finds
            with Image.open(path) as image:
                return image.mode
    except (OSError, ValueError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def channels(array: np.ndarray) -> list[np.ndarray]:
    """Views of the image's R, G, B planes (or its one gray plane); alpha is dropped."""
    return [array] if array.ndim == 2 else [array[..., c] for c in range(3)]


def colour_planes(array: np.ndarray) -> list[np.ndarray]:
    """The image as float32 planes (R, G, B, or one gray plane); alpha is dropped."""
    return [plane.astype(np.float32) for plane in channels(array)]


def subsample(array: np.ndarray, pixels: int = _SAMPLE_PIXELS) -> np.ndarray:
    """A strided view with at most ``pixels`` pixels (and at least a quarter of that, for
    images larger than ``pixels``): enough for levels and histograms."""
    step = max(1, ceil(np.sqrt(array.shape[0] * array.shape[1] / pixels)))
    return array[::step, ::step]


@dataclass(frozen=True)
class StainModel:
    """How to turn pixels of one smear into red-cell density (see the module docstring)."""

    background: tuple[float, ...]
    red_weight: float

    def optical_densities(self, array: np.ndarray) -> list[np.ndarray]:
        floor = np.float32(1e-3 * max(self.background))
        planes = channels(array)
        if array.dtype in (np.uint8, np.uint16):
            # A table per channel turns one log per pixel into one lookup: ~5x faster.
            values = np.maximum(np.arange(np.iinfo(array.dtype).max + 1, dtype=np.float32), floor)
            return [np.log10(np.float32(level) / values)[plane] for plane, level in zip(planes, self.background)]
        return [
            np.log10(np.float32(level) / np.maximum(plane.astype(np.float32), floor))
            for plane, level in zip(planes, self.background)
        ]

    def density(self, array: np.ndarray) -> np.ndarray:
        return self.combine(self.optical_densities(array))

    def outside_field(self, array: np.ndarray) -> np.ndarray:
        """Pixels beyond the field of view: not sample (see :meth:`combine`) and joined to the
        image's edge, as a black frame or the dark surround of a round field stop is; black ink
        within the field is not outside it."""
        opaque = np.logical_and.reduce([plane < level / 10**OPAQUE_DENSITY
                                        for plane, level in zip(channels(array), self.background)])
        if not opaque.any():
            return opaque
        regions, count = ndi.label(opaque)
        at_edge = np.zeros(count + 1, dtype=bool)
        at_edge[np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])] = True
        at_edge[0] = False
        return at_edge[regions]

    def combine(self, densities: list[np.ndarray]) -> np.ndarray:
        """Red-cell density from per-channel optical densities (see the module docstring).

        Pixels that pass under a tenth of the slide's light in every channel (a black frame or
        vignette around the field, black ink) are not stained sample: they get density 0, or
        a frame would outweigh every cell when the threshold is chosen.
        """
        if len(densities) == 1:
            density = np.maximum(densities[0], 0)
        else:
            red, green, _ = densities
            density = np.maximum(green - np.float32(self.red_weight) * red, 0)
        density[np.minimum.reduce(densities) > OPAQUE_DENSITY] = 0
        return density


def fit_stain_model(image) -> StainModel:
    """Background level per channel and the red weight that best separates cells from background.

    The background is the median of the brightest 5 % of pixels (in green); the red weight is
    the one whose density histogram is most bimodal (largest Otsu class separation).
    """
    sample = subsample(check_smear(image))
    planes = colour_planes(sample)
    absorbing = planes[1] if len(planes) == 3 else planes[0]
    bright = absorbing >= np.percentile(absorbing, 95)
    background = tuple(max(float(np.median(plane[bright])), 1e-6) for plane in planes)
    if len(planes) == 1:
        return StainModel(background, 0.0)
    coarse = StainModel(background, 0.0).optical_densities(subsample(sample, _SAMPLE_PIXELS // 4))
    separations = {weight: _class_separation(StainModel(background, weight).combine(coarse))
                   for weight in RED_WEIGHTS}
    return StainModel(background, max(separations, key=separations.get))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold from a bincount histogram (several times faster than numpy's)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    index = ((values.ravel() - low) * ((bins - 1) / (high - low))).astype(np.intp)
    counts = np.bincount(index, minlength=bins).astype(float)
    centres = low + (np.arange(bins) + 0.5) * ((high - low) / (bins - 1))
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass_low / weight_low
        mean_high = (mass_low[-1] - mass_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.nanargmax(between[:-1]))])


def _class_separation(values: np.ndarray) -> float:
    """Distance between Otsu's two classes in units of their pooled spread."""
    if values.max() <= values.min():
        return 0.0
    threshold = otsu_threshold(values)
    low, high = values[values <= threshold], values[values > threshold]
    return float((high.mean() - low.mean()) / np.sqrt(0.5 * (low.var() + high.var()) + 1e-12))
