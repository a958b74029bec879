"""Manual labels back from an exported cells CSV onto cells layers: a lab labels cells today and
goes on tomorrow, or hands its labels to a colleague.

The labelled rows of each layer of the CSV (its ``layer`` column; a CSV from before that column
is read by ``image``) go to the given layer of that name, else to one of the given layers of
that image not named in the CSV (a renamed layer). A row goes to the cell whose centroid lies
within :data:`CENTROID_TOLERANCE_PX` of the row's ``centroid_x``/``centroid_y``, whatever its
label id: segmenting again with other settings renumbers the cells (on Chula smear 1, a cell
diameter of 32 px instead of the estimated 36 px kept 102 of 124 centroids within 0.5 px, but
only 18 of those kept their id), and a label id alone could name another cell. The rows of
cells that are no longer there (split, merged, edited, cut by other settings) are counted as
missed, not guessed. Among several layers of the image the one matching the most rows is taken.
A CSV layer of which no row matches writes nothing; when nothing matches at all, the error says
why. A cell that already has another label keeps it (what was labelled since the export is
newer). Labels are written only after every layer of the CSV was matched.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

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
    missed: dict[str, int] = field(default_factory=dict)  # CSV layer: its labelled rows with no cell at their place
    unmatched: list[str] = field(default_factory=list)  # CSV layers with labels that no given layer took


def import_manual_labels(path: str | Path, cells) -> LabelImport:
    """Give the cells of ``cells`` (one cells layer or a list of them) the manual labels of the
    exported cells CSV ``path``; see the module docstring for the rules."""
    path = Path(path)
    layers = as_layers(cells)
    table = _read_labelled_rows(path)
    report = LabelImport()
    named_in_csv = set(table["layer"])
    plans, refused = [], []
    for source, rows in table.groupby("layer", sort=False):
        taken = [id(layer) for layer, _ in plans]
        candidates = [layer for layer in layers if str(layer.name) == source] or [
            layer for layer in layers
            if image_name(layer) == rows["image"].iloc[0] and str(layer.name) not in named_in_csv]
        candidates = [layer for layer in candidates if id(layer) not in taken]
        if not candidates:
            report.unmatched.append(source)
            continue
        cells = [_cells_at(rows, layer) for layer in candidates]
        best = int(np.argmax([(ids >= 0).sum() for ids in cells]))
        matched = cells[best] >= 0
        if not matched.all():
            report.missed[source] = int((~matched).sum())
        if not matched.any():
            refused.append(f"its {counted(len(rows), 'labelled cell')} from {source!r} "
                           f"{'is' if len(rows) == 1 else 'are'} at no cell's centroid in "
                           f"{' or '.join(repr(layer.name) for layer in candidates)} (was the smear cropped or "
                           "edited since the export?)")
            continue
        plans.append((candidates[best], pd.Series(rows["manual_label"].to_numpy()[matched], index=cells[best][matched])))
    if not plans:
        reasons = refused + ([f"the cells from {', '.join(map(repr, report.unmatched))} are of smears with no cells "
                              f"layer among {', '.join(repr(layer.name) for layer in layers) or 'none'} (open and "
                              "segment those smears first)"] if report.unmatched else [])
        raise LabelImportError(f"No label of {path.name} could be given to a cell: {'; '.join(reasons)}.")
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
    broken = ~np.isfinite(table[["label", "centroid_x", "centroid_y"]]).all(axis=1) | (table["label"] % 1 != 0)
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


def _cells_at(rows: pd.DataFrame, layer) -> np.ndarray:
    """For each of ``rows``, the label id of the cell of ``layer`` whose centroid is within
    :data:`CENTROID_TOLERANCE_PX` of the row's, or -1 (none, or a cell two rows claim)."""
    features = pd.DataFrame(layer.features)
    ids = np.full(len(rows), -1)
    if not {"label", "centroid_x", "centroid_y"} <= set(features):
        return ids  # not a measured cells layer
    centroids = features[["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    measured = np.isfinite(centroids).all(axis=1)
    if not measured.any():
        return ids
    distance, nearest = cKDTree(centroids[measured]).query(
        rows[["centroid_x", "centroid_y"]].to_numpy(dtype=float),
        distance_upper_bound=np.nextafter(CENTROID_TOLERANCE_PX, np.inf))  # the bound itself is excluded
    found = np.isfinite(distance)
    ids[found] = features["label"].to_numpy()[measured][nearest[found]]
    claimed, counts = np.unique(ids[found], return_counts=True)
    ids[np.isin(ids, claimed[counts > 1])] = -1
    return ids


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
