"""Cut one square model input per cell from a smear and its label image.

Each cell gets a square window centred on its bounding box, ``1 + 2 * margin`` times a
side that depends on the crop scale, and the window is resampled to the model's input size:

``"cell"``
    the box's longer side: the cell fills the same share of every crop whatever its size;
``"smear"``
    the same side for every cell of the smear, that of a cell ``SMEAR_SCALE_CELLS`` times the
    smear's median box (a larger cell keeps its own), so a crop shows how big its cell is
    next to the others: micro- and macrocytes are defined by size.

Two modes decide what else the window shows:

``"context"``
    the window as it is in the smear, neighbours included;
``"masked"``
    pixels of other labelled cells replaced by the smear's background colour (the median
    colour of unlabelled pixels), so touching neighbours do not leak into the embedding.

A window that reaches past the image edge is never shifted: the part outside is the
background colour. Sampling is bilinear (``roi_align``), averaging several samples per
output pixel when a window is larger than the model input, and runs batched with torch ops
on the model's device from one upload of the smear, so a GPU is not kept waiting on the CPU.
A smear too large for a GPU (more than a quarter of its free memory, or an upload that runs
out of memory) stays in CPU memory; its crops are cut there and moved, slower but whole.
"""

from __future__ import annotations

import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch
from torchvision.ops import roi_align

from .crop_windows import (  # noqa: F401  (re-exported: the crop settings are part of this module's API)
    CROP_MODES,
    CROP_SCALES,
    DEFAULT_CROP_MODE,
    DEFAULT_CROP_SCALE,
    DEFAULT_MARGIN,
    CellWindows,
    CropInputError,
    CropMode,
    CropScale,
    cell_windows,
    check_crop_settings,
)
from .image_input import check_labels, check_smear, colour_planes, is_positive, subsample

_BACKGROUND_SAMPLES = 250_000  # gave the same medians as a million on Chula mosaics, 4x sooner
# An earlier run's background colour is kept while the smear's own lies this close to it (a share
# of black to white: 2.5 levels of 8 bits). A brush stroke changes which pixels are unlabelled and
# can move their median a level, which changes every crop by float rounding and so every cell's
# crop checks: 34 of 35 cells were embedded again for half a cell erased (tests/test_embedding.py).
_BACKGROUND_STEADINESS = 0.01
_LEVEL_PERCENTILE = 0.1  # % of the sampled pixels allowed beyond the levels an encoding uses
_MAX_WINDOW_PIXELS = 2**24  # per batch of crops: 200 MB of float32 RGB
_THINNED_ABOVE_PX = math.isqrt(_MAX_WINDOW_PIXELS)  # a window wider than this is read thinned (CropSampler._cut)
_WHOLE_SHARE = 0.99  # of a float image's pixels whole numbers: a camera's counts (a few hot pixels interpolated)
_SMEAR_SHARE_OF_FREE_MEMORY = 0.25  # a GPU keeps the rest for the model's batches
_CHECK_SEED = 0x5EED


def as_rgb(image) -> np.ndarray:
    """Any accepted smear (grayscale, RGB, RGBA; integer or float) as float32 RGB in [0, 1].

    The model saw 8-bit photographs divided by 255. Other encodings are read as
    :func:`black_and_white` says, and what lies beyond its black and white is clipped.
    """
    array = check_smear(image)
    planes = colour_planes(array)
    rgb = np.stack(planes * 3 if len(planes) == 1 else planes, axis=-1)
    black, white = black_and_white(colour_view(array))
    if (black, white) != (0.0, 1.0):
        rgb -= np.float32(black)
        rgb *= np.float32(1.0 / (white - black))
    if array.dtype != np.uint8:
        np.clip(rgb, 0.0, 1.0, out=rgb)
    return rgb


def colour_view(array: np.ndarray) -> np.ndarray:
    """The colour pixels of a checked smear, (H, W) or (H, W, 3), without copying: alpha dropped."""
    return array[..., :3] if array.ndim == 3 else array


def black_and_white(colour: np.ndarray) -> tuple[float, float]:
    """The pixel values that stand for black and white in this image's encoding.

    8-bit: 0 and 255. Wider integers: 0 and the largest value of the bit depth in use (12-bit
    cameras store in uint16), as are floats beyond 8-bit levels that are (nearly all) whole
    numbers (a camera's counts saved as float). Other floats: 0 and 1 when nine in ten lie there
    (a flat-field correction overshoots 1 at a vignetted edge, which is clipped; a smear on a black
    canvas has many at 0 whatever its levels), 0 and 255 when they look like 8-bit levels, else
    their range. The levels in use are read from all but the brightest and
    darkest :data:`_LEVEL_PERCENTILE` of a grid of pixels (``image_input.subsample``), not from
    the extremes: one hot pixel must not halve the brightness of every crop.
    """
    if colour.dtype == np.uint8:
        return 0.0, 255.0
    sample = subsample(colour)
    low, nine_in_ten, high = (float(value) for value in
                              np.percentile(sample, [_LEVEL_PERCENTILE, 90, 100 - _LEVEL_PERCENTILE]))
    counts = np.issubdtype(colour.dtype, np.integer) or (
        low >= 0 and high > 300 and np.mean(sample == np.round(sample)) >= _WHOLE_SHARE)
    if counts:
        return 0.0, float(2 ** math.ceil(math.log2(max(high, 1.0) + 1)) - 1)
    if low >= -0.5 and nine_in_ten <= 1.5:
        return 0.0, 1.0
    if low >= -1 and high <= 300:
        return 0.0, 255.0
    return low, max(high, low + 1e-12)


def background_colour(colour: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Median colour (RGB, in the image's own levels) of the unlabelled pixels (of all pixels when
    every pixel is labelled), from a regular grid of at most about a quarter million pixels."""
    step = max(1, math.isqrt(labels.size // _BACKGROUND_SAMPLES))
    grid, grid_labels = colour[::step, ::step], labels[::step, ::step]
    pixels = grid[grid_labels == 0] if (grid_labels == 0).any() else grid.reshape(-1, *grid.shape[2:])
    return np.broadcast_to(np.median(pixels, axis=0), (3,)).astype(np.float32)


class CropSampler:
    """Holds one smear on a device and cuts normalised, resized crops of it in batches.

    Each crop is sampled from its own copy of the pixels under its window, in which pixels
    outside the image, and in ``"masked"`` mode pixels of other cells, are set to the
    background colour *before* resampling, so no neighbour bleeds in through interpolation.
    That colour is the median of the unlabelled pixels, or ``earlier_background`` (an earlier
    run's, RGB in the image's levels) while the median lies within 1 % of black to white of it.
    """

    def __init__(
        self,
        image,
        labels,
        *,
        size: tuple[int, int],
        mode: CropMode = DEFAULT_CROP_MODE,
        device: torch.device | str = "cpu",
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        earlier_background: np.ndarray | None = None,
    ):
        if mode not in CROP_MODES:
            raise CropInputError(f"Unknown crop mode {mode!r}; use one of {', '.join(CROP_MODES)}.")
        colour = colour_view(check_smear(image))
        labels = check_labels(labels, colour.shape)
        self.size, self.mode, self.device = tuple(size), mode, torch.device(device)
        black, white = black_and_white(colour)
        gain = np.float32(1.0 / (white - black))
        self.background = background_colour(colour, labels)  # RGB, the image's levels
        if earlier_background is not None and np.all(
            np.abs(self.background - earlier_background) <= _BACKGROUND_STEADINESS * (white - black)
        ):
            self.background = np.asarray(earlier_background, dtype=np.float32)
        background = (self.background - np.float32(black)) * gain
        # The smear travels to the device as it is (8-bit stays 8-bit: a quarter of float32's
        # bytes, and no pass over the whole image here); only the windows become float.
        pixels = colour if colour.dtype == np.uint8 else colour.astype(np.float32)
        top = int(labels.max(initial=0))
        label_bytes = labels.size * _label_type(labels, top, self.device).itemsize if mode == "masked" else 0
        # Pixels become (pixel - black) * gain - background: 0 is the background colour, so
        # padding and blanking are multiplications by 0, and roi_align's zeros outside its
        # input are background too.
        mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))
        # Levels beyond black and white (see black_and_white) are clipped; 8-bit has none.
        self._clips = colour.dtype != np.uint8
        normalisation = _Normalisation(
            gain=torch.tensor(gain),
            shift=torch.from_numpy(-black * gain - background),
            low=torch.from_numpy(-background),
            high=torch.from_numpy(1 - background),
            # (shifted + background - mean) / std == shifted * scale + offset
            scale=1.0 / std_t,
            offset=(torch.from_numpy(background).view(1, 3, 1, 1) - mean_t) / std_t,
        )
        self.home = smear_home(self.device, pixels.nbytes + label_bytes)
        labels = labels.astype(_label_type(labels, top, self.home), copy=False) if mode == "masked" else None
        try:
            self._keep_on(self.home, pixels, labels, normalisation)
        except torch.cuda.OutOfMemoryError:
            self.home = torch.device("cpu")
            self._keep_on(self.home, pixels, labels, normalisation)
            torch.cuda.empty_cache()

    def _keep_on(self, device: torch.device, pixels: np.ndarray, labels: np.ndarray | None,
                 normalisation: _Normalisation) -> None:
        self._pixels = _on_device(pixels, device)
        self._labels = _on_device(labels, device) if labels is not None else None
        self._normalisation = normalisation.to(device)

    def __call__(self, ids: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Crops of the cells ``ids`` in ``boxes`` (x0, y0, x1, y1): float32 (n, 3, H, W) on :attr:`home`."""
        parts = [self._cut_in_memory(ids[part], boxes[part])
                 for part in _parts_within(boxes, _MAX_WINDOW_PIXELS, alone_above=_THINNED_ABOVE_PX - 8)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _cut_in_memory(self, ids: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """:meth:`_cut`, in halves while a CUDA device runs out of memory for all of them."""
        try:
            return self._cut(ids, boxes)
        except torch.cuda.OutOfMemoryError:
            if len(ids) == 1:
                raise
        torch.cuda.empty_cache()  # after the except block, whose traceback held the failed cut's tensors
        half = len(ids) // 2
        return torch.cat([self._cut_in_memory(ids[:half], boxes[:half]), self._cut_in_memory(ids[half:], boxes[half:])])

    def _cut(self, ids: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        # one pixel more on each side than the window, for the bilinear neighbours of its edge
        corner = np.floor(boxes[:, :2]).astype(np.int64) - 1
        side = int(np.ceil((boxes[:, 2:] - corner).max())) + 2
        # A window wider than _THINNED_ABOVE_PX (one label over the whole smear: a mask, not cells)
        # is read at every stride-th pixel, the middle one of each stride x stride block: its copy
        # stays within a batch's _MAX_WINDOW_PIXELS, where whole it took gigabytes (at margin 4,
        # more than the machine had). Such a window is cut alone (see _parts_within), so no
        # other crop changes.
        stride = max(1, math.ceil(side / _THINNED_ABOVE_PX))
        steps = torch.arange(math.ceil(side / stride), device=self.home) * stride + stride // 2
        cols = self._sent(corner[:, 0])[:, None] + steps
        rows = self._sent(corner[:, 1])[:, None] + steps
        height, width = self._pixels.shape[:2]
        keep = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        rows, cols = rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]
        if self._labels is not None:
            under = self._labels[rows, cols]
            keep &= (under == 0) | (under == self._sent(ids)[:, None, None])
        pixels = self._pixels[rows, cols]  # (n, side, side) gray or (n, side, side, 3)
        if pixels.ndim == 3:
            pixels = pixels[..., None]
        norm = self._normalisation
        windows = pixels.float() * norm.gain + norm.shift
        if self._clips:
            windows = torch.maximum(torch.minimum(windows, norm.high), norm.low)
        windows = windows * keep[..., None]
        local = boxes - np.tile(corner, 2)
        if stride > 1:  # in pixels of the thinned window, whose pixel j is the window's j * stride + stride // 2
            local = (local - stride // 2 - 0.5) / stride + 0.5
        local = self._sent(local.astype(np.float32))
        indexed = torch.cat([torch.arange(len(local), device=self.home, dtype=torch.float32)[:, None], local], 1)
        channels_first = windows.permute(0, 3, 1, 2).contiguous()
        crops = roi_align(channels_first, indexed, self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return crops * norm.scale + norm.offset

    def _sent(self, array: np.ndarray) -> torch.Tensor:
        """A batch's few numbers (window corners, ids) on :attr:`home`. A GPU gets them from
        pinned memory without waiting: a copy from pageable memory waits for the model's batch
        queued before it on the stream, and the GPU would idle while the rest of the cut is queued."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.home.type != "cuda":
            return tensor.to(self.home)  # no copy on the CPU
        return tensor.pin_memory().to(self.home, non_blocking=True)  # the pinned block is kept until copied


@dataclass(frozen=True, eq=False)  # tensors do not compare to a bool
class _Normalisation:
    """How a smear pixel becomes a model input: ``pixel * gain + shift`` in its window (0 is the
    smear's background colour) kept within ``low`` and ``high`` (black and white), then
    ``* scale + offset`` after resampling."""

    gain: torch.Tensor
    shift: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    def to(self, device: torch.device) -> _Normalisation:
        return _Normalisation(*(getattr(self, field.name).to(device) for field in fields(self)))


def smear_home(device: torch.device, nbytes: int) -> torch.device:
    """Where a smear of ``nbytes`` is kept for cutting crops for ``device``: there, unless it
    is a GPU that it would fill beyond a quarter of its free memory; then the CPU."""
    if device.type != "cuda":
        return device
    return device if nbytes <= _SMEAR_SHARE_OF_FREE_MEMORY * cuda_free_bytes(device) else torch.device("cpu")


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes the GPU ``device`` can still give this process: free on the card, and what
    PyTorch's allocator holds unused from earlier work (the card counts that as taken, so after
    one smear the next would get smaller batches and might be cut on the CPU)."""
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + unused


def _label_type(labels: np.ndarray, top: int, home: torch.device) -> np.dtype:
    """The integer type ``labels``, of ids up to ``top``, are kept in on ``home``: on a GPU the
    smallest (int16 halves the upload of int32); in CPU memory their own when it is int32 or
    int64 (segmentation's and napari's), so they are shared, not copied; else int32 or int64."""
    if top < 2**15 and home.type != "cpu":
        return np.dtype(np.int16)
    if home.type == "cpu" and labels.dtype in (np.int32, np.int64):
        return labels.dtype
    return np.dtype(np.int32 if top < 2**31 else np.int64)


def _on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; on the CPU it shares the array's memory, which is
    only read, so a read-only array (napari's, a memory map) needs no copy."""
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)  # a flipped view, which torch cannot share
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


def _parts_within(boxes: np.ndarray, max_pixels: int, alone_above: float = math.inf) -> list[slice]:
    """Consecutive runs of windows whose padded copies hold at most ``max_pixels`` together; a
    window of a side over ``alone_above`` pixels is a part of its own."""
    sides = np.ceil(boxes[:, 2] - boxes[:, 0]) + 3
    parts, start, largest = [], 0, 0.0
    for index, side in enumerate(sides):
        largest = max(largest, side)
        alone = side > alone_above or (index > 0 and sides[index - 1] > alone_above)
        if index > start and ((index - start + 1) * largest**2 > max_pixels or alone):
            parts.append(slice(start, index))
            start, largest = index, side
    return [*parts, slice(start, len(sides))]


def cell_crops(
    image,
    labels,
    size: int | tuple[int, int] = 224,
    *,
    mode: CropMode = DEFAULT_CROP_MODE,
    margin: float = DEFAULT_MARGIN,
    scale: CropScale = DEFAULT_CROP_SCALE,
) -> tuple[np.ndarray, np.ndarray]:
    """``(label_ids, crops)``: what the model sees for each cell, as float32 RGB (n, H, W, 3) in [0, 1]."""
    size = crop_size(size)
    windows, sampler = prepare_crops(image, labels, size=size, mode=mode, margin=margin, scale=scale)
    if not len(windows):
        return windows.ids, np.zeros((0, *size, 3), dtype=np.float32)
    crops = sampler(windows.ids, windows.boxes)
    return windows.ids, crops.permute(0, 2, 3, 1).numpy()


def prepare_crops(image, labels, *, size: tuple[int, int], mode: CropMode = DEFAULT_CROP_MODE,
                  margin: float = DEFAULT_MARGIN, scale: CropScale = DEFAULT_CROP_SCALE,
                  device: torch.device | str = "cpu", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                  earlier_background: np.ndarray | None = None) -> tuple[CellWindows, CropSampler]:
    """Every cell's window, and a :class:`CropSampler` holding the smear on ``device``: what
    cutting needs before its first crop. The windows are found in a thread while the smear goes
    to the device (both let go of the GIL)."""
    check_crop_settings(margin, scale)
    labels = check_labels(labels, check_smear(image).shape)  # before the thread: sparse ids are refused, not listed
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reddino-windows") as finder:
        finding = finder.submit(cell_windows, labels, margin, scale)
        sampler = CropSampler(image, labels, size=size, mode=mode, device=device, mean=mean, std=std,
                              earlier_background=earlier_background)
        return finding.result(), sampler


def crop_size(size) -> tuple[int, int]:
    """``size`` (an int, or (height, width)) as (height, width) of whole positive pixels, or CropInputError."""
    pair = (size, size) if isinstance(size, int | np.integer) else tuple(np.ravel(size))
    if len(pair) != 2 or not all(is_positive(side, whole=True) for side in pair):
        raise CropInputError(f"size must be a positive whole number of pixels or (height, width); got {size!r}.")
    return int(pair[0]), int(pair[1])


def crop_checks(crops: torch.Tensor) -> torch.Tensor:
    """Two numbers per crop of ``crops`` (n, C, H, W) that move when any of its values moves:
    a fixed random projection (float32, (n, 2), on the crops' device). A crop is cut the same
    whatever else is in its batch, so equal checks say the model would see the same input
    again: a cell whose crop a brush stroke did not reach keeps its embedding
    (``Embedder.embed_steps(reuse=)``). A change below float rounding could go unseen; it would
    move the embedding by as little."""
    flat = crops.reshape(len(crops), -1).float()
    return flat @ _projection(flat.shape[1], flat.device)


@functools.lru_cache(maxsize=4)
def _projection(length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.randn(length, 2, generator=generator).to(device)

