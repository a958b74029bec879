"""Manual labels back from an exported cells CSV onto cells layers: a lab labels cells today and
goes on tomorrow, or hands its labels to a colleague, with the smears segmented again the same
way (segmentation is deterministic, so the same image and settings give the same label ids).

A CSV row belongs to the cells layer of its ``layer`` name, else (a renamed layer, a CSV from
before the column) to the layer of its ``image`` when that image's labels come from one layer.
A label id alone could name another cell after a segmentation with other settings, so every
labelled row's ``centroid_x``/``centroid_y`` must match its cell's within
:data:`CENTROID_TOLERANCE_PX`; otherwise nothing at all is written and the error says how many
cells differ. A cell that already has another label keeps it (what was labelled since the
export is newer). Labels are written only after every layer's rows were checked.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cell_table import image_name

CENTROID_TOLERANCE_PX = 0.5
_NEEDED = ("label", "manual_label", "centroid_x", "centroid_y")


class LabelImportError(ValueError):
    """The CSV cannot give its labels to these cells layers; nothing was written."""


@dataclass
class LabelImport:
    """What :func:`import_manual_labels` did."""

    written: dict[str, int] = field(default_factory=dict)  # layer name: cells newly labelled
    already: int = 0  # cells that had the CSV's label already
    kept: int = 0  # cells whose own, different label was kept
    classes: list[str] = field(default_factory=list)  # the CSV's classes, in order of first appearance
    unmatched: list[str] = field(default_factory=list)  # CSV layers with labels that no given layer took


def import_manual_labels(path: str | Path, cells) -> LabelImport:
    """Give the cells of ``cells`` (one cells layer or a list of them) the manual labels of the
    exported cells CSV ``path``; see the module docstring for the rules."""
    layers = [cells] if hasattr(cells, "features") else list(cells)
    table = _read_labelled_rows(Path(path))
    report = LabelImport(classes=list(dict.fromkeys(table["manual_label"])))
    plans = []
    for layer, rows in _rows_of_layers(table, layers):
        plans.append((layer, _checked_labels(rows, layer, path)))
        table = table.drop(index=rows.index)
    report.unmatched = list(dict.fromkeys(table["layer"]))
    if not plans:
        raise LabelImportError(
            f"None of the labelled cells of {Path(path).name} belong to "
            f"{', '.join(repr(layer.name) for layer in layers) or 'any cells layer'}; its cells come from "
            f"{', '.join(map(repr, report.unmatched))}. Open and segment those smears first.")
    for layer, labels in plans:
        _write(layer, labels, report)
    return report


def _read_labelled_rows(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"layer": str, "image": str, "manual_label": str}, keep_default_na=False,
                            na_values={"label": [""], "centroid_x": [""], "centroid_y": [""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise LabelImportError(f"{path.name} is not a readable CSV ({error}).") from error
    missing = [column for column in _NEEDED if column not in table]
    if missing:
        raise LabelImportError(f"{path.name} has no {', '.join(missing)} column; import a CSV written by Export CSV.")
    if "layer" not in table and "image" not in table:
        raise LabelImportError(f"{path.name} has neither a layer nor an image column; import a CSV written by Export CSV.")
    table = table[table["manual_label"].str.strip() != ""].copy()
    if table.empty:
        raise LabelImportError(f"{path.name} holds no manual labels.")
    if "layer" not in table:
        table["layer"] = table["image"] + " cells"
    if "image" not in table:
        table["image"] = table["layer"].str.removesuffix(" cells")
    return table


def _rows_of_layers(table: pd.DataFrame, layers: Sequence) -> list[tuple[object, pd.DataFrame]]:
    """Each layer with its labelled rows: those of its name, else those of its image when they
    come from one layer that no layer of ``layers`` is named after."""
    names = {str(layer.name) for layer in layers}
    matched = [(layer, table[table["layer"] == str(layer.name)]) for layer in layers]
    rest = table[~table["layer"].isin(names)]
    found = []
    for layer, rows in matched:
        if rows.empty:
            rows = rest[rest["image"] == image_name(layer)]
            if rows["layer"].nunique() != 1:
                continue
            rest = rest.drop(index=rows.index)
        found.append((layer, rows))
    return found


def _checked_labels(rows: pd.DataFrame, layer, path) -> pd.Series:
    """The labels of ``rows`` indexed by label id, after checking they name ``layer``'s cells."""
    features = pd.DataFrame(layer.features)
    if "label" not in features or "centroid_x" not in features:
        raise LabelImportError(f"{layer.name!r} has no measured cell table; segment its image first.")
    cells = features.set_index("label")
    ids = rows["label"].to_numpy(dtype=np.int64)
    present = np.isin(ids, cells.index.to_numpy())
    moved = np.ones(len(ids), dtype=bool)
    if present.any():
        here = cells.loc[ids[present], ["centroid_x", "centroid_y"]].to_numpy(dtype=float)
        there = rows.loc[present, ["centroid_x", "centroid_y"]].to_numpy(dtype=float)
        moved[present] = ~(np.abs(here - there).max(axis=1) <= CENTROID_TOLERANCE_PX)  # NaN: moved
    if moved.any():
        raise LabelImportError(
            f"{moved.sum():,} of the {len(ids):,} labelled cells of {Path(path).name} are not cells of "
            f"{layer.name!r} (no cell of that id, or one elsewhere): the smear was segmented with other "
            f"settings or edited since the export.")
    return pd.Series(rows["manual_label"].str.strip().to_numpy(), index=ids)


def _write(layer, labels: pd.Series, report: LabelImport) -> None:
    table = layer.features.copy()
    current = table["manual_label"].astype(object).fillna("") if "manual_label" in table else ""
    table["manual_label"] = pd.Series(current, index=table.index, dtype=object)
    rows = pd.Index(table["label"]).get_indexer(labels.index)
    own = table["manual_label"].iloc[rows].to_numpy()
    new = own == ""
    report.already += int((own == labels.to_numpy()).sum())
    report.kept += int(((own != "") & (own != labels.to_numpy())).sum())
    report.written[str(layer.name)] = int(new.sum())
    if new.any():
        table.iloc[rows[new], table.columns.get_loc("manual_label")] = labels.to_numpy()[new]
        layer.features = table
