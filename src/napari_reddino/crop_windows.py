"""Where each cell's square window lies: the geometry of the model's crops, without torch.

A window is centred on the cell's bounding box, ``1 + 2 * margin`` times a side that depends
on the crop scale (see :mod:`.crops` for what the scales are for). The Cell map's gallery
cuts its thumbnails from the same windows, so a cell looks there as the model saw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

CropScale = Literal["cell", "smear"]
CROP_SCALES: tuple[CropScale, ...] = ("cell", "smear")
# Smear-scale crops classified Chula cells better than cell-scale ones, at random init and
# pretrained on each (benchmarks/RESULTS.md, "Crop scale").
DEFAULT_CROP_SCALE: CropScale = "smear"
# Cells up to this many times the median size show their size in a "smear"-scale crop.
SMEAR_SCALE_CELLS = 1.25
DEFAULT_MARGIN = 0.25
MAX_MARGIN = 4.0  # a window 9 times the cell's side: beyond it a crop is mostly its neighbours


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
    if not 0 <= margin <= MAX_MARGIN:
        raise CropInputError(f"margin must be from 0 to {MAX_MARGIN:g}, a fraction of the cell's size on each side "
                             f"(0.25: a quarter), not {margin}.")
    if scale not in CROP_SCALES:
        raise CropInputError(f"Unknown crop scale {scale!r}; use one of {', '.join(CROP_SCALES)}.")
    slices = ndimage.find_objects(labels) if labels.size else []
    ids = np.array([i + 1 for i, found in enumerate(slices) if found is not None], dtype=np.int64)
    bounds = np.array(
        [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices if s is not None], dtype=np.float64
    ).reshape(-1, 4)
    return CellWindows(ids, square_windows(bounds, margin, scale))


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
