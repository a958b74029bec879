"""napari-reddino: red-blood-cell analysis in napari with the RedDino foundation model."""

from .cell_lookup import cells_at_points
from .image_input import ImageInputError
from .measurements import measure_cells
from .segmentation import estimate_cell_diameter, iter_segment_cells, segment_cells

__version__ = "0.1.0"
__all__ = [
    "ImageInputError",
    "cells_at_points",
    "estimate_cell_diameter",
    "iter_segment_cells",
    "measure_cells",
    "segment_cells",
]
