"""The per-cell table of one or more cells layers: what the CSV export writes and the smear
summary counts.

Columns: ``layer`` (the cells layer's name: with ``label`` the key of a cell, also when two
layers segment one smear), ``image``, ``label``, then the layer's feature columns in their order (napari's
``index``, a copy of ``label``, is left out), the analysis columns of
:data:`ANALYSIS_COLUMNS` in that order (empty where a layer lacks them, so scripts can rely on
them), the head's ``p_<class>`` probabilities (only when a head has predicted; a layer's own
``p_value`` stays with its columns), and ``model_id``
(empty for cells that were not embedded). Layers with different columns are stacked on the
union of their columns, in order of first appearance; the order is the same whether a layer
was mapped before or after a head predicted.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .cell_embeddings import embeddings_of
from .measurements import MEASUREMENT_COLUMNS

SOURCE_PATH = "source_path"  # metadata and column: the smear's file (reddino-analyse), its name alone being
# no key: "26" in one run is "day1/26.jpg" in another that also holds a day2/26.jpg
ANALYSIS_COLUMNS = ("umap_x", "umap_y", "manual_label", "predicted_class", "prediction_probability")
PREDICTED_CLASSES = "predicted_classes"  # cells layer metadata: the classes of the head that predicted its cells
PREDICTED_BY = "predicted_by"  # cells layer metadata: a token of the Cell map panel's head that predicted its cells


def as_layers(cells) -> list:
    """``cells`` as a list of layers: one layer (anything with ``features``) or an iterable of them."""
    layers = [cells] if hasattr(cells, "features") else list(cells) if hasattr(cells, "__iter__") else [cells]
    if isinstance(cells, str | pd.DataFrame | np.ndarray) or not all(hasattr(layer, "features") for layer in layers):
        raise TypeError(f"cells must be a cells layer (a napari Labels layer with a cell table) or a list of them, "
                        f"not a {type(cells).__name__} (a table from measure_cells goes on a layer first: "
                        "napari.layers.Labels(labels, features=table, name=...)).")
    return layers


SOURCE_DIGEST = "source_image_digest"  # metadata: digest of the pixels the cells were segmented from


def image_name(layer) -> str:
    """The smear a cells layer belongs to: ``metadata["source_image"]``, else the layer's name less " cells"."""
    name = layer.metadata.get("source_image")
    return str(name) if name else str(layer.name).removesuffix(" cells")


def class_names(table: pd.DataFrame, column: str) -> np.ndarray:
    """A class column as stripped strings, "" where empty, blank (a label of spaces is no
    label) or missing; categorical columns too."""
    if column not in table:
        return np.full(len(table), "", dtype=object)
    return table[column].astype(object).fillna("").astype(str).str.strip().to_numpy()


def whole_cells(table: pd.DataFrame) -> np.ndarray:
    """True for each cell not cut by the image's border or the field's edge. A table without
    ``touches_border``, or a cell with no value in it (a CSV's empty field), counts as whole;
    text read back from a CSV or a spreadsheet ("FALSE", "true", "0") counts as what it says."""
    if "touches_border" not in table:
        return np.ones(len(table), dtype=bool)
    return ~np.array([_is_cut(value) for value in table["touches_border"]], dtype=bool)


def _is_cut(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(pd.notna(value) and value)


def clear_predictions(layer, ids) -> int:
    """Take the head's prediction (class, probability, ``p_<class>``) off the cells ``ids`` of
    ``layer``, whose embeddings changed since; returns how many cells had one."""
    table = pd.DataFrame(layer.features)
    if "predicted_class" not in table or "label" not in table:
        return 0
    predicted = class_names(table, "predicted_class")
    rows = table["label"].isin(np.asarray(ids)).to_numpy() & (predicted != "")
    if not rows.any():
        return 0
    table["predicted_class"] = np.where(rows, "", predicted)
    probabilities = ["prediction_probability",
                     *(f"p_{name}" for name in layer.metadata.get(PREDICTED_CLASSES, []))]
    for column in (c for c in probabilities if c in table):
        table[column] = pd.to_numeric(table[column], errors="coerce").where(~rows)
    layer.features = table
    return int(rows.sum())


def _probability_columns(layer, features: pd.DataFrame) -> list[str]:
    """The head's ``p_<class>`` columns of a layer: of the classes its metadata names when a head
    predicted there (a lab's own ``p_value`` is not one); without that record, every ``p_``
    column of a layer with predictions (a table a script gave them), none of one without."""
    classes = layer.metadata.get(PREDICTED_CLASSES)
    if classes is not None:
        return [f"p_{name}" for name in classes if f"p_{name}" in features]
    return [column for column in features.columns if column.startswith("p_")] if "predicted_class" in features else []


def cells_table(layers: Sequence) -> pd.DataFrame:
    """The rows the CSV holds, one per cell of each layer, in the layers' feature order."""
    parts, probabilities = [], []
    for layer in layers:
        features = pd.DataFrame(layer.features)
        if "label" not in features:
            raise ValueError(f"{layer.name!r} has no cell table with a label column; segment its image first.")
        if "index" in features and features["index"].equals(features["label"]):
            features = features.drop(columns="index")
        record = embeddings_of(layer)
        features = features.drop(columns=["layer", "image", "model_id"], errors="ignore")
        features.insert(0, "layer", str(layer.name))
        features.insert(1, "image", image_name(layer))
        if SOURCE_PATH in layer.metadata:  # reddino-analyse's smears: the file
            features = features.drop(columns=SOURCE_PATH, errors="ignore")
            features.insert(2, SOURCE_PATH, str(layer.metadata[SOURCE_PATH]))
        features["model_id"] = np.where(features["label"].isin(record[0]), record[2], "") if record else ""
        parts.append(features)
        probabilities += _probability_columns(layer, features)
    table = pd.concat(parts, ignore_index=True, sort=False)
    for column in ANALYSIS_COLUMNS:
        if column not in table:
            table[column] = "" if column.endswith(("label", "class")) else np.nan
    probabilities = list(dict.fromkeys(probabilities))
    placed = {"layer", "image", SOURCE_PATH, "label", "model_id", *ANALYSIS_COLUMNS, *probabilities}
    rank = {column: position for position, column in enumerate(MEASUREMENT_COLUMNS)}
    own = sorted((c for c in table.columns if c not in placed), key=lambda c: rank.get(c, len(rank)))  # stable
    source = [SOURCE_PATH] if SOURCE_PATH in table else []
    return table[["layer", "image", *source, "label", *own, *ANALYSIS_COLUMNS, *probabilities, "model_id"]]
