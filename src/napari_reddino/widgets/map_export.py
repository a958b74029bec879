"""The Cell map's files: one row per cell to a CSV with the files ticked beside it (embeddings,
a summary per smear, a picture per smear of its classes), and manual labels read back from
such a CSV.

A mixin of :class:`.cell_map_widget.CellMapWidget`: it reads the widget's ``pool``,
``class_list``, ``status`` and viewer, and calls its ``_map_is_current``, ``_smears_changed``,
``_refuse`` and ``recolour``.
"""

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog, QMessageBox

from ..atomic_files import NotReplacedError, PartlyWrittenError
from ..cell_export import export_cells_csv, galleries_folder, stale_beside, summary_path
from ..cell_embeddings import crop_settings, repainted_since_embedded
from ..cell_table import PREDICTED_BY, class_names, image_name
from ..class_gallery import GalleryError, GalleryFiles, pictures_in, remove_pictures, save_class_gallery
from ..label_import import FOREIGN, import_manual_labels
from ..wording import OPEN_ELSEWHERE, counted
from .cells_layer import carried_to
from .smear_colours import cells_layers
from .smear_links import level_0, smear_under


class MapExport:
    """Export CSV and Import labels, and the question before a file is replaced."""

    def _make_export_options(self) -> None:
        self.with_embeddings = CheckBox(text="Also write the embeddings (.npz)", value=False)
        self.with_summary = CheckBox(value=True)
        self.with_summary.text = "Also write a summary per smear (_summary.csv)"  # the constructor drops "_"
        self.with_summary.tooltip = ("Per smear: cells, diameter mean, SD and CV, central pallor, overlapping cells, "
                                     "and the count and % of each class (manual label, else prediction), without "
                                     "cut cells")
        self.with_galleries = CheckBox(value=False)
        self.with_galleries.text = "Also draw each smear's classes (_galleries)"
        self.with_galleries.tooltip = (
            "A picture per smear in a folder beside the table: a row per class (manual label, else prediction) "
            "with its count, and up to 10 of its cells at random, as reddino-analyse --galleries draws them")

    def export_csv(self, path: str | Path) -> Path | None:
        """Write one row per cell of the map's smears and of the other open smears the panel's
        head classified (those without map positions) to ``path`` (``.csv`` added unless it ends
        so), and the files ticked beside it; asks before replacing an existing file or deleting an
        earlier export's side files."""
        if not self._map_is_current(pixels=True):
            return None
        if self.pool is None and not self._classified_beside_map()[0]:
            self._refuse("Compute the map first, or apply a saved head: Export writes the map's smears and those "
                         "the head classified.", notify=show_info)
            return None
        path = Path(path)
        if path.suffix.lower() != ".csv":  # "Smear 12.03.2024" too: its suffix is ".2024"
            path = path.with_name(f"{path.name}.csv")
        embeddings = path.with_suffix(".npz") if self.with_embeddings.value else None
        summary = summary_path(path) if self.with_summary.value else None
        galleries = galleries_folder(path)
        if self.with_galleries.value and galleries.exists() and not galleries.is_dir():
            self._refuse(f"Nothing was written: {galleries.name} is a file, where the pictures would go; move it, or "
                         "untick Also draw each smear's classes.")
            return None
        earlier_pictures = pictures_in(galleries)
        stale = stale_beside(path, with_embeddings=embeddings is not None, with_summary=summary is not None)
        replaced: list[Path | str] = [file for file in (path, embeddings, summary) if file is not None and file.exists()]
        deleted: list[Path | str] = list(stale)
        if earlier_pictures:  # pictures of the cells as they were: the folder is drawn anew, or emptied
            pictures = f"{galleries.name} ({counted(len(earlier_pictures), 'picture')}"
            if self.with_galleries.value:
                replaced.append(f"{pictures}, drawn anew)")
            else:
                deleted.append(f"{pictures})")
        pool = self.pool
        if (replaced or deleted) and not self._confirm_overwrite(replaced, deleted):
            return None
        if pool is not self.pool or not self._map_is_current():  # a run ended while the question was open
            self._refuse("Nothing was written: the map's cells changed while the question was open; Compute map, "
                         "then export again.")
            return None
        mapped = list(self.pool.layers) if self.pool is not None else []
        beside, left_out = self._classified_beside_map()
        if not mapped and not beside:  # the head went while the question was open
            self._refuse("Nothing was written: no smear is mapped or classified now.")
            return None
        try:
            written = export_cells_csv(path, [*mapped, *map(without_map_positions, beside)],
                                       embeddings_path=embeddings, summary_path=summary,
                                       classes=self.class_list.classes, overwrite=True)
        except PartlyWrittenError as error:
            self._refuse(f"Only partly written: {error}.{OPEN_ELSEWHERE}")
            return None
        except (OSError, ValueError) as error:
            self._refuse(f"Nothing was written: {not_written(error)}")
            return None
        with_summary = f", one row per smear to {summary.name}" if summary else ""
        unclassified = int(pd.read_csv(summary)["unclassified"].sum()) if summary else 0
        if unclassified:
            with_summary += (f" (class shares left empty: {counted(unclassified, 'whole cell')} without a class "
                             "yet; train or apply a head)")
        drawn, drawing = (self._draw_galleries(galleries, [*mapped, *beside]) if self.with_galleries.value
                          else (set(), ""))
        removed = ""
        for file in stale:
            try:
                file.unlink(missing_ok=True)
                removed += f"; removed the earlier export's {file.name}"
            except OSError as error:  # held open elsewhere (Windows): the new table is written all the same
                removed += f"; the earlier export's {file.name} could not be removed ({error.strerror or error}) " \
                           "and does not match it"
        removed += remove_pictures([file for file in earlier_pictures if file not in drawn], "the earlier export's")
        cells = sum(len(layer.features) for layer in [*mapped, *beside])
        unmapped = (f" {_quoted(beside)} {'has' if len(beside) == 1 else 'have'} no map positions: classified by the "
                    "head, but not in the map." if beside and mapped else "")
        earlier = [layer for layer in mapped if (class_names(layer.features, "predicted_class") != "").any()
                   and (self.head_token is None or layer.metadata.get(PREDICTED_BY) != self.head_token)]
        if earlier and len(earlier) < len(mapped):  # the summary's class shares would mix two heads
            unmapped += (f" {_quoted(earlier)} {'carries' if len(earlier) == 1 else 'carry'} the predictions of an "
                         "earlier head: train or apply the head again to classify every smear with one.")
        self.status.value = (f"{counted(cells, 'cell')} written to {written}{with_summary}{drawing}{removed}."
                             f"{unmapped}{left_out}")
        return written

    def _classified_beside_map(self) -> tuple[list, str]:
        """The open smears outside the map that the panel's head classified, which the export
        writes too, and a sentence naming the classified smears it leaves out, and why."""
        mapped = self.pool.layers if self.pool is not None else []
        beside, earlier_head, painted = [], [], []
        for layer in cells_layers(self._viewer):
            if (layer in mapped or carried_to(self._viewer, layer) is not None
                    or not (class_names(layer.features, "predicted_class") != "").any()):
                continue
            if self.head_token is None or layer.metadata.get(PREDICTED_BY) != self.head_token:
                earlier_head.append(layer)
            elif repainted_since_embedded(layer) or self._smears_changed([layer]):
                painted.append(layer)
            else:
                beside.append(layer)
        said = ""
        for left, why in ((earlier_head, "classified by an earlier head (apply the head to it again)"),
                          (painted, "painted, or its smear edited, since it was classified (embed it and apply the "
                                  "head again)")):
            if left:
                said += f" {_quoted(left)} {'is' if len(left) == 1 else 'are'} not in it: {why}."
        return beside, said

    def _draw_galleries(self, folder: Path, layers: Sequence) -> tuple[set[Path], str]:
        """Draw the class gallery of each smear of ``layers`` into ``folder``: the pictures written,
        and what to say of them. A picture that cannot be drawn costs only itself."""
        files, drawn, missed = GalleryFiles(folder), set(), []
        smears = [image_name(cells) for cells in layers]
        for cells, smear_name in zip(layers, smears):
            smear = smear_under(self._viewer, cells)
            name = smear_name if smears.count(smear_name) == 1 else cells.name  # mapped twice: a picture each
            if smear is None:
                missed.append(f"{name!r} (its image is not open)")
                continue
            path = files.path(name)
            try:
                if save_class_gallery(path, level_0(smear), np.asarray(cells.data), pd.DataFrame(cells.features),
                                      self.class_list.classes, self.class_list.hex_colours,
                                      contrast_limits=smear.contrast_limits, crops=crop_settings(cells)):
                    drawn.add(path)
                else:
                    missed.append(f"{name!r} (none of its whole cells has a class yet)")
            except GalleryError as error:
                missed.append(f"{name!r} ({error})")
        said = f"; {counted(len(drawn), 'class picture')} in {folder.name}" if drawn else ""
        return drawn, said + (f"; no picture of {', '.join(missed)}" if missed else "")

    def import_labels(self, path: str | Path) -> None:
        """Give the viewer's cells layers the manual labels of an exported cells CSV (yesterday's
        work, a colleague's), where they are the same cells; a newer label of a cell is kept."""
        # not onto a layer whose labels went to a newer segmentation of its smear (it is hidden)
        layers = [layer for layer in cells_layers(self._viewer) if carried_to(self._viewer, layer) is None]
        try:
            report = import_manual_labels(path, layers, self.class_list.classes)
        except (OSError, ValueError) as error:  # LabelImportError is a ValueError
            self._refuse(f"No labels were imported: {error}")
            return
        self._label_undo.clear()  # an undo would write over the labels imported since
        garbled = [name for name in report.classes if report.western and "?" in name
                   and name not in self.class_list.classes]
        for name in report.classes:
            self.class_list.add_class(name)
        self.recolour()
        parts = [f"{counted(sum(report.written.values()), 'label')} imported from {Path(path).name} "
                 f"onto {', '.join(map(repr, report.written))}"]
        moved = [f"those from {source!r} onto {layer!r}" for source, layer in report.onto.items() if source != layer]
        if moved:
            parts.append(" and ".join(moved))
        if report.already:
            parts.append(f"{counted(report.already, 'cell')} had them already")
        if report.kept:
            parts.append(f"{counted(report.kept, 'cell')} labelled otherwise since the export kept that label")
        gone = {name: count for name, count in report.missed.items() if name not in report.foreign}
        if gone:
            missed = " and ".join(f"{counted(count, 'labelled cell')} from {name!r}" for name, count in gone.items())
            parts.append(f"{missed} not imported: no cell is at {'its' if sum(gone.values()) == 1 else 'their'} "
                         "place now (segmented with other settings, or edited since the export)")
        for name, layer in report.foreign.items():
            parts.append(f"none of the {counted(report.missed[name], 'label')} from {name!r} imported: too few of its "
                         f"cells are at the place of a cell in {layer!r} to tell that it is that smear ({FOREIGN})")
        for name, layer in report.taken.items():
            other = next(source for source, onto in report.onto.items() if onto == layer)
            parts.append(f"not imported: the labels from {name!r}, whose cells are in {layer!r} too, which took those "
                         f"from {other!r} (open the smear again for both)")
        if report.unmatched:
            parts.append(f"not imported: the cells from {', '.join(map(repr, report.unmatched))} (open and segment "
                         "those smears)")
        if report.respelled:
            parts.append("labels in another case taken for the class list's: " + ", ".join(
                f"{label!r} as {name!r}" for label, name in report.respelled.items()))
        if garbled:
            parts.append(f"new class{'es' if len(garbled) > 1 else ''} {', '.join(map(repr, garbled))}: where a '?' "
                         "stands for a letter the spreadsheet could not save (Excel's plain CSV keeps Western letters "
                         "only), rename it in the class list, and save as CSV UTF-8 next time")
        self.status.value = "; ".join(parts) + "."

    def _confirm_overwrite(self, paths: Sequence[Path | str], removed: Sequence[Path | str] = ()) -> bool:
        """Ask before replacing ``paths`` and deleting ``removed`` (an earlier export's files that
        would not match the new one); on No, say that all of them were kept."""
        replaced = f"{_names(paths)} {'exist' if len(paths) > 1 else 'exists'}" if paths else ""
        if removed:
            question = ((f"{replaced} and will be replaced; " if replaced else "")
                        + f"{_names(removed)}, from an earlier export, would not match the new table and will be "
                        "deleted. Go on?")
        else:
            question = f"{replaced}. Replace?"
        if QMessageBox.question(self, "Replace?", question) != QMessageBox.StandardButton.Yes:
            kept = [*paths, *removed]
            self.status.value = (f"Nothing was written: {_names(kept)} kept as "
                                 f"{'they were' if len(kept) > 1 else 'it was'}.")
            return False
        return True

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import labels from an exported CSV", "", "CSV (*.csv)")
        if path:
            self.import_labels(path)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export cells", "cells.csv", "CSV (*.csv)", options=QFileDialog.Option.DontConfirmOverwrite
        )
        if path:
            self.export_csv(path)


def not_written(error: Exception) -> str:
    """Why a file was not written, as one sentence, with what to do where another program holds it."""
    return str(error).rstrip(".") + "." + (OPEN_ELSEWHERE if isinstance(error, NotReplacedError) else "")


def without_map_positions(layer) -> SimpleNamespace:
    """``layer`` as the export reads it, less the positions an earlier map gave its cells."""
    features = pd.DataFrame(layer.features).drop(columns=["umap_x", "umap_y"], errors="ignore")
    return SimpleNamespace(name=layer.name, features=features, metadata=layer.metadata)


def _quoted(layers: Sequence) -> str:
    return ", ".join(repr(layer.name) for layer in layers)


def _names(paths: Sequence[Path | str]) -> str:
    """``a.csv``, ``a.csv and b.npz``, ``a.csv, b.npz and c.csv`` (a string stands as it is)."""
    names = [path if isinstance(path, str) else path.name for path in paths]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]

