"""napari-reddino: red-blood-cell analysis in napari with the RedDino foundation model."""

from importlib import import_module

__version__ = "0.1.0"

# Each imported on first use, so that what needs one part of the package (reddino-train's command
# line, a widget) does not wait for the others: torch and umap above all, but pandas and
# scipy.stats too (a second between them).
_LAZY = {
    "ImageInputError": "image_input",
    "cells_at_points": "cell_lookup",
    "embeddings_of": "cell_embeddings",
    "estimate_cell_diameter": "segmentation",
    "export_cells_csv": "cell_export",
    "import_manual_labels": "label_import",
    "iter_segment_cells": "segmentation",
    "measure_cells": "measurements",
    "segment_cells": "segmentation",
    "summarise_smears": "smear_summary",
    "Embedder": "embedding",
    "load_embedder": "embedding",
    "list_devices": "embedding",
    "cell_crops": "crops",
    "fit_umap": "umap_layout",
    "CellClassifier": "cell_classifier",
}

__all__ = [  # noqa: RUF022  (those without torch or umap first)
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
assert set(_LAZY) == set(__all__)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
