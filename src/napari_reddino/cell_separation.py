"""Cells from a density image: threshold, fill pallor, split touching cells, clean up.

Every size parameter is a fraction of the cell radius. Segmentation thresholds and splits on
images shrunk so that a red cell is about ``WORKING_DIAMETER_PX`` across (smears whose cells
are smaller stay as they are), which makes the running time independent of magnification above
that; the clean-ups (gaps inside an outline, nuclei) then run on the labels at input scale.
"""

from __future__ import annotations

from math import ceil
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon
from skimage.segmentation import watershed

from .cell_lookup import cell_centres
from .image_input import otsu_threshold
from .label_geometry import (
    background_gaps,
    convex_corners,
    distance_to_background,
    fill_holes,
    hull_pixels,
    keep_segments,
    padded,
)
from .resampling import resize_linear

WORKING_DIAMETER_PX = 30.0
SMOOTHING_SIGMA = 1.0
CONTRAST_FRACTION = 0.3  # threshold at least this far from background towards cell level
NOISE_SIGMAS = 3.0  # ... and this many background standard deviations above background
# Least optical density between cells and bare slide for anything to count as cells: stained red
# cells show 0.037 and more (all 559 Chula and Aslan smears), a blank field's camera grain 0.001-0.01
# (benchmarks/blank_fields.py).
MIN_CELL_CONTRAST = 0.015
# Otsu's split of pure camera grain keeps 0.64 of the variance between its two halves (2/pi, a
# normal distribution's). 4 of the 559 smears keep as little (0.57-0.66), but show a contrast of
# 0.077 or more, where a field of grain 20 at mid-grey shows 0.031 (benchmarks/blank_fields.py).
# So a split no more two-levelled than grain must show this much contrast too.
GRAIN_SEPARATION = 0.66
MIN_GRAIN_LIKE_CONTRAST = 0.05
# Cells end in edges. Along the outline where Otsu splits a smear's working-scale density, the
# density climbs at least 0.12 of the contrast per pixel more steeply than on the slide away from
# it (all 559 smears; 0.06 and more blurred by a sixth of a cell and grained), where a vignetted
# blank field's smooth fall-off climbs 0.016 or less, or 0.09 where it is sized as one huge cell
# and gives 0-4 "cells" (benchmarks/blank_fields.py).
MIN_EDGE_STEEPNESS = 0.05
FAINT_LEVEL = 0.5  # a faint outline: this far from background towards the cell threshold
MAX_PALLOR_AREA = 0.6  # holes up to this fraction of a cell are its pale centre
MIN_PALLOR_AREA = 0.02  # ... and, inside a faint outline, at least this fraction
PALLOR_ROUNDNESS = 3.5  # ... and compact: at most this many discs of its inscribed radius (slits fail)
FAINT_RIM_REACH = 1.0  # radii around a pale centre whose faint pixels join it
MARKER_SPACING = 0.3  # watershed seeds at least this many radii apart
MARKER_HEIGHT = 0.3  # seeds at least this many radii from the cell edge
MIN_CELL_AREA = 0.2  # smaller pieces (platelets, debris) are dropped
MIN_HALF_WIDTH = 0.12  # ... and so are pieces nowhere wider than this (radii from the edge)
CLUMP_AREA = 1.2  # regions larger than this many cells are checked for hidden neighbours
CLUMP_SEED_SPACING = 0.7  # radii between the centres found inside a clump
CLUMP_SEED_MIN_VOTES = 0.3  # a centre needs this share of the clump's strongest vote
VOTING_EDGE_PERCENTILE = 80  # only the strongest 20 % of edges vote
VOTING_REACH = (0.6, 1.1)  # radii inside an edge where it votes
RING_GAP = 0.15  # outline gaps up to this many radii are bridged to find a pale centre
TARGET_SPOT_AREA = (0.08, 0.35)  # a target cell's dark central spot, as a fraction of a cell
TARGET_RAYS = 32  # directions searched for the rim around a spot
TARGET_RIM_REACH = 1.1  # radii from the spot's centre within which the rim begins
TARGET_RIM_SHARE = 0.7  # ... in at least this share of the directions
TARGET_BAND_SHARE = 0.5  # ... a pale band before it in at least this share
TARGET_RIM_SPREAD = 0.25  # ... beginning this concentrically (interquartile range, radii)
TARGET_EDGE_SPREAD = 0.4  # ... and ending, where the slide begins, this concentrically
BAY_CELL_AREA = (0.3, 1.2)  # segments this size (cells) are checked for a stained bay
BAY_BOX_FILL = 0.72  # ... and fill less of their bounding box (a disk fills 0.785 of it)
BAY_MIN_AREA = 0.15  # ... of at least this many cells, inside a convex hull of at most
BAY_MAX_HULL = 1.3  # ... this many cells
BAY_PALE_PERCENTILE = 25  # ... three quarters of which are denser than the bare slide
GAP_IN_HULL = 0.9  # a gap open to the image border is a cut cell's pale centre when this much lies in its hull
PIECE_AREA = 0.55  # a segment under this many cells may be a piece cut off a neighbour ...
PIECE_CONTACT = 0.25  # ... when this share of its outline touches that neighbour
PIECE_UNION_AREA = 1.25  # ... and together they are at most this many cells
PIECE_SOLIDITY = 0.9  # ... and this convex
NUCLEUS_RATIO_EXCESS = 0.4  # red/green absorbance above the smear's typical red cell
NUCLEUS_MIN_DENSITY = 0.5  # only judge cells at least half as dense as the typical one


BACKGROUND_BLOCK = 2.0  # diameters per block of the background estimate
BACKGROUND_PERCENTILE = 20
BACKGROUND_MAX_SHARE = 0.25  # the local background never rises above this share of the contrast


def smooth_density(density: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(density, SMOOTHING_SIGMA)


def flatten_background(smoothed: np.ndarray, diameter: float) -> np.ndarray:
    """Subtract uneven illumination: a low percentile per block, minimum over 3x3 blocks.

    Blocks are two cells wide and the minimum spans six, so a block covered by cells takes
    its neighbours' slide level; the cap keeps a crowded smear from being flattened away.
    """
    block = max(4, int(BACKGROUND_BLOCK * diameter))
    rows, cols = -(-smoothed.shape[0] // block), -(-smoothed.shape[1] // block)
    if rows * cols < 4:
        return smoothed
    padded = np.pad(smoothed, ((0, rows * block - smoothed.shape[0]), (0, cols * block - smoothed.shape[1])), mode="reflect")
    tiles = padded.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    k = int(tiles.shape[-1] * BACKGROUND_PERCENTILE / 100)
    level = np.partition(tiles, k, axis=-1)[..., k]
    level = ndi.minimum_filter(level, size=3, mode="nearest")
    low = float(np.median(level))
    otsu = otsu_threshold(smoothed)
    cap = low + BACKGROUND_MAX_SHARE * 2 * max(otsu - low, 0.0)
    level = np.minimum(level, cap) - low
    return smoothed - resize_linear(level.astype(np.float32), smoothed.shape)


class Thresholds(NamedTuple):
    """Smoothed densities: where cells begin, where a faint outline begins, the bare slide."""

    cell: float
    faint: float
    slide: float


def foreground_thresholds(smoothed: np.ndarray, *, working_scale: bool = False) -> Thresholds | None:
    """Where cells begin in smoothed density; None when nothing stands out from the slide as
    much as a stained cell does (a blank field, whose noise would otherwise be split into cells),
    or, at ``working_scale``, where the split does not run along edges (a vignetted blank field)."""
    split = _otsu_split(smoothed)
    if not _shows_cells(smoothed, split):
        return None
    if working_scale and _edge_steepness(smoothed, split) < MIN_EDGE_STEEPNESS:
        return None
    otsu, low, high = split
    background = smoothed[smoothed <= otsu]
    noise_floor = min(low + NOISE_SIGMAS * float(background.std()), otsu)
    cell = max(low + CONTRAST_FRACTION * (high - low), noise_floor)
    return Thresholds(cell, low + FAINT_LEVEL * (cell - low), low)


def shows_cells(smoothed: np.ndarray) -> bool:
    """Whether smoothed density holds anything that stands out from the slide as cells do."""
    return _shows_cells(smoothed, _otsu_split(smoothed))


def _shows_cells(smoothed: np.ndarray, split: tuple[float, float, float] | None) -> bool:
    if split is None or split[2] - split[1] < MIN_CELL_CONTRAST:
        return False
    return split[2] - split[1] >= MIN_GRAIN_LIKE_CONTRAST or _separation(smoothed, split) >= GRAIN_SEPARATION


def split_separation(smoothed: np.ndarray) -> float:
    """The share of smoothed density's variance that lies between Otsu's two levels: 2/pi for
    camera grain alone, nearer 1 the more clearly a smear shows two levels (slide and cells)."""
    return _separation(smoothed, _otsu_split(smoothed))


def _separation(smoothed: np.ndarray, split: tuple[float, float, float] | None) -> float:
    if split is None:
        return 0.0
    otsu, low, high = split
    share = float((smoothed > otsu).mean())
    return share * (1 - share) * (high - low) ** 2 / float(smoothed.var())


def edge_steepness(smoothed: np.ndarray) -> float:
    """How much more steeply smoothed density climbs along the outline where Otsu splits it than
    on the slide 4 px and more away, per pixel, over the contrast between the two levels: about
    0.2 for a smear at working scale, 0.015 for light falling off smoothly (0 for a flat image)."""
    return _edge_steepness(smoothed, _otsu_split(smoothed))


def _edge_steepness(smoothed: np.ndarray, split: tuple[float, float, float] | None) -> float:
    if split is None:
        return 0.0
    otsu, low, high = split
    coarse = smoothed[::2, ::2]  # a quarter of the work; smoothing already removed what it skips
    above = coarse > otsu
    if min(coarse.shape) < 2 or not above.any():  # no room for a cell, or nothing above but specks
        return 0.0
    steepness = np.hypot(*np.gradient(coarse, 2.0))
    outline = above & ~ndi.minimum_filter(above, size=3, mode="constant")  # the image border too
    slide = ~ndi.maximum_filter(above, size=5)
    slide_steepness = float(np.median(steepness[slide])) if slide.any() else 0.0
    return (float(np.median(steepness[outline])) - slide_steepness) / (high - low)


def cell_contrast(smoothed: np.ndarray) -> float:
    """How far the denser of the two levels Otsu splits smoothed density into lies above the
    other (0 for a flat image): the optical density of the cells over the slide."""
    split = _otsu_split(smoothed)
    return 0.0 if split is None else split[2] - split[1]


def _otsu_split(smoothed: np.ndarray) -> tuple[float, float, float] | None:
    """Otsu's threshold and the mean densities below and above it; None for a flat image."""
    if float(smoothed.max()) - float(smoothed.min()) < 1e-4:
        return None
    otsu = otsu_threshold(smoothed)
    return otsu, float(smoothed[smoothed <= otsu].mean()), float(smoothed[smoothed > otsu].mean())


def separate_cells(smoothed: np.ndarray, thresholds: Thresholds, diameter: float) -> np.ndarray:
    """Label image of the cells in one working-scale tile (ids 1..n, 0 background)."""
    radius = diameter / 2
    cell_area = np.pi * radius**2
    mask = fill_holes(smoothed > thresholds.cell, MAX_PALLOR_AREA * cell_area)
    mask |= _inside_open_rings(mask, max(1, int(RING_GAP * radius)), MAX_PALLOR_AREA * cell_area)
    mask |= _around_faint_pale_centres(smoothed, thresholds, mask, cell_area)
    distance = ndi.gaussian_filter(distance_to_background(mask), 1.0)
    components, n = ndi.label(mask)
    markers = _seed_every_component(_seeds(distance, radius), components, n)
    labels = _flood(distance, markers, components, n)
    labels = split_clumps(labels, smoothed, distance, radius)
    labels = join_target_spots(labels, smoothed, thresholds, radius)
    labels = fill_stained_bays(labels, smoothed, thresholds, radius)
    labels = _drop_thin(labels, distance, MIN_HALF_WIDTH * radius)
    labels = rejoin_pieces(labels, cell_area)
    labels = _drop_small(labels, MIN_CELL_AREA * cell_area)
    return fill_enclosed_gaps(labels, MAX_PALLOR_AREA * cell_area, stained_density=smoothed, slide=thresholds.slide,
                              stained_max_area=cell_area)


def radial_votes(smoothed: np.ndarray, radius: float, voters: np.ndarray) -> np.ndarray:
    """Radial-symmetry map: every strong edge votes for the centre one radius inside it.

    An overlapped cell still shows most of its outline, so its centre still collects the
    votes even where its neighbour hides part of it; the distance transform cannot see that.
    Only edges inside ``voters`` (a mask) vote.
    """
    gy = ndi.sobel(smoothed, 0)
    gx = ndi.sobel(smoothed, 1)
    magnitude = np.hypot(gx, gy)
    sample = magnitude[::2, ::2].ravel()
    rank = int(sample.size * VOTING_EDGE_PERCENTILE / 100)
    ys, xs = np.nonzero((magnitude > np.partition(sample, rank)[rank]) & voters)
    strength = magnitude[ys, xs]
    uy, ux = gy[ys, xs] / strength, gx[ys, xs] / strength
    height, width = smoothed.shape
    reach = np.linspace(VOTING_REACH[0] * radius, VOTING_REACH[1] * radius, 6, dtype=np.float32)[:, None]
    vy = np.rint(ys + reach * uy).astype(np.intp).ravel()
    vx = np.rint(xs + reach * ux).astype(np.intp).ravel()
    inside = (vy >= 0) & (vy < height) & (vx >= 0) & (vx < width)
    weight = np.broadcast_to(strength, (reach.size, strength.size)).ravel()[inside]
    votes = np.bincount(vy[inside] * width + vx[inside], weights=weight, minlength=height * width)
    return ndi.gaussian_filter(votes.reshape(height, width).astype(np.float32), 0.2 * radius)


def split_clumps(labels: np.ndarray, smoothed: np.ndarray, distance: np.ndarray, radius: float) -> np.ndarray:
    """Re-split regions larger than one cell along the valleys of the radial-symmetry map.

    All clumps are split by one watershed: each clump's seeds are its vote maxima, and the
    pixels where a clump touches another segment are left out so no clump floods another.
    Those border pixels keep the old id and are dropped later as too thin.
    """
    sizes = np.bincount(labels.ravel())
    is_clump = sizes > CLUMP_AREA * np.pi * radius**2
    is_clump[0] = False
    if not is_clump.any():
        return labels
    in_clump = is_clump[labels]
    votes = radial_votes(smoothed, radius, ndi.binary_dilation(in_clump, iterations=2))
    strongest = np.zeros(sizes.size)
    np.maximum.at(strongest, labels[in_clump], votes[in_clump])
    size = 2 * max(1, int(CLUMP_SEED_SPACING * radius)) + 1
    seeds = (
        in_clump
        & (votes == ndi.maximum_filter(votes, size=size))
        & (votes > CLUMP_SEED_MIN_VOTES * strongest[labels])
        & (distance > MARKER_HEIGHT * radius)
    )
    markers, n = ndi.label(seeds, structure=np.ones((3, 3), bool))
    if n < 2:
        return labels
    clump_of_seed = np.zeros(n + 1, np.intp)
    clump_of_seed[markers[seeds]] = labels[seeds]
    split = is_clump & (np.bincount(clump_of_seed[1:], minlength=sizes.size) >= 2)
    kept = split[clump_of_seed]
    kept[0] = False
    markers[~kept[markers]] = 0
    parts = watershed(-votes, markers, mask=split[labels] & ~_touching_another(labels))
    out = labels.copy()
    out[parts > 0] = parts[parts > 0] + sizes.size
    return out


def join_target_spots(labels: np.ndarray, smoothed: np.ndarray, thresholds: Thresholds, radius: float) -> np.ndarray:
    """Join each target cell's central spot to the rim around it: one cell, not a spot and a ring.

    In a target cell (codocyte) the pale band between the dark centre and the dark rim can
    be as pale as the slide's threshold, so the centre becomes a small segment of its own and
    the rim a ring or a "C" (open where it is faint). A small segment is a target spot when,
    looking out from its centre, a rim lies close in most directions, a pale band holding
    haemoglobin (its palest point denser than the bare slide) separates it from the spot in
    most of them, and the rim begins and ends at similar distances all round. The cell is the
    polygon through the rim's outer edge; where the rim runs into a neighbour, is missing or
    leaves the image, the polygon takes the median radius. It takes the background and the
    segments lying mostly inside it (the rim's pieces), never the bulk of a neighbour.
    """
    sizes = np.bincount(labels.ravel())
    smallest, largest = (share * np.pi * radius**2 for share in TARGET_SPOT_AREA)
    spots = np.flatnonzero((sizes >= smallest) & (sizes <= largest))
    spots = spots[spots > 0]
    if spots.size == 0:
        return labels
    rows, cols = cell_centres(labels)
    angles = np.linspace(0, 2 * np.pi, TARGET_RAYS, endpoint=False)
    steps = np.arange(0.5, 1.5 * radius, 0.5)
    reach = min(int(np.searchsorted(steps, TARGET_RIM_REACH * radius)), steps.size - 1)
    height, width = labels.shape
    out = labels
    for spot in spots:
        row, col = rows[spot - 1], cols[spot - 1]
        ray_rows = np.rint(row + np.sin(angles)[:, None] * steps).astype(np.intp)
        ray_cols = np.rint(col + np.cos(angles)[:, None] * steps).astype(np.intp)
        inside = (ray_rows >= 0) & (ray_rows < height) & (ray_cols >= 0) & (ray_cols < width)
        ray_rows, ray_cols = np.clip(ray_rows, 0, height - 1), np.clip(ray_cols, 0, width - 1)
        ray_density = np.where(inside, smoothed[ray_rows, ray_cols], -np.inf)  # beyond the image: slide
        known = inside[:, reach]  # not cut off by the image's edge
        outline = _target_outline(labels[ray_rows, ray_cols], ray_density, known, spot, steps, thresholds, radius)
        if outline is None:
            continue
        if out is labels:
            out = labels.copy()
        cell = polygon(row + np.sin(angles) * outline, col + np.cos(angles) * outline, labels.shape)
        covered = labels[cell]
        mostly_inside = np.bincount(covered, minlength=sizes.size) * 2 > sizes  # the rim's pieces
        mostly_inside[0] = True
        take = mostly_inside[covered] & (out[cell] == covered)  # not what an earlier spot took
        out[cell[0][take], cell[1][take]] = spot
    return out


def _target_outline(
    ray_labels: np.ndarray,
    ray_density: np.ndarray,
    known: np.ndarray,
    spot: int,
    steps: np.ndarray,
    thresholds: Thresholds,
    radius: float,
) -> np.ndarray | None:
    """Radius of the cell's outline along each ray from a spot's centre, or None if no rim surrounds it.

    Shares count only the ``known`` rays, those the image's edge does not cut before the rim.
    """
    n_known = int(known.sum())
    if n_known < known.size / 2:
        return None  # mostly beyond the image: too little to judge
    index = np.arange(steps.size)
    off_spot = ray_labels != spot
    leaves = np.argmax(off_spot, axis=1)  # first sample beyond the spot
    dense = (ray_density > thresholds.cell) & off_spot & (index >= leaves[:, None])
    inner = np.argmax(dense, axis=1)  # first sample of the rim
    rim = known & dense.any(axis=1) & (steps[inner] <= TARGET_RIM_REACH * radius)
    banded = rim & (inner > leaves + 1)  # a pale band between spot and rim
    after_rim = (ray_density <= thresholds.cell) & (index > inner[:, None])
    ends = rim & after_rim.any(axis=1)
    # A ray that ends has a rim: ``ends`` counts rays with a whole rim.
    if ends.sum() < TARGET_RIM_SHARE * n_known or banded.sum() < TARGET_BAND_SHARE * n_known:
        return None
    palest = [ray_density[k, leaves[k] : inner[k]].min() for k in np.flatnonzero(banded)]
    if np.median(palest) <= thresholds.slide:
        return None  # bare slide between a small cell and its neighbours, not a pale band
    outer = steps[np.argmax(after_rim, axis=1)]
    if _spread(steps[inner[banded]]) > TARGET_RIM_SPREAD * radius or _spread(outer[ends]) > TARGET_EDGE_SPREAD * radius:
        return None  # not one ring: neighbouring cells around a small one
    typical = float(np.median(outer[ends]))
    return np.where(ends & (outer <= 1.25 * typical), outer, typical)  # further: into a neighbour


def fill_stained_bays(labels: np.ndarray, smoothed: np.ndarray, thresholds: Thresholds, radius: float) -> np.ndarray:
    """Give a cell the stained background inside its convex hull: a pale cell drawn as a "C".

    Where only part of a pale (hypochromic, target) cell's rim passes the threshold, the cell
    becomes a crescent, a "C" or a spiral, and its pale inside is left as background open to
    the slide, so no hole fill reaches it. That inside holds haemoglobin: three quarters of it
    (its 25th percentile) are denser than the bare slide. The notch of a bite or helmet cell,
    or the slide between two cells, is bare, so those keep their outline. Only cell-sized
    segments with a sizeable bay are looked at, and their hull (of pixel centres) must stay
    about one cell.
    """
    cell_area = np.pi * radius**2
    sizes = np.bincount(labels.ravel())
    smallest, largest = (share * cell_area for share in BAY_CELL_AREA)
    candidates = np.flatnonzero((sizes >= smallest) & (sizes <= largest))
    boxes = ndi.find_objects(labels)
    out = labels
    for cell in candidates[candidates > 0]:
        box = boxes[cell - 1]
        if sizes[cell] > BAY_BOX_FILL * (box[0].stop - box[0].start) * (box[1].stop - box[1].start):
            continue  # round or nearly: no room for a bay worth the hull
        inside = labels[box] == cell
        corners = convex_corners(inside)
        if corners is None:
            continue
        hull_area = hull_pixels(corners)
        if hull_area > BAY_MAX_HULL * cell_area or hull_area - sizes[cell] < BAY_MIN_AREA * cell_area:
            continue
        hull = np.zeros_like(inside)
        hull[polygon(corners[:, 0], corners[:, 1], hull.shape)] = True
        bay = hull & (out[box] == 0)  # not a bay already given to a neighbour
        pieces, _ = ndi.label(bay)
        bay = np.isin(pieces, pieces[ndi.binary_dilation(inside) & bay])  # touching the cell, not beyond a neighbour
        if bay.sum() < BAY_MIN_AREA * cell_area:
            continue
        if np.percentile(smoothed[box][bay], BAY_PALE_PERCENTILE) <= thresholds.slide:
            continue
        if out is labels:
            out = labels.copy()
        out[box][bay] = cell
    return out


def rejoin_pieces(labels: np.ndarray, cell_area: float) -> np.ndarray:
    """Give a piece cut off a cell back to it: a segment of under ``PIECE_AREA`` cells whose
    outline lies largely along one neighbour, when the two together are no larger than a cell
    and as convex as one: the clump split's straight cuts through an oval or a pale cell. An
    isolated small cell (a microspherocyte) has no such neighbour, and two cells side by side
    leave a waist in their union (two small ones pressed flat together may not)."""
    sizes = np.bincount(labels.ravel())
    pieces = np.flatnonzero(sizes < PIECE_AREA * cell_area)
    pieces = pieces[(pieces > 0) & (sizes[pieces] > 0)]
    if not pieces.size:
        return labels
    boxes = ndi.find_objects(labels)
    out = labels.copy()
    height, width = labels.shape
    for piece in pieces:
        rows, cols = boxes[piece - 1]
        if rows.start == 0 or cols.start == 0 or rows.stop == height or cols.stop == width:
            continue  # the rest of a cell the border cuts is beyond it, not beside it
        box = padded(boxes[piece - 1], 2)
        window = out[box]
        mine = window == piece
        ring = ndi.binary_dilation(mine) & ~mine
        around = window[ring]
        neighbours = np.bincount(around[around > 0])
        if not neighbours.size:
            continue
        cell = int(neighbours.argmax())
        if neighbours[cell] < PIECE_CONTACT * ring.sum() or sizes[cell] + sizes[piece] > PIECE_UNION_AREA * cell_area:
            continue
        joined = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(boxes[piece - 1], boxes[cell - 1]))
        union = np.isin(out[joined], (piece, cell))
        corners = convex_corners(union)
        if corners is not None and union.sum() >= PIECE_SOLIDITY * hull_pixels(corners):
            out[joined][union] = cell
            sizes[cell] += sizes[piece]
            boxes[cell - 1] = joined
    return out


def _spread(values: np.ndarray) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def _touching_another(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour in a different (non-background) segment."""
    touching = np.zeros(labels.shape, bool)
    for a, b, ta, tb in (
        (labels[:, 1:], labels[:, :-1], touching[:, 1:], touching[:, :-1]),
        (labels[1:, :], labels[:-1, :], touching[1:, :], touching[:-1, :]),
    ):
        differ = (a != b) & (a > 0) & (b > 0)
        ta |= differ
        tb |= differ
    return touching


def drop_nuclei(
    labels: np.ndarray, red_density: np.ndarray, green_density: np.ndarray, sampled_labels: np.ndarray
) -> np.ndarray:
    """Remove segments that absorb red far more than the smear's red cells do.

    White-cell nuclei, platelet clumps and stain precipitate are blue-violet: they absorb red
    light almost as much as green, while haemoglobin absorbs mostly green. The comparison is
    against the median cell of this smear, so lilac and grey stains are judged fairly, and a
    segment goes only when most of its pixels are violet: a red cell under a hair stays.
    The densities may be a subsample of the image; ``sampled_labels`` are the labels there.
    """
    n = int(labels.max()) + 1
    if n < 4:
        return labels
    flat = sampled_labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n), 1)
    red = np.bincount(flat, red_density.ravel(), n) / count
    green = np.bincount(flat, green_density.ravel(), n) / count
    ratio = red / np.maximum(green, 1e-6)
    typical_ratio, typical_green = np.median(ratio[1:]), np.median(green[1:])
    spread = np.median(np.abs(ratio[1:] - typical_ratio))
    limit = typical_ratio + max(NUCLEUS_RATIO_EXCESS, 6 * spread)
    violet_pixels = (red_density > limit * green_density) & (green_density > NUCLEUS_MIN_DENSITY * typical_green)
    violet_share = np.bincount(flat, violet_pixels.ravel(), n) / count
    keep = violet_share < 0.5
    return labels if keep[1:].all() else keep_segments(labels, keep)


def _inside_open_rings(mask: np.ndarray, gap: int, max_area: float) -> np.ndarray:
    """The pale insides of outlines broken by small gaps (hypochromic and target cells).

    The outline is closed morphologically only to find what it encloses; the bridge pixels
    themselves are not added, so neighbouring cells do not fuse.
    """
    closed = ndi.binary_erosion(ndi.binary_dilation(mask, iterations=gap), iterations=gap, border_value=1)
    return fill_holes(closed, max_area) & ~closed


def _around_faint_pale_centres(
    smoothed: np.ndarray, thresholds: Thresholds, mask: np.ndarray, cell_area: float
) -> np.ndarray:
    """Pale centres the cell mask missed, with the faint rims around them.

    In a pale smear the rim of a hypochromic or target cell is only partly above the cell
    threshold, so its centre is never enclosed and the cell ends up as a crescent, or as
    nothing. Above the faint threshold the rim closes. An enclosed hole counts as a pale
    centre when it is compact (a target cell's central spot included) and denser than the
    bare slide, since it still holds some haemoglobin; the gaps between touching cells are
    bare slide or slits, and filling them would fuse the cells. Only the faint rim within a
    cell radius of an accepted centre, and touching it, joins, so the result stays local
    (tiles agree).
    """
    faint = smoothed > thresholds.faint
    pale = fill_holes(faint, MAX_PALLOR_AREA * cell_area) & ~faint & ~mask
    holes, n_holes = ndi.label(pale)
    area = np.bincount(holes.ravel(), minlength=n_holes + 1)
    reach = ceil(FAINT_RIM_REACH * np.sqrt(cell_area / np.pi))
    added = np.zeros_like(pale)
    boxes = ndi.find_objects(holes)
    for hole in np.flatnonzero(area[1:] >= MIN_PALLOR_AREA * cell_area) + 1:
        box = padded(boxes[hole - 1], reach)
        hole_pixels = holes[box] == hole
        if np.median(smoothed[box][hole_pixels]) <= thresholds.slide:
            continue
        centre = fill_holes(hole_pixels)
        # The distance is to the nearest outside pixel's centre: half a pixel beyond the edge.
        inner_radius = max(float(distance_to_background(centre).max()) - 0.5, 0.5)
        if centre.sum() > PALLOR_ROUNDNESS * np.pi * inner_radius**2:
            continue
        near = centre | (faint[box] & (distance_to_background(~centre) <= reach))
        pieces, _ = ndi.label(near)
        added[box] |= fill_holes(np.isin(pieces, pieces[centre]))  # the rim touching the centre, not stray blobs
    return added


def fill_enclosed_gaps(
    labels: np.ndarray,
    max_area: float,
    *,
    stained_density: np.ndarray | None = None,
    slide: float = 0.0,
    stained_max_area: float = 0.0,
) -> np.ndarray:
    """Give each background gap smaller than ``max_area`` that only one cell surrounds to that cell.

    Such pinholes appear where a sliver inside a cell was dropped (clump-split borders, tiny
    pieces) or an outline was trimmed; left open they add their edge to the cell's perimeter.
    With ``stained_density``, gaps up to ``stained_max_area`` are filled too when their median
    density is above ``slide``: the pale inside of a large thin-rimmed hypochromic or target
    cell holds some haemoglobin, while a gap that a clump closes around is bare slide. So are
    gaps open to the image border that lie inside the cell's convex hull: the pale centre of a
    cell that the border cuts, whose rim is a "U" around it (else a "C"-shaped fragment, like a
    schistocyte), not the slide in a corner beside a cell.
    """
    gaps, area, open_ = background_gaps(labels == 0)
    if stained_density is None:
        small = (area < max_area) & ~open_
    else:
        small = area < max(max_area, stained_max_area)
    if not small.any():
        return labels
    labels = labels.copy()
    boxes = ndi.find_objects(gaps)
    cell_boxes = ndi.find_objects(labels) if open_[small].any() else []
    for gap in np.flatnonzero(small):  # few
        box = padded(boxes[gap - 1], 1)
        inside = gaps[box] == gap
        if (area[gap] >= max_area or open_[gap]) and not np.median(stained_density[box][inside]) > slide:
            continue
        around = np.unique(labels[box][ndi.binary_dilation(inside) & ~inside])
        if around.size != 1:
            continue
        if open_[gap] and not _wraps(labels, around[0], gaps, gap, (cell_boxes[around[0] - 1], boxes[gap - 1])):
            continue
        labels[box][inside] = around[0]
    return labels


def _wraps(labels: np.ndarray, cell: int, gaps: np.ndarray, gap: int, boxes) -> bool:
    """Whether (nearly) all of ``gap`` lies in the convex hull of ``cell``, its edge included."""
    box = tuple(slice(min(a.start for a in sides), max(a.stop for a in sides)) for sides in zip(*boxes))
    corners = convex_corners(labels[box] == cell)
    if corners is None:
        return False
    # A pixel is in the hull when it lies on the same side of every edge (or on one).
    edges = np.roll(corners, -1, axis=0) - corners
    offsets = np.argwhere(gaps[box] == gap)[:, None, :] - corners[None]
    turns = edges[None, :, 0] * offsets[..., 1] - edges[None, :, 1] * offsets[..., 0]
    return float(((turns >= 0).all(axis=1) | (turns <= 0).all(axis=1)).mean()) >= GAP_IN_HULL


def _drop_thin(labels: np.ndarray, distance: np.ndarray, min_half_width: float) -> np.ndarray:
    """Drop segments nowhere thicker than a line: scale bars, arrows, hairs, fibres."""
    thick = np.bincount(labels[distance >= min_half_width], minlength=int(labels.max()) + 1)
    return keep_segments(labels, thick > 0)


def _seed_every_component(markers: np.ndarray, components: np.ndarray, n: int) -> np.ndarray:
    """A component with no distance maximum high enough (a thin or open outline) seeds itself."""
    seeded = np.zeros(n + 1, bool)
    seeded[components[markers > 0]] = True
    seeded[0] = True
    if seeded.all():
        return markers
    own_id = np.zeros(n + 1, markers.dtype)
    own_id[~seeded] = int(markers.max()) + 1 + np.arange(int((~seeded).sum()))
    return np.maximum(markers, own_id[components])


def _flood(distance: np.ndarray, markers: np.ndarray, components: np.ndarray, n: int) -> np.ndarray:
    """Watershed of ``-distance`` from ``markers`` inside the components (each holds a seed).

    A component with a single seed is that seed's cell as it stands: only components with
    several seeds go through the (costly) watershed, often less than half of the foreground.
    """
    seeded = markers > 0
    ids, owner = markers[seeded], components[seeded]
    lowest = np.full(n + 1, np.iinfo(np.int32).max, np.int64)
    highest = np.zeros(n + 1, np.int64)
    np.minimum.at(lowest, owner, ids)
    np.maximum.at(highest, owner, ids)
    shared = lowest < highest
    shared[0] = False
    single_id = np.where(shared, 0, highest).astype(np.int32)
    single_id[0] = 0
    labels = single_id[components]
    if shared.any():
        crowded = shared[components]
        flooded = watershed(-distance, np.where(crowded, markers, 0), mask=crowded)
        labels[crowded] = flooded[crowded]
    return labels


def _seeds(distance: np.ndarray, radius: float) -> np.ndarray:
    """One seed per plateau of distance maxima that are far enough from the cell edge."""
    size = 2 * max(1, int(MARKER_SPACING * radius)) + 1
    peaks = (distance == ndi.maximum_filter(distance, size=size)) & (distance > MARKER_HEIGHT * radius)
    markers, _ = ndi.label(peaks, structure=np.ones((3, 3), bool))
    return markers


def _drop_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    return keep_segments(labels, np.bincount(labels.ravel()) >= min_area)


