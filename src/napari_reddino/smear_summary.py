"""One row per smear: how many red cells, how large and how varied, and what share of them
falls in each morphology class (the numbers a smear report grades).

Cells cut by the image border or the edge of the field (``touches_border``; a table without
it counts every cell as whole) are counted in ``cells`` and left out of everything else, as a
person counting at the microscope leaves out cut cells: they look smaller and misshapen. A cell's class is its
manual label where it has one, else the head's prediction. Percentages are given only when
every whole cell has a class (after a head predicted them all): before that they would be
shares of the hand-picked training examples, not of the smear. Nor for a class that the head
which predicted some of them does not know (``predicted_classes`` in the layer's metadata): it
could not name such a cell, so 0 % would be no measurement, only its count (a floor) is given.

Columns: ``layer``, ``image`` (two layers of one smear give two rows), ``cells``,
``whole_cells``, ``pixel_size_um`` and ``diameter_mean_um``, ``diameter_sd_um`` (empty without
a pixel size), ``diameter_mean_px``, ``diameter_sd_px``, ``diameter_cv_pct`` (the spread of the
area-equivalent diameter, a measure of anisocytosis; not the analyser's RDW, a spread of
volumes), ``central_pallor_median`` (the unitless index of ``measure_cells``: 1 - centre /
rim density), ``overlapping_pct`` (the share of whole cells with at least
:data:`OVERLAPPING_OUTLINE` of their outline against another cell: overlapping cells, split
along a chord, whose shape says less; a crowded field has many), ``labelled`` (manual labels),
``classified``, ``unclassified``, then for every class ``n_<class>``, ``pct_<class>`` and
``pct_<class>_low95``, ``pct_<class>_high95`` (its 95 % interval from counting alone, see
:func:`share_interval`), and ``model_id``. No Qt, no napari: a layer is anything with ``name``,
``features`` and ``metadata``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .cell_table import PREDICTED_CLASSES, SOURCE_PATH, as_layers, cells_table, class_names, image_name, whole_cells

# A cell that only touches another shares a few % of its outline; one overlapping a neighbour
# is split from it along a line. Over the whole cells of 36 Chula smears, outline_shared was 0
# for 57 %, below 0.1 for 8 %, and 0.1-0.5 for 33 % (most at 0.2-0.4).
OVERLAPPING_OUTLINE = 0.1
SHARE_CONFIDENCE = 0.95


def summarise_smears(cells, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cells layer of ``cells`` (a layer or a list of them).

    ``classes`` orders the class columns and keeps classes no cell has (0 %, which a report
    states too); classes the cells carry beyond them follow, by name. Without it: the classes
    the cells carry, by name.
    """
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of class names, not the one string {classes!r} (write [{classes!r}]).")
    layers = as_layers(cells)
    tables = [cells_table([layer]) for layer in layers]
    whole = [table[whole_cells(table)] for table in tables]
    cell_classes = [class_of_each_cell(table) for table in whole]
    found = sorted(set().union(*(set(names) for names in cell_classes)) - {""})
    given = list(classes or [])
    columns = given + [name for name in found if name not in given]
    summary = pd.DataFrame([_summary_row(layer, table, whole_cells, names, columns)
                            for layer, table, whole_cells, names in zip(layers, tables, whole, cell_classes)])
    if SOURCE_PATH in summary:  # beside the image name, whichever layer had it first
        summary.insert(2, SOURCE_PATH, summary.pop(SOURCE_PATH))
    return summary


def class_of_each_cell(table: pd.DataFrame) -> np.ndarray:
    """Each cell's manual label where it has one, else its predicted class; "" for neither."""
    manual = class_names(table, "manual_label")
    return np.where(manual != "", manual, class_names(table, "predicted_class"))


def _summary_row(layer, table: pd.DataFrame, whole: pd.DataFrame, names: np.ndarray, classes: list[str]) -> dict:
    row: dict[str, object] = {"layer": str(layer.name), "image": image_name(layer)}
    if SOURCE_PATH in layer.metadata:
        row[SOURCE_PATH] = str(layer.metadata[SOURCE_PATH])
    row |= {"cells": len(table), "whole_cells": len(whole)}
    diameter_px = _column(whole, "equivalent_diameter_px")
    diameter_um = _column(whole, "equivalent_diameter_um")
    ratio = _column(whole, "equivalent_diameter_um", per="equivalent_diameter_px")
    row["pixel_size_um"] = float(np.median(ratio)) if len(ratio) else np.nan
    row["diameter_mean_um"], row["diameter_sd_um"] = _mean(diameter_um), _sd(diameter_um)
    row["diameter_mean_px"], row["diameter_sd_px"] = _mean(diameter_px), _sd(diameter_px)
    row["diameter_cv_pct"] = 100 * row["diameter_sd_px"] / row["diameter_mean_px"]
    pallor = _column(whole, "central_pallor")
    row["central_pallor_median"] = float(np.median(pallor)) if len(pallor) else np.nan
    shared = _column(whole, "outline_shared")
    row["overlapping_pct"] = 100 * float((shared >= OVERLAPPING_OUTLINE).mean()) if len(shared) else np.nan
    row["labelled"] = int((class_names(whole, "manual_label") != "").sum())
    classified = int((names != "").sum())
    row["classified"], row["unclassified"] = classified, len(whole) - classified
    every_cell_classified = classified > 0 and classified == len(whole)
    head_classes = layer.metadata.get(PREDICTED_CLASSES)  # None: a table from before it was recorded
    predicted_some = (class_names(whole, "manual_label") == "").any()
    for name in classes:
        count = int((names == name).sum())
        row[f"n_{name}"] = count
        measured = every_cell_classified and not (predicted_some and head_classes is not None
                                                  and name not in head_classes)
        row[f"pct_{name}"] = 100 * count / classified if measured else np.nan
        low, high = share_interval(count, classified) if measured else (np.nan, np.nan)
        row[f"pct_{name}_low95"], row[f"pct_{name}_high95"] = 100 * low, 100 * high
    models = sorted(set(table["model_id"].astype(str)) - {""})
    row["model_id"] = ";".join(models)
    return row


def share_interval(count: int, total: int, confidence: float = SHARE_CONFIDENCE) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a share seen as ``count`` of ``total`` cells, as
    fractions: how far the smear's true share may lie from a count of so few cells, as in Rümke's
    tables for differential counts (5 of 100 cells: 1.6-11.3 %). It is counting alone; the
    head's errors come on top."""
    if not 0 <= count <= total or total == 0:
        raise ValueError(f"a share needs 0 <= count <= total and total > 0; got {count} of {total}.")
    tail = (1 - confidence) / 2
    low = stats.beta.ppf(tail, count, total - count + 1) if count > 0 else 0.0
    high = stats.beta.ppf(1 - tail, count + 1, total - count) if count < total else 1.0
    return float(low), float(high)


def _column(table: pd.DataFrame, name: str, *, per: str | None = None) -> np.ndarray:
    """The column's finite values as float64 (divided by the column ``per``); none when the table lacks it."""
    if name not in table or (per is not None and per not in table):
        return np.zeros(0)
    values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
    if per is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = values / pd.to_numeric(table[per], errors="coerce").to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else np.nan


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else np.nan
