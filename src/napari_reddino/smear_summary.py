"""One row per smear: how many red cells, how large and how varied, and what share of them
falls in each morphology class (the numbers a smear report grades).

Cells touching the image border are counted in ``cells`` and left out of everything else, as
a person counting at the microscope leaves out cut cells: they look smaller and misshapen. A
cell's class is its manual label where it has one, else the head's prediction; percentages are
of the whole cells that have a class.

Columns: ``image``, ``cells``, ``whole_cells``, ``diameter_mean_um``, ``diameter_sd_um`` (empty
without a pixel size), ``diameter_mean_px``, ``diameter_sd_px``, ``diameter_cv_pct`` (the
spread of sizes, anisocytosis; the same in px and µm), ``central_pallor_median``, ``labelled``
(manual labels), ``classified``, then ``n_<class>`` and ``pct_<class>`` for every class, and
``model_id``. No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .cell_table import cells_table, image_name


def summarise_smears(cells, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cells layer of ``cells`` (a layer or a list of them).

    ``classes`` orders the class columns and keeps classes no cell has (0 %, which a report
    states too); classes the cells carry beyond them follow, by name. Without it: the classes
    the cells carry, by name.
    """
    layers = [cells] if hasattr(cells, "features") else list(cells)
    tables = [cells_table([layer]) for layer in layers]
    whole = [table[~table["touches_border"].astype(bool)] if "touches_border" in table else table
             for table in tables]
    cell_classes = [_class_of_each_cell(table) for table in whole]
    found = sorted(set().union(*(set(names) for names in cell_classes)) - {""})
    given = list(classes or [])
    columns = given + [name for name in found if name not in given]
    return pd.DataFrame([_summary_row(image_name(layer), table, whole_cells, names, columns)
                         for layer, table, whole_cells, names in zip(layers, tables, whole, cell_classes)])


def _class_of_each_cell(table: pd.DataFrame) -> np.ndarray:
    manual = table["manual_label"].fillna("").astype(str).to_numpy()
    predicted = table["predicted_class"].fillna("").astype(str).to_numpy()
    return np.where(manual != "", manual, predicted)


def _summary_row(image: str, table: pd.DataFrame, whole: pd.DataFrame, names: np.ndarray,
                 classes: list[str]) -> dict:
    row: dict[str, object] = {"image": image, "cells": len(table), "whole_cells": len(whole)}
    diameter_px = _column(whole, "equivalent_diameter_px")
    diameter_um = _column(whole, "equivalent_diameter_um")
    row["diameter_mean_um"], row["diameter_sd_um"] = _mean(diameter_um), _sd(diameter_um)
    row["diameter_mean_px"], row["diameter_sd_px"] = _mean(diameter_px), _sd(diameter_px)
    row["diameter_cv_pct"] = 100 * row["diameter_sd_px"] / row["diameter_mean_px"]
    pallor = _column(whole, "central_pallor")
    row["central_pallor_median"] = float(np.median(pallor)) if len(pallor) else np.nan
    row["labelled"] = int((whole["manual_label"].fillna("").astype(str) != "").sum())
    classified = int((names != "").sum())
    row["classified"] = classified
    for name in classes:
        count = int((names == name).sum())
        row[f"n_{name}"] = count
        row[f"pct_{name}"] = 100 * count / classified if classified else np.nan
    models = sorted(set(table["model_id"].astype(str)) - {""})
    row["model_id"] = ";".join(models)
    return row


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    """The column's finite values as float64; none when the table lacks it."""
    if name not in table:
        return np.zeros(0)
    values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else np.nan


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else np.nan
