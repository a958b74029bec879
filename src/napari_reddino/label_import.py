"""Manual labels back from an exported cells CSV onto cells layers: a lab labels cells today and
goes on tomorrow, or hands its labels to a colleague.

The labelled rows of each layer of the CSV (its ``layer`` column; a CSV from before that column
is read by ``image``) go to one of the given layers of that name or of that image (a renamed
layer), or of that image with napari's " [1]" aside (two smears of one name opened again in the
other order swap "26" and "26 [1]"). A layer whose cells match the rows convincingly (at least
:data:`CONVINCING_MATCHES` rows and :data:`MIN_MATCHED_SHARE` of them, or both of two) goes
first, of those the layer of that name, then the larger share of rows matched; one layer never
takes two CSV layers' labels (the second is reported as ``taken``). A row goes to a cell by where it is, whatever its
label id: segmenting again with other settings renumbers the cells (on Chula smear 1, a cell
diameter of 32 px instead of the estimated 36 px kept only 18 of 124 ids), and a label id alone
could name another cell. A row's cell is

1. the cell whose centroid lies within :data:`CENTROID_TOLERANCE_PX` of the row's
   ``centroid_x``/``centroid_y``; else
2. the cell whose bounding box overlaps the row's by at least :data:`BOX_IOU` (intersection over
   union), whose area is within :data:`AREA_RATIO` of the row's ``area_px`` and whose centroid
   is within :data:`CENTRE_SHIFT` of the row's diameter: the same cell with its outline traced a
   little differently. Rows of a CSV without boxes or areas skip this.

On 20 Chula smears segmented at 32 px instead of the estimated size, 1,784 of 1,937 cells stayed
the same cell (their masks overlap by 0.8 or more); the centroid alone found 1,673 of them,
both rules 1,766, and no row went to another cell (``benchmarks/label_import.py``). Of the
cells found by their boxes, 99 % had moved by under 0.053 of their diameter; cropping 6 px off a
smear moves its cells by 0.17 of theirs, so a cropped smear does not match. The rows of cells
that are no longer there (split, merged, edited, cut by other settings) are counted as missed, not guessed,
and so is a cell two rows claim. A CSV layer of which no row matches writes nothing, nor does one of at least
:data:`FEW_ROWS` labelled rows of which fewer than :data:`MIN_MATCHED_SHARE` match, nor one onto a
layer of its image only with napari's number aside unless convincing: another smear that two
cameras both named "Image001" still puts a cell, now and then, at the place of one of its rows
(1 of 124 labelled rows of Chula smear 1 found a cell of smear 26). When nothing is written
at all, the error says why. A cell that already has another label keeps it (what was labelled since the
export is newer). Labels are written only after every layer of the CSV was matched.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .cell_table import as_layers, class_names, image_name
from .wording import counted, first_few

CENTROID_TOLERANCE_PX = 0.5
BOX_IOU = 0.8
AREA_RATIO = 1.25  # either way: 0.8 to 1.25 times the row's area
CENTRE_SHIFT = 0.06  # of the row's equivalent diameter
_NEIGHBOURS = 8  # cells whose boxes are compared with a row's
MIN_MATCHED_SHARE = 0.5  # of a CSV layer's labelled rows; segmenting again with other settings keeps 0.92
FEW_ROWS = 10  # ... judged only from this many rows on: of a few, chance decides the share
CONVINCING_MATCHES = 3  # rows that found their cell: by chance 1 row in 124 finds one (module docstring)
_BOX = ["bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"]
_NAPARI_NUMBER = re.compile(r" \[\d+\]$")  # napari's suffix to a name taken already
_NEEDED = ("manual_label", "centroid_x", "centroid_y")  # rows go to cells by place, not by label id


FOREIGN = "another smear of that name, or one segmented with very different settings"


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
    foreign: dict[str, str] = field(default_factory=dict)  # CSV layer: the layer too few of its rows matched
    onto: dict[str, str] = field(default_factory=dict)  # CSV layer: the layer its labels went to
    taken: dict[str, str] = field(default_factory=dict)  # CSV layer: its layer, which took another CSV layer's labels
    western: bool = False  # the file was in Windows' Western encoding: letters beyond it were lost as "?"
    respelled: dict[str, str] = field(default_factory=dict)  # a label as written: the class it was taken for


def import_manual_labels(path: str | Path, cells, classes: Sequence[str] = ()) -> LabelImport:
    """Give the cells of ``cells`` (one cells layer or a list of them) the manual labels of the
    exported cells CSV ``path``; see the module docstring for the rules. A label that is one of
    ``classes`` (the class list's) in another case takes its spelling: a colleague's "Normal"
    would be a class of its own beside "normal", its cells counted apart."""
    path = Path(path)
    layers = as_layers(cells)
    table, western = _read_labelled_rows(path)
    report = LabelImport(western=western)
    spelled = {name.casefold(): name for name in classes}
    for label in table["manual_label"].unique():
        if label not in classes and (name := spelled.get(str(label).casefold(), label)) != label:
            report.respelled[label] = name
    table["manual_label"] = table["manual_label"].replace(report.respelled)
    sources = [(str(source), rows) for source, rows in table.groupby("layer", sort=False)]
    found = {}  # (CSV layer, given layer), by index: the label id of each row's cell there, or -1
    kin = {}  # ... and whether that layer has the CSV layer's name or image name, not only napari's number aside
    for s, (source, rows) in enumerate(sources):
        for k, layer in enumerate(layers):
            named = str(layer.name) == source or image_name(layer) == rows["image"].iloc[0]
            if named or _unnumbered(image_name(layer)) == _unnumbered(rows["image"].iloc[0]):
                found[s, k], kin[s, k] = _cells_at(rows, layer), named
    chosen = _best_pairs(found, kin, [source for source, _ in sources], layers)
    plans, refused = [], []
    for s, (source, rows) in enumerate(sources):
        if s in chosen:
            ids = found[s, chosen[s]]
            matched = ids >= 0
            if not matched.all():
                report.missed[source] = int((~matched).sum())
            report.onto[source] = str(layers[chosen[s]].name)
            plans.append((layers[chosen[s]], pd.Series(rows["manual_label"].to_numpy()[matched], index=ids[matched])))
            continue
        candidates = sorted((k for t, k in found if t == s), key=lambda k: -(found[s, k] >= 0).sum())
        free = [k for k in candidates if k not in chosen.values()]
        if candidates and _convincing(found[s, candidates[0]] >= 0):  # its smear's layer took another's labels
            report.taken[source] = str(layers[candidates[0]].name)
            continue
        if not free:  # none, or those of other smears of its name, which took their own labels
            report.unmatched.append(source)
            continue
        report.missed[source] = len(rows)
        matched = int((found[s, free[0]] >= 0).sum())
        if not matched:
            refused.append(f"its {counted(len(rows), 'labelled cell')} from {source!r} "
                           f"{'is' if len(rows) == 1 else 'are'} at the place of no cell in "
                           f"{' or '.join(repr(layers[k].name) for k in free)} (was the smear cropped or "
                           "edited since the export?)")
            continue
        report.foreign[source] = str(layers[free[0]].name)
        some = "its" if matched == len(rows) else f"only {matched} of its"
        refused.append(f"{some} {counted(len(rows), 'labelled cell')} from {source!r} "
                       f"{'is' if matched == 1 else 'are'} at the place of a cell in "
                       f"{str(layers[free[0]].name)!r}, too few to tell that it is that smear ({FOREIGN})")
    if not plans:
        reasons = refused + ([f"the cells from {', '.join(map(repr, report.unmatched))} are of smears with no cells "
                              f"layer among {', '.join(repr(layer.name) for layer in layers) or 'none'} (open and "
                              "segment those smears first)"] if report.unmatched else [])
        raise LabelImportError(f"No label of {path.name} could be given to a cell: {'; '.join(reasons)}.")
    for layer, labels in plans:
        _write(layer, labels, report)
    report.classes = list(dict.fromkeys(label for _, labels in plans for label in labels))
    return report


def _unnumbered(name: str) -> str:
    """An image's name less the " [1]" napari gives a second image of one name: two smears "26"
    and "26 [1]" opened again in the other order swap those names."""
    return _NAPARI_NUMBER.sub("", str(name))


def _convincing(matched: np.ndarray) -> bool:
    """Whether rows of which ``matched`` found their cell are of that smear beyond doubt: at
    least :data:`CONVINCING_MATCHES` and :data:`MIN_MATCHED_SHARE` of them, or both of two."""
    found = int(matched.sum())
    return matched.mean() >= MIN_MATCHED_SHARE and (found >= CONVINCING_MATCHES or found == len(matched) == 2)


def _best_pairs(found: dict[tuple[int, int], np.ndarray], kin: dict[tuple[int, int], bool], sources: list[str],
                layers: list) -> dict[int, int]:
    """For each CSV layer (by index) the given layer (by index) its rows go to: convincing pairs
    first, of those the layer of the CSV layer's name, then the larger share of rows matched.
    Never a layer to two CSV layers, nor a pair whose match could be chance: none matched, or
    it is not convincing while the CSV layer has :data:`FEW_ROWS` rows or more, or the layer is of
    its smear only with napari's number aside."""
    def rank(pair):
        matched = found[pair] >= 0
        return not _convincing(matched), str(layers[pair[1]].name) != sources[pair[0]], -matched.mean(), pair

    chosen: dict[int, int] = {}
    for s, k in sorted(found, key=rank):
        matched = found[s, k] >= 0
        plausible = _convincing(matched) or (matched.any() and kin[s, k] and len(matched) < FEW_ROWS)
        if plausible and s not in chosen and k not in chosen.values():
            chosen[s] = k
    return chosen


def manual_labels(table: pd.DataFrame) -> pd.Series:
    """The ``manual_label`` column of a cells table as stripped text, "" where a cell has none
    (also when the table has no such column): blanks are no label."""
    return pd.Series(class_names(table, "manual_label"), index=table.index, dtype=object)


def carry_manual_labels(source, target) -> LabelImport:
    """Give the cells of ``target`` (a smear segmented again) the manual labels of the same cells
    in ``source`` (its earlier cells layer), found by place as :func:`import_manual_labels` finds
    them; a cell of ``target`` that has a label keeps it. ``missed`` counts the labelled cells of
    ``source`` that are not in ``target`` (split, merged, or cut otherwise)."""
    table = pd.DataFrame(source.features)
    report = LabelImport()
    if "label" not in table:
        return report
    labels = manual_labels(table)
    rows = table[labels != ""].assign(manual_label=labels[labels != ""])
    if rows.empty:
        return report
    ids = np.full(len(rows), -1)
    if {"centroid_x", "centroid_y"} <= set(rows):  # a cell without a centroid has no place to be found at
        placed = np.isfinite(rows[["centroid_x", "centroid_y"]].to_numpy(dtype=float)).all(axis=1)
        if placed.any():
            ids[placed] = _cells_at(rows[placed], target)
    matched = ids >= 0
    if not matched.all():
        report.missed[str(source.name)] = int((~matched).sum())
    report.written[str(target.name)] = 0
    if matched.any():
        _write(target, pd.Series(rows["manual_label"].to_numpy()[matched], index=ids[matched]), report)
    report.classes = list(dict.fromkeys(rows["manual_label"].to_numpy()[matched]))
    return report


def _spreadsheet_text(path: Path) -> tuple[io.StringIO, str, int, bool]:
    """The text of ``path`` from its header on, how to split it, how many blank lines came before
    the header, and whether it was in Windows' Western encoding, as a spreadsheet may have saved
    it: UTF-8 (with or without the mark Excel adds), UTF-16 with its mark (Excel's "Unicode
    Text"), else the Western encoding (Excel's plain "CSV"); fields split by ``,``, or by ``;`` or
    tabs where those split the header (a locale that writes decimal commas; Unicode Text)."""
    raw, western = path.read_bytes(), False
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text, western = raw.decode("cp1252"), True
    lines = text.split("\n")
    blank = next((index for index, line in enumerate(lines) if line.strip()), len(lines))
    header = lines[blank] if blank < len(lines) else ""
    sep = max(",;\t", key=header.count)  # the first of equals: "," for a header of one column
    return io.StringIO("\n".join(lines[blank:])), sep, blank, western


def _read_labelled_rows(path: Path) -> tuple[pd.DataFrame, bool]:
    """The rows of ``path`` with a manual label (``layer``, ``image``, centroid and the rest), and
    whether the file was in Windows' Western encoding."""
    try:
        text, sep, blank, western = _spreadsheet_text(path)
        # blank lines kept as rows (empty, so unlabelled): an error's line numbers stay right
        table = pd.read_csv(text, dtype={"layer": str, "image": str, "manual_label": str}, keep_default_na=False,
                            skip_blank_lines=False, sep=sep)
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
    for column in ("centroid_x", "centroid_y", *_BOX, "area_px"):
        if column in table:
            table[column] = _numbers(table[column], sep)
    broken = ~np.isfinite(table[["centroid_x", "centroid_y"]]).all(axis=1)
    if broken.any():
        lines = first_few(blank + index + 2 for index in table.index[broken])
        raise LabelImportError(f"{path.name} has {counted(int(broken.sum()), 'labelled row')} without a "
                               f"readable centroid (lines {lines}).")
    if "layer" not in table:
        table["layer"] = table["image"] + " cells"
    if "image" not in table:
        table["image"] = table["layer"].str.removesuffix(" cells")
    return table, western


def _numbers(column: pd.Series, sep: str) -> pd.Series:
    """A column as numbers, NaN where empty or unreadable. Numbers read as text (one empty cell
    makes a column text) whose decimals follow a comma, as a locale that writes them saved them,
    read as numbers: always where ``;`` splits the fields, else where a comma in the column is
    followed by other than three digits (as no thousands separator is); "1,234" alone stays
    unreadable, a thousand or one and a bit."""
    if pd.api.types.is_numeric_dtype(column):
        return column
    text = column.astype(str).str.strip()
    if sep == ";" or text.str.fullmatch(r"-?\d*,(\d{1,2}|\d{4,})").any():
        text = text.str.replace(",", ".", regex=False)  # "1.234,5" gives "1.234.5": no number
    return pd.to_numeric(text, errors="coerce")


def _cells_at(rows: pd.DataFrame, layer) -> np.ndarray:
    """For each of ``rows``, the label id of its cell in ``layer`` (the module docstring's two
    rules), or -1 (none, or a cell two rows claim)."""
    features = pd.DataFrame(layer.features)
    ids = np.full(len(rows), -1)
    if not {"label", "centroid_x", "centroid_y"} <= set(features):
        return ids  # not a measured cells layer
    centroids = features[["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    measured = np.isfinite(centroids).all(axis=1)
    if not measured.any():
        return ids
    labels = features["label"].to_numpy()
    distance, nearest = cKDTree(centroids[measured]).query(
        rows[["centroid_x", "centroid_y"]].to_numpy(dtype=float),
        distance_upper_bound=np.nextafter(CENTROID_TOLERANCE_PX, np.inf))  # the bound itself is excluded
    found = np.isfinite(distance)
    ids[found] = labels[measured][nearest[found]]
    if not found.all() and {*_BOX, "area_px"} <= set(rows) and {*_BOX, "area_px"} <= set(features):
        outlined = _same_outline(rows[~found], features, labels)
        outlined[np.isin(outlined, ids[found])] = -1  # a cell at a row's very centroid is that row's
        ids[~found] = outlined
    claimed, counts = np.unique(ids[ids >= 0], return_counts=True)
    ids[np.isin(ids, claimed[counts > 1])] = -1
    return ids


def _same_outline(rows: pd.DataFrame, features: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    """For each row, the label of the cell whose box overlaps the row's best, if by
    :data:`BOX_IOU`, with an area within :data:`AREA_RATIO` and its centroid within
    :data:`CENTRE_SHIFT`; else -1. Boxes that overlap by 0.8 have nearby centres, so only the
    :data:`_NEIGHBOURS` nearest box centres are compared."""
    theirs = rows[_BOX].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)  # a lab's layer: maybe text
    ours = features[_BOX].to_numpy(dtype=float)
    their_area = pd.to_numeric(rows["area_px"], errors="coerce").to_numpy(dtype=float)
    their_centre = rows[["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    our_area = features["area_px"].to_numpy(dtype=float)
    our_centre = features[["centroid_x", "centroid_y"]].to_numpy(dtype=float)
    known = np.isfinite(ours).all(axis=1) & np.isfinite(our_area) & np.isfinite(our_centre).all(axis=1)
    matched = np.full(len(rows), -1)
    asked = np.isfinite(theirs).all(axis=1) & (their_area > 0)
    if not known.any() or not asked.any():
        return matched
    ours, labels, our_area, our_centre = ours[known], labels[known], our_area[known], our_centre[known]
    _, near = cKDTree(_centres(ours)).query(_centres(theirs[asked]), k=min(_NEIGHBOURS, len(ours)))
    near = near.reshape(int(asked.sum()), -1)
    mine, others = theirs[asked][:, None, :], ours[near]
    overlap = np.prod(np.clip(np.minimum(mine[..., 2:], others[..., 2:])
                              - np.maximum(mine[..., :2], others[..., :2]), 0, None), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.nan_to_num(overlap / (_box_area(mine) + _box_area(others) - overlap), nan=0.0)
        best = near[np.arange(len(near)), np.argmax(iou, axis=1)]
        ratio = our_area[best] / their_area[asked]
    shift = np.hypot(*(our_centre[best] - their_centre[asked]).T) / np.sqrt(4 * their_area[asked] / np.pi)
    same = ((iou.max(axis=1) >= BOX_IOU) & (ratio >= 1 / AREA_RATIO) & (ratio <= AREA_RATIO)
            & (shift <= CENTRE_SHIFT))
    matched[asked] = np.where(same, labels[best], -1)
    return matched


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(boxes[..., 2:] - boxes[..., :2], axis=-1)


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
