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

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``. Also how a
layer's own table meets fresh measurements of its cells (Embed cells measures cells painted
since they were measured).
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


def with_own_columns(table: pd.DataFrame, old: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The fresh measurements, with the columns of the layer's own table that they lack joined by
    label id (its ``label`` column, else napari's ``index``); a table without ids is replaced.

    An id whose measured cell was centred outside the box of its cell now (grown by a quarter on
    each side: a cell half erased stays itself) is not joined: napari gives a newly painted cell
    the id after the largest, which an erased cell may have had, and its label would go to the
    new cell. Also returns how many manual labels were not carried: their cells erased, merged
    into others, or so given away."""
    key = next((column for column in ("label", "index") if column in old), None)
    if key is None:
        return table, 0
    own = [c for c in old.columns if c not in table.columns]
    ids = pd.to_numeric(old[key], errors="coerce").to_numpy()  # a table read from a CSV may hold them as text
    rows = np.clip(np.searchsorted(table["label"].to_numpy(), ids), 0, max(len(table) - 1, 0))
    same = np.zeros(len(old), bool) if table.empty else table["label"].to_numpy()[rows] == ids
    if {"centroid_y", "centroid_x"} <= set(old) and not table.empty:
        for axis in ("y", "x"):
            centre = pd.to_numeric(old[f"centroid_{axis}"], errors="coerce").to_numpy()
            low, high = (table[f"bbox_{end}_{axis}"].to_numpy()[rows] for end in ("min", "max"))
            reach = (high - low) / 4 + 0.5
            same &= ~((centre < low - reach) | (centre > high - 1 + reach))  # unknown places count as the same
    lost = int(((class_names(old, "manual_label") != "") & ~same).sum())
    return table.merge(old.loc[same, own].assign(label=ids[same]), on="label", how="left"), lost


def remeasured(table: pd.DataFrame, old: pd.DataFrame) -> np.ndarray:
    """The label ids of ``table`` whose measurements differ from those ``old`` holds for them (a
    ring filled in, an edge mended within the cell's box): a crop may not change with them, but a
    head that reads measurements predicts from them too."""
    if "label" not in old:
        return np.zeros(0, np.int64)
    # in pixels: the µm columns follow from them and the pixel size, which alone changes no cell
    # and numbers: a table edited in a spreadsheet may hold them as text, which would differ everywhere
    columns = [column for column in MEASUREMENT_COLUMNS if column in table and column in old
               and column not in ("label", "index") and not column.endswith(("_um", "_um2"))
               and pd.api.types.is_numeric_dtype(old[column])]
    ids = pd.to_numeric(old["label"], errors="coerce")  # a table read from a CSV may hold them as text
    before = old.assign(label=ids).drop_duplicates("label").set_index("label").reindex(table["label"])
    differ = np.zeros(len(table), bool)
    for column in columns:
        new, was = table[column].to_numpy(float), pd.to_numeric(before[column], errors="coerce").to_numpy(float)
        differ |= ~np.isclose(new, was, rtol=1e-9, atol=0, equal_nan=True)
    return table["label"].to_numpy()[differ]
