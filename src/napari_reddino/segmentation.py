"""Red-cell segmentation of a whole smear: one label per red cell, 0 for background.

The smear is calibrated once (stain, background, threshold, cell size), then segmented in
overlapping tiles at a working scale where a cell is at most ~30 px across (shrunk, never
enlarged). A tile keeps the cells
whose centre lies in its core; its margin is wider than a cell, so each kept cell is whole
and the stitched result has no seams. Memory is bounded by the tile size, not the image.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import ceil

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from .cell_lookup import cell_centres
from .cell_separation import (
    WORKING_DIAMETER_PX,
    Thresholds,
    cell_contrast,
    drop_nuclei,
    fill_enclosed_gaps,
    flatten_background,
    foreground_thresholds,
    separate_cells,
    shows_cells,
    smooth_density,
)
from .cell_size import sized_foreground
from .image_input import StainModel, check_smear, fit_stain_model, is_positive
from .label_geometry import keep_segments, largest_pieces
from .resampling import resize_linear, resize_nearest
from .steps import Progress, run_steps

RBC_DIAMETER_UM = 7.5  # a normal red cell; turns a pixel size into an expected diameter
MIN_CELL_PX = 5.0  # a red cell fewer pixels across can be neither segmented nor embedded
MAX_PIXEL_SIZE_UM = RBC_DIAMETER_UM / MIN_CELL_PX
MIN_PIXEL_SIZE_UM = 0.01  # finer than a light microscope samples: a size in metres or millimetres
FULL_RESOLUTION_SIGMA = 0.5  # px: smoothing of the density where cells are sized at full resolution
FULL_RESOLUTION_SMALLER = 1.25  # ... and how much smaller they must come out there to be taken
CALIBRATION_SIZE = 1024  # px side of the central window used to calibrate large smears
TILE_CORE = 1536  # px side of a tile's core at working scale, at most
TILE_CORE_INPUT = 2048  # ... and in input pixels: much of a tile's work is at input scale (about 36 bytes a pixel)
TILE_MARGIN_DIAMETERS = 1.5
SEAM_REACH_DIAMETERS = 0.5  # a seam cell's centre as two tiles see it lies closer than this to the seam
RENUMBER_ROWS = 512
SEEN_TWICE = 4  # a cell losing more than 1/4 of itself to another tile's cell was that cell again


@dataclass(frozen=True)
class Calibration:
    """What one smear needs to be segmented consistently across all its tiles."""

    stain: StainModel
    cell_diameter: float  # px in the input image
    scale: float  # working scale / input scale (<= 1)
    thresholds: Thresholds | None  # in smoothed working-scale density; None: no contrast

    @property
    def working_diameter(self) -> float:
        return self.cell_diameter * self.scale


def segment_cells(
    image,
    *,
    cell_diameter: float | None = None,
    pixel_size_um: float | None = None,
    progress: Progress | None = None,
    workers: int = 2,
) -> np.ndarray:
    """Segment the red cells of a smear; returns int32 labels (0 = background).

    ``image``: RGB, RGBA or grayscale; uint8, uint16 or float; any size (large smears are
    processed in tiles). ``cell_diameter`` (px) or ``pixel_size_um`` fix the cell size;
    otherwise it is estimated from the image. White cells, platelets, debris and overlays are
    left out. ``progress(done, total)`` is called after each tile.
    """
    steps = iter_segment_cells(image, cell_diameter=cell_diameter, pixel_size_um=pixel_size_um, workers=workers)
    return run_steps(steps, progress)


def iter_segment_cells(
    image, *, cell_diameter: float | None = None, pixel_size_um: float | None = None, workers: int = 2
) -> Generator[tuple[int, int], None, np.ndarray]:
    """:func:`segment_cells` as a generator: yields ``(tiles_done, tiles_total)``, returns labels.

    Closing the generator between tiles cancels the work (napari workers do this on quit).
    """
    array = check_smear(image)
    calibration, smoothed_whole = _calibrate(array, cell_diameter, pixel_size_um)
    labels = np.zeros(array.shape[:2], np.int32)
    if calibration.thresholds is None:
        yield 1, 1
        return labels
    tiles = list(plan_tiles(array.shape[:2], calibration))
    if len(tiles) == 1 and smoothed_whole is not None:
        labels = _separate_at_input_scale(smoothed_whole, array, calibration)
        yield 1, 1
        return labels
    next_id, gone = 1, []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))  # not a with block: its exit waits for running tiles
    pending = [pool.submit(_segment_tile, array, tile, calibration) for tile in tiles]
    try:
        for done, tile in enumerate(tiles, start=1):
            future, pending[done - 1] = pending[done - 1], None  # a pasted tile's labels are let go
            next_id, removed = tile.paste(future.result(), labels, next_id)
            gone.extend(removed)
            del future
            yield done, len(tiles)
    finally:  # closed early (cancelled): drop queued tiles, and do not wait for those running
        pool.shutdown(wait=False, cancel_futures=True)
    if gone:  # ids 1..n again, a strip at a time (a whole-image copy is 4 bytes a pixel more)
        keep = np.ones(next_id, bool)
        keep[gone] = False
        relabel = keep_segments(np.arange(next_id, dtype=np.int32), keep)
        for start in range(0, labels.shape[0], RENUMBER_ROWS):
            labels[start:start + RENUMBER_ROWS] = relabel[labels[start:start + RENUMBER_ROWS]]
    return labels


def pixel_size_refusal(pixel_size_um) -> str | None:
    """Why ``pixel_size_um`` cannot be a smear's micrometres per pixel, as a sentence; None if it can be."""
    if not is_positive(pixel_size_um):
        return f"The pixel size must be a positive number of micrometres; got {pixel_size_um!r}."
    if pixel_size_um < MIN_PIXEL_SIZE_UM:
        return (f"{pixel_size_um:g} µm per pixel is finer than a light microscope images (at least "
                f"{MIN_PIXEL_SIZE_UM:g}): is it in micrometres, not metres or millimetres?")
    return too_coarse(pixel_size_um) if pixel_size_um > MAX_PIXEL_SIZE_UM else None


def too_coarse(pixel_size_um: float) -> str:
    """Why a pixel size above :data:`MAX_PIXEL_SIZE_UM` is refused: most often it is the camera
    sensor's (3.45 or 6.5 µm), not yet divided by the objective's magnification."""
    return (f"At {pixel_size_um:g} µm per pixel a red cell would be {RBC_DIAMETER_UM / pixel_size_um:.2g} px across, "
            f"too few to segment or embed (at most {MAX_PIXEL_SIZE_UM:g} µm per pixel). Is it the camera sensor's pixel "
            f"size? Divide it by the objective's magnification: at 100x, {pixel_size_um:g} µm is "
            f"{pixel_size_um / 100:.4g} µm per pixel.")


def estimate_cell_diameter(image) -> float:
    """Typical red-cell diameter (px) of a smear, as :func:`segment_cells` estimates it.

    Pass the result on as ``cell_diameter`` to record it and not estimate twice.
    """
    array = check_smear(image)
    return _estimate_diameter(*_calibration_window(array, fit_stain_model(array))[::-1])


def _calibrate(
    array: np.ndarray, cell_diameter: float | None, pixel_size_um: float | None
) -> tuple[Calibration, np.ndarray | None]:
    """Fit stain, cell size and foreground threshold on (the centre of) the smear.

    Also returns the smoothed working-scale density when the window was the whole image,
    so a small smear is converted once, not twice.
    """
    if cell_diameter is not None and not is_positive(cell_diameter):
        raise ValueError(f"cell_diameter must be a positive number of pixels; got {cell_diameter!r}.")
    if cell_diameter is not None and cell_diameter < MIN_CELL_PX:
        raise ValueError(f"A cell diameter of {cell_diameter:g} px is too small to segment or embed (at least "
                         f"{MIN_CELL_PX:g} px): the diameter is in pixels, not micrometres (a red cell is about "
                         f"{RBC_DIAMETER_UM:g} µm across).")
    if pixel_size_um is not None and (refusal := pixel_size_refusal(pixel_size_um)):
        raise ValueError(refusal)
    from_pixel_size = cell_diameter is None and pixel_size_um is not None  # a typed diameter wins
    if from_pixel_size:
        cell_diameter = RBC_DIAMETER_UM / pixel_size_um
    if cell_diameter is not None and cell_diameter > max(array.shape[:2]):  # refused before any work
        image = f"the whole {array.shape[1]}x{array.shape[0]} image"
        raise ValueError(
            f"With a pixel size of {pixel_size_um:g} µm, a red cell would be {cell_diameter:,.0f} px across, more "
            f"than {image}: is the pixel size in micrometres (about 0.1-0.5 for a smear under a 40-100x objective)?"
            if from_pixel_size else
            f"A cell diameter of {cell_diameter:,.0f} px is more than {image}: the diameter is in pixels (a red "
            "cell is about 7.5 µm across)."
        )
    stain = fit_stain_model(array)
    density, half = _calibration_window(array, stain)
    whole = density.shape == array.shape[:2]
    if cell_diameter is None:
        cell_diameter = _estimate_diameter(half, density)
    scale = min(1.0, WORKING_DIAMETER_PX / cell_diameter)
    smoothed = _working_density(density, scale, cell_diameter * scale)
    calibration = Calibration(stain, float(cell_diameter), scale, foreground_thresholds(smoothed, working_scale=True))
    return calibration, smoothed if whole else None


def _calibration_window(array: np.ndarray, stain: StainModel) -> tuple[np.ndarray, np.ndarray | None]:
    """The density of the window a smear is calibrated on, and that density at
    :func:`_half_resolution`: the central window, or where that holds no cell (bare slide: a gap
    in a slide scan), the window of a 3x3 grid that shows the most."""
    density = stain.density(array[_central_window(array.shape[0]), _central_window(array.shape[1])])
    half = _half_resolution(density)
    if density.shape == array.shape[:2] or half is None or shows_cells(half):
        return density, half
    windows = [(rows, cols) for rows in _grid_windows(array.shape[0]) for cols in _grid_windows(array.shape[1])]
    densities = (stain.density(array[rows, cols]) for rows, cols in windows)
    return max(((window, _half_resolution(window)) for window in densities), key=lambda pair: cell_contrast(pair[1]))


def _grid_windows(length: int) -> list[slice]:
    """Calibration windows centred at 1/6, 3/6 and 5/6 of ``length`` (one where it is shorter)."""
    starts = {min(max(0, round(length * sixths / 6) - CALIBRATION_SIZE // 2), max(0, length - CALIBRATION_SIZE))
              for sixths in (1, 3, 5)}
    return [slice(start, start + CALIBRATION_SIZE) for start in sorted(starts)]


def _estimate_diameter(smoothed: np.ndarray | None, density: np.ndarray | None = None) -> float:
    """Cell diameter from the foreground of a density at :func:`_half_resolution`, or, where
    the cells are too small to size there (under about 12 px) or sized near the smallest size
    that counts (under about 28 px: crowded, the gaps between them blur shut), of ``density``
    itself when that finds them smaller by more than :data:`FULL_RESOLUTION_SMALLER`."""
    if smoothed is None:
        return WORKING_DIAMETER_PX
    thresholds = foreground_thresholds(smoothed)
    half = None if thresholds is None else sized_foreground(smoothed > thresholds.cell)
    if density is not None and (half is None or half.too_small or half.near_floor):
        full_density = ndi.gaussian_filter(density, FULL_RESOLUTION_SIGMA)
        if (full_thresholds := foreground_thresholds(full_density)) is not None:
            full = sized_foreground(full_density > full_thresholds.cell)
            if half is not None and half.too_small:
                return full.diameter
            # no foreground at half resolution, or sized near the floor: by cells full resolution finds, not grain
            if not full.too_small and (half is None or full.diameter * FULL_RESOLUTION_SMALLER < 2 * half.diameter):
                return full.diameter
    return WORKING_DIAMETER_PX if half is None else 2 * half.diameter


def _half_resolution(density: np.ndarray) -> np.ndarray | None:
    """Density in 2x2 means, smoothed a little: enough to size and find cells, 4x less work (None
    for a density under 2 px a side)."""
    height, width = (density.shape[0] // 2) * 2, (density.shape[1] // 2) * 2
    if min(height, width) < 2:
        return None
    return ndi.gaussian_filter(0.25 * sum(density[i:height:2, j:width:2] for i in (0, 1) for j in (0, 1)), 1.0)


def _central_window(length: int) -> slice:
    start = max(0, (length - CALIBRATION_SIZE) // 2)
    return slice(start, start + CALIBRATION_SIZE)


def _rescale(plane: np.ndarray, scale: float) -> np.ndarray:
    """Shrink by ``scale`` <= 1: a box filter one output pixel wide, then linear sampling."""
    if scale >= 1.0:
        return plane
    shape = (max(1, round(plane.shape[0] * scale)), max(1, round(plane.shape[1] * scale)))
    # An even box reaches one pixel further up and left, which moves cells 45-75 and 105-135 px
    # across half a pixel down and right; centring it (averaged with its mirror) smooths more,
    # and cost Aslan's boxes 1.2 points of F1 at IoU 0.5 (benchmarks/RESULTS.md), so it stays.
    box = ndi.uniform_filter(plane, size=max(1, round(1 / scale)))
    return resize_linear(box, shape)


@dataclass(frozen=True)
class Tile:
    """A core (cells whose centre lies here are kept) inside a padded read window.

    Two tiles can each centre a cell on their seam in the other's core, and neither keeps it;
    so a cell centred within ``seam_reach`` px of the core, in the core of a tile pasted before
    (tiles go row by row: above this one, or left of it), is kept too where most of it is still
    unlabelled: that tile did not keep it.
    """

    core: tuple[slice, slice]
    window: tuple[slice, slice]
    seam_reach: int = 0

    def paste(self, tile_labels: np.ndarray, labels: np.ndarray, next_id: int) -> tuple[int, np.ndarray]:
        """Write the cells centred in the core into ``labels``; return the next free id, and the
        ids of earlier cells this removed.

        Two tiles can outline a cell on their seam a little apart, each centring it in its own
        core: the later outline replaces the earlier, whose rest goes too, not left as a speck
        of a cell (an earlier cell losing more than 1/4 of itself here was that cell again); a
        cell losing less keeps its largest piece.
        Their pixels in this window are cleared here, any beyond it when :func:`iter_segment_cells`
        renumbers the cells.
        """
        n = int(tile_labels.max())
        if n == 0:
            return next_id, np.zeros(0, np.intp)
        rows, cols = cell_centres(tile_labels)
        rows += self.window[0].start
        cols += self.window[1].start
        region = labels[self.window]
        keep = self._centred(rows, cols, 0)
        if self.seam_reach and not keep.all():
            unclaimed = np.bincount(tile_labels[region == 0], minlength=n + 1)[1:] * 2 > (
                np.bincount(tile_labels.ravel(), minlength=n + 1)[1:])
            (top, bottom), left = (self.core[0].start, self.core[0].stop), self.core[1].start
            pasted_before = (rows < top) | ((rows < bottom) & (cols < left))
            keep |= self._centred(rows, cols, self.seam_reach) & pasted_before & unclaimed
        end = next_id + int(keep.sum())
        relabel = np.zeros(n + 1, np.int32)
        relabel[1:][keep] = np.arange(next_id, end, dtype=np.int32)
        new = relabel[tile_labels]
        ours = new > 0
        taken = np.bincount(region[ours], minlength=end)  # of each earlier cell, by the new outlines
        lost = taken[:next_id] * SEEN_TWICE > np.bincount(region.ravel(), minlength=next_id)
        lost[0] = False
        cleared = lost[region] & ~ours
        region[ours] = new[ours]
        region[cleared] = 0
        cut = taken > 0  # kept (the lost have no pixel left here), but a new outline cut through them
        cut[0] = False
        if cut.any():
            trimmed = np.where(cut[region], region, 0)
            region[(trimmed > 0) & (largest_pieces(trimmed) == 0)] = 0  # the bits cut off them
        return end, np.flatnonzero(lost)  # their rest beyond the window goes too

    def _centred(self, rows: np.ndarray, cols: np.ndarray, reach: int) -> np.ndarray:
        """Which centres lie in the core grown by ``reach`` px."""
        (top, bottom), (left, right) = ((s.start - reach, s.stop + reach) for s in self.core)
        return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def plan_tiles(shape: tuple[int, int], calibration: Calibration) -> Iterator[Tile]:
    """Equal tiles covering the image, cores of at most ``TILE_CORE`` working-scale px,
    margins of 1.5 cells (equal, so parallel workers finish together)."""
    longest = max(1, min(int(TILE_CORE / calibration.scale), TILE_CORE_INPUT))
    margin = ceil(TILE_MARGIN_DIAMETERS * calibration.cell_diameter)
    counts = [max(1, ceil(length / longest)) for length in shape]
    steps = [ceil(length / count) for length, count in zip(shape, counts)]
    for top in range(0, shape[0], steps[0]):
        for left in range(0, shape[1], steps[1]):
            core = (slice(top, min(top + steps[0], shape[0])), slice(left, min(left + steps[1], shape[1])))
            window = tuple(
                slice(max(0, s.start - margin), min(length, s.stop + margin)) for s, length in zip(core, shape)
            )
            yield Tile(core, window, seam_reach=ceil(SEAM_REACH_DIAMETERS * calibration.cell_diameter))


def _segment_tile(array: np.ndarray, tile: Tile, calibration: Calibration) -> np.ndarray:
    window = array[tile.window]
    smoothed = _working_density(calibration.stain.density(window), calibration.scale, calibration.working_diameter)
    return _separate_at_input_scale(smoothed, window, calibration)


def _working_density(density: np.ndarray, scale: float, working_diameter: float) -> np.ndarray:
    """Density as the separation sees it: shrunk to working scale, smoothed, evenly lit."""
    return flatten_background(smooth_density(_rescale(density, scale)), working_diameter)


def _upsample_labels(
    labels: np.ndarray, smoothed: np.ndarray, shape: tuple[int, int], calibration: Calibration
) -> np.ndarray:
    """Labels back at input scale with smooth outlines, not working-scale staircases.

    Ids come from the nearest working-scale pixel; within 1/scale pixels of the slide, the
    interpolated density decides (same threshold) both ways, trimming the blocks' corners and
    filling their notches, so areas, perimeters and circularity are measured on the cell, and
    the same at any magnification. Filled pale centres are left as they are.
    """
    grown = resize_nearest(expand_labels(labels, 1.5), shape)  # grown at working scale: little memory
    labels = resize_nearest(labels, shape)
    fine = resize_linear(smoothed, shape) > calibration.thresholds.cell
    reach = ceil(1 / calibration.scale)
    near_slide = ndi.binary_dilation(labels == 0, iterations=reach)
    labels[near_slide] = np.where(fine[near_slide], grown[near_slide], 0)
    return fill_enclosed_gaps(labels, (2 * reach) ** 2)  # pinholes trimmed inside an outline


def _separate_at_input_scale(smoothed: np.ndarray, window: np.ndarray, calibration: Calibration) -> np.ndarray:
    labels = separate_cells(smoothed, calibration.thresholds, calibration.working_diameter)
    if calibration.scale < 1.0:
        labels = _upsample_labels(labels, smoothed, window.shape[:2], calibration)
    labels = largest_pieces(labels)
    if window.ndim == 3:
        # Colour per cell needs thousands of pixels, not all: every other row and column.
        red, green, _ = calibration.stain.optical_densities(window[::2, ::2])
        labels = drop_nuclei(labels, red, green, labels[::2, ::2])
    return labels
