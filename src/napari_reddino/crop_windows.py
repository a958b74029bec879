"""The crop settings (mode, scale, margin) and where each cell's square window lies: the
geometry of the model's crops, without torch.

A window is centred on the cell's bounding box, ``1 + 2 * margin`` times a side that depends
on the crop scale (see :mod:`.crops` for what the scales are for). The Cell map's gallery
cuts its thumbnails from the same windows, so a cell looks there as the model saw it.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

CropMode = Literal["context", "masked"]
CROP_MODES: tuple[CropMode, ...] = ("context", "masked")
# Masked crops classified Chula cells better than context crops for every model that runs here
# (linear probe and kNN, split by image; benchmarks/RESULTS.md, "Crop mode").
DEFAULT_CROP_MODE: CropMode = "masked"
CropScale = Literal["cell", "smear"]
CROP_SCALES: tuple[CropScale, ...] = ("cell", "smear")
# Smear-scale crops classified Chula cells better than cell-scale ones, at random init and
# pretrained on each (benchmarks/RESULTS.md, "Crop scale").
DEFAULT_CROP_SCALE: CropScale = "smear"
# Cells up to this many times the median size show their size in a "smear"-scale crop.
SMEAR_SCALE_CELLS = 1.25
DEFAULT_MARGIN = 0.25
MAX_MARGIN = 4.0  # a window 9 times the cell's side: beyond it a crop is mostly its neighbours
_BAND_PIXELS = 2**20  # fewer pixels per thread gain less than starting it costs
_PIXELS_PER_LISTED_ID = 100  # a band lists every id (30 ns each) and reads its pixels (3 ns each)


class CropInputError(ValueError):
    """The labels do not fit the image, or a crop setting is invalid."""


@dataclass(frozen=True)
class CellWindows:
    """Label ids in ascending order and their square windows as (x0, y0, x1, y1) pixel edges."""

    ids: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def of(self, ids) -> CellWindows:
        """The windows of the cells ``ids`` (in ascending order, each once), sized as among all cells."""
        asked = np.asarray(ids)
        if asked.size and not np.issubdtype(asked.dtype, np.integer):
            raise CropInputError(f"ids must be whole label ids, not {asked.dtype} values.")
        wanted = np.unique(asked.astype(np.int64))
        missing = np.setdiff1d(wanted, self.ids)
        if len(missing):
            shown = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CropInputError(f"No cell has label {shown} ({len(missing)} of the {len(wanted)} asked for).")
        return CellWindows(wanted, self.boxes[np.searchsorted(self.ids, wanted)])


def cell_windows(
    labels: np.ndarray, margin: float = DEFAULT_MARGIN, scale: CropScale = DEFAULT_CROP_SCALE
) -> CellWindows:
    """One square window per label, centred on its bounding box (pixel i spans [i, i + 1))."""
    check_crop_settings(margin, scale)
    ids, bounds = bounding_boxes(labels)
    return CellWindows(ids, square_windows(bounds, margin, scale))


def check_crop_settings(margin: float, scale: CropScale) -> None:
    """Raise :class:`CropInputError` unless ``margin`` and ``scale`` are ones :func:`cell_windows` takes."""
    if refusal := margin_refusal(margin):
        shown = margin if isinstance(margin, int | float) and not isinstance(margin, bool) else repr(margin)
        raise CropInputError(f"margin {shown}: {refusal}.")
    if scale not in CROP_SCALES:
        raise CropInputError(f"Unknown crop scale {scale!r}; use one of {', '.join(CROP_SCALES)}.")


def chosen_crops(mode: CropMode | None = None, scale: CropScale | None = None, margin: float | None = None, *,
                 trained: dict | None = None) -> dict:
    """Crop mode, scale and margin, as :meth:`~napari_reddino.Embedder.embed` takes them: each as
    given, else as the model's training cells were cut (``trained``, where its config records
    them: :func:`~napari_reddino.models.trained_crops`), else the plugin's default."""
    fallback = trained or {"mode": DEFAULT_CROP_MODE, "scale": DEFAULT_CROP_SCALE, "margin": DEFAULT_MARGIN}
    return {"mode": fallback["mode"] if mode is None else mode, "scale": fallback["scale"] if scale is None else scale,
            "margin": fallback["margin"] if margin is None else margin}


def margin_refusal(margin: object) -> str | None:
    """Why ``margin`` is no crop margin, in words for any message (the API's, a command's option's,
    a file's); None where it is one: a real number from 0 to :data:`MAX_MARGIN` (a 0-d array too,
    but no flag, text or array of several)."""
    number = not isinstance(margin, bool | np.bool_ | str | bytes) and np.ndim(margin) == 0
    try:
        value = float(margin) if number else math.nan
    except (TypeError, ValueError, OverflowError):  # the last: an integer past float's range
        value = math.nan
    if 0 <= value <= MAX_MARGIN:
        return None
    return f"give a fraction of the cell's box on each side, from 0 to {MAX_MARGIN:g} (0.25: a quarter)"


def valid_crops(crops) -> dict | None:
    """``crops`` read from a file, as a mode, scale and margin the crops take (the margin a float);
    None where it is not one."""
    if not isinstance(crops, dict) or crops.keys() != {"mode", "scale", "margin"}:
        return None
    margin = crops["margin"]
    if crops["mode"] not in CROP_MODES or crops["scale"] not in CROP_SCALES or margin_refusal(margin):
        return None
    return {"mode": crops["mode"], "scale": crops["scale"], "margin": float(margin)}


def bounding_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label ids present (int64, ascending) and their boxes (x0, y0, x1, y1, max exclusive).

    ``find_objects`` runs on bands of rows in threads (it lets go of the GIL): an 11-megapixel
    label image of 4,000 cells took 30 ms in one and 18 ms in two here; a GPU's set-up waits
    for it. Each band lists every id up to the largest, so sparse ids keep to one band.
    """
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    if not top:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    count = min(_threads(), labels.shape[0], labels.size // _BAND_PIXELS, labels.size // (_PIXELS_PER_LISTED_ID * top))
    bands = np.array_split(np.arange(labels.shape[0]), max(count, 1))
    with ThreadPoolExecutor(len(bands), thread_name_prefix="reddino-boxes") as pool:
        found = pool.map(lambda rows: ndimage.find_objects(labels[rows[0] : rows[-1] + 1], top), bands)
        parts = [_listed_boxes(slices, rows[0]) for rows, slices in zip(bands, found, strict=True)]
    ids, edges = (np.concatenate(column) for column in zip(*parts, strict=True))
    if len(bands) > 1:  # a cell across bands has a box in each: take their union
        order = np.argsort(ids, kind="stable")
        ids, edges = ids[order], edges[order]
        firsts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ids = ids[firsts]
        edges = np.hstack([np.minimum.reduceat(edges[:, :2], firsts), np.maximum.reduceat(edges[:, 2:], firsts)])
    return ids, edges.astype(np.float64)


def _listed_boxes(slices: list, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and (x0, y0, x1, y1) boxes of ``find_objects``'s list of one band starting at ``row_offset``."""
    ids = np.array([i + 1 for i, box in enumerate(slices) if box is not None], dtype=np.int64)
    edges = np.array([(box[1].start, box[0].start, box[1].stop, box[0].stop) for box in slices if box is not None],
                     dtype=np.int64).reshape(-1, 4)
    return ids, edges + [0, row_offset, 0, row_offset]


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def square_windows(bounds: np.ndarray, margin: float = DEFAULT_MARGIN, scale: CropScale = DEFAULT_CROP_SCALE
                   ) -> np.ndarray:
    """(n, 4) windows (x0, y0, x1, y1) around the (n, 4) boxes ``bounds`` (x0, y0, x1, y1,
    max exclusive) of one smear's cells: at ``"smear"`` scale sized among these cells."""
    bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    centre_x = (bounds[:, 0] + bounds[:, 2]) / 2
    centre_y = (bounds[:, 1] + bounds[:, 3]) / 2
    sides = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
    if scale == "smear" and len(sides):
        sides = np.maximum(sides, SMEAR_SCALE_CELLS * np.median(sides))
    half = sides * (0.5 + margin)
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1)
