"""napari-reddino: red-blood-cell analysis in napari with the RedDino foundation model."""

from importlib import import_module

from .cell_embeddings import embeddings_of
from .cell_export import export_cells_csv
from .cell_lookup import cells_at_points
from .image_input import ImageInputError
from .label_import import import_manual_labels
from .measurements import measure_cells
from .segmentation import estimate_cell_diameter, iter_segment_cells, segment_cells
from .smear_summary import summarise_smears

__version__ = "0.1.0"

# Imported on first use: they pull in torch or umap, which segmentation alone does not need.
_LAZY = {
    "Embedder": "embedding",
    "load_embedder": "embedding",
    "list_devices": "embedding",
    "cell_crops": "crops",
    "fit_umap": "umap_layout",
    "CellClassifier": "cell_classifier",
}

__all__ = [  # noqa: RUF022  (eager names, then the lazy ones)
    "ImageInputError",
    "cells_at_points",
    "embeddings_of",
    "estimate_cell_diameter",
    "export_cells_csv",
    "import_manual_labels",
    "iter_segment_cells",
    "measure_cells",
    "segment_cells",
    "summarise_smears",
    "Embedder",
    "load_embedder",
    "list_devices",
    "cell_crops",
    "fit_umap",
    "CellClassifier",
]
assert set(_LAZY) <= set(__all__)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
