"""Manual labels back from an exported cells CSV onto cells layers: a lab labels cells today and
goes on tomorrow, or hands its labels to a colleague, with the smears segmented again the same
way (segmentation is deterministic, so the same image and settings give the same label ids).

The labelled rows of each layer of the CSV (its ``layer`` column; a CSV from before that column
is read by ``image``) go to the given layer of that name, else to one of the given layers of
that image not named in the CSV (a renamed layer). A label id alone could name another cell
after a segmentation with other settings, so every labelled row's ``centroid_x``/``centroid_y``
must match its cell's within :data:`CENTROID_TOLERANCE_PX`: among several layers of the image
the one whose cells match is taken, and when none matches nothing at all is written and the
error says how many cells differ. A cell that already has another label keeps it (what was
labelled since the export is newer). Labels are written only after every layer was matched.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cell_table import as_layers, image_name
from .wording import counted

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
    classes: list[str] = field(default_factory=list)  # the classes imported, in order of first appearance
    unmatched: list[str] = field(default_factory=list)  # CSV layers with labels that no given layer took


def import_manual_labels(path: str | Path, cells) -> LabelImport:
    """Give the cells of ``cells`` (one cells layer or a list of them) the manual labels of the
    exported cells CSV ``path``; see the module docstring for the rules."""
    path = Path(path)
    layers = as_layers(cells)
    table = _read_labelled_rows(path)
    report = LabelImport()
    named_in_csv = set(table["layer"])
    plans = []
    for source, rows in table.groupby("layer", sort=False):
        taken = [id(layer) for layer, _ in plans]
        candidates = [layer for layer in layers if str(layer.name) == source] or [
            layer for layer in layers
            if image_name(layer) == rows["image"].iloc[0] and str(layer.name) not in named_in_csv]
        candidates = [layer for layer in candidates if id(layer) not in taken]
        if not candidates:
            report.unmatched.append(source)
            continue
        moved = [_moved(rows, layer) for layer in candidates]
        if 0 not in moved:
            raise LabelImportError(
                f"{min(moved):,} of the {len(rows):,} labelled cells of {path.name} from {source!r} are not cells "
                f"of {' or '.join(repr(layer.name) for layer in candidates)} (no cell of that id, or one "
                "elsewhere): the smear was segmented with other settings (pixel size, cell diameter) or edited since "
                "the export; segment it as it was then and import again.")
        plans.append((candidates[moved.index(0)], pd.Series(rows["manual_label"].to_numpy(), index=rows["label"])))
    if not plans:
        raise LabelImportError(
            f"None of the labelled cells of {path.name} belong to "
            f"{', '.join(repr(layer.name) for layer in layers) or 'any cells layer'}; its cells come from "
            f"{', '.join(map(repr, report.unmatched))}. Open and segment those smears first.")
    for layer, labels in plans:
        _write(layer, labels, report)
    report.classes = list(dict.fromkeys(label for _, labels in plans for label in labels))
    return report


def _read_labelled_rows(path: Path) -> pd.DataFrame:
    """The rows of ``path`` with a manual label: ``layer``, ``image``, integer ``label``, centroid."""
    try:
        table = pd.read_csv(path, dtype={"layer": str, "image": str, "manual_label": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise LabelImportError(f"{path.name} is not a readable CSV ({error}).") from error
    if "whole_cells" in table:
        raise LabelImportError(f"{path.name} is a smear summary; import the cells CSV written beside it.")
    missing = [column for column in _NEEDED if column not in table]
    if "layer" not in table and "image" not in table:
        missing.append("layer (or image)")
    if missing:
        raise LabelImportError(f"{path.name} lacks the columns {', '.join(missing)}; import a cells CSV "
                               "written by Export CSV.")
    table["manual_label"] = table["manual_label"].str.strip()
    table = table[table["manual_label"] != ""].copy()
    if table.empty:
        raise LabelImportError(f"{path.name} holds no manual labels.")
    for column in ("label", "centroid_x", "centroid_y"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    broken = table[["label", "centroid_x", "centroid_y"]].isna().any(axis=1) | (table["label"] % 1 != 0)
    if broken.any():
        lines = ", ".join(str(index + 2) for index in table.index[broken][:5])
        raise LabelImportError(f"{path.name} has {counted(int(broken.sum()), 'labelled row')} without a "
                               f"whole-number label or a centroid (lines {lines}{', ...' if broken.sum() > 5 else ''}).")
    table["label"] = table["label"].astype(np.int64)
    if "layer" not in table:
        table["layer"] = table["image"] + " cells"
    if "image" not in table:
        table["image"] = table["layer"].str.removesuffix(" cells")
    return table


def _moved(rows: pd.DataFrame, layer) -> int:
    """How many of ``rows`` are not cells of ``layer``: no cell of that id, or one elsewhere."""
    features = pd.DataFrame(layer.features)
    if not {"label", "centroid_x", "centroid_y"} <= set(features):
        return len(rows)  # not a measured cells layer
    cells = features.set_index("label")
    ids = rows["label"].to_numpy()
    present = np.isin(ids, cells.index.to_numpy())
    here = cells.loc[ids[present], ["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    there = rows.loc[present, ["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    close = np.abs(here - there).max(axis=1, initial=0) <= CENTROID_TOLERANCE_PX
    return int(len(ids) - close.sum())


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
