"""napari-reddino: red-blood-cell analysis in napari with the RedDino foundation model."""

from importlib import import_module

from .cell_embeddings import embeddings_of
from .cell_lookup import cells_at_points
from .image_input import ImageInputError
from .measurements import measure_cells
from .segmentation import estimate_cell_diameter, iter_segment_cells, segment_cells

__version__ = "0.1.0"

# Imported on first use: they pull in torch, which segmentation alone does not need.
_LAZY = {
    "Embedder": "embedding",
    "load_embedder": "embedding",
    "list_devices": "embedding",
    "cell_crops": "crops",
}

__all__ = [
    "ImageInputError",
    "cells_at_points",
    "embeddings_of",
    "estimate_cell_diameter",
    "iter_segment_cells",
    "measure_cells",
    "segment_cells",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
