"""Plugins > RedDino > Cell map: the cells' RedDino embeddings as a UMAP, linked both ways to the smears.

Compute map pools the embedded cells of every cells layer (one model), lays them out with
UMAP in a worker and shows one point per cell in the map's own canvas. A lasso on the map
or a click on a smear selects cells; they are highlighted in both places and the rest are
dimmed. Number keys (or Assign) give the selection a class; Train fits the linear head on
the labelled cells and predicts every cell; Review uncertain steps through the least certain
ones (after a saved head, first the cells of a smear unlike those it was trained among).
Everything a cell gets (``umap_x/y``, ``manual_label``, ``predicted_class``,
``prediction_probability``, ``p_<class>``) is a column of its cells layer's ``features``, so
hovering shows it and Export writes it.

The smear colours live in one extra Labels layer per cells layer ("<cells> map colours",
see :mod:`.smear_colours`); the head (Train, Review uncertain, Save and Apply) in
:mod:`.map_head`; Export CSV and Import labels in :mod:`.map_export`.
"""

import threading
import time
import weakref

import napari
import numpy as np
import pandas as pd
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.colormaps import ensure_colormap
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QMessageBox,
    QScrollArea,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ..cell_classifier import CellClassifier
from ..cell_embeddings import image_changed_since_embedded, repainted_since_embedded, stored_fingerprint
from ..cell_map import (
    MANUAL,
    PREDICTED,
    UNLABELLED,
    PooledCells,
    PoolingError,
    class_colours,
    emphasise,
    value_colours,
)
from ..cell_table import PREDICTED_BY, PREDICTED_CLASSES, class_names
from ..smear_summary import summarise_smears
from ..steps import Progress, StepsCancelled
from ..umap_layout import fit_umap, warm_up_umap
from ..wording import counted
from .cell_gallery import CellGallery, GalleryThumbnails, gallery_heading
from .cells_layer import carried_to, embedded_cells_layers, left_out_words, segmented_again_as
from .class_list import DEFAULT_CLASSES, ClassList, key_of, remember_classes, remembered_classes
from .job_widget import JobWidget, job_worker
from .map_canvas import MapCanvas
from .map_export import MapExport
from .map_head import MapHead
from .smear_colours import SmearColours, cells_layers
from .smear_keys import LABEL_KEYS, REDO_KEY, UNDO_KEY, SmearKeys
from .smear_links import level_0, smear_under
from .smear_table import SmearTable

SMEAR_FILL_ALPHA = 0.55  # class colours over the smear stay see-through
MIN_WIDTH, CLASS_TABLE_MIN_HEIGHT = 420, 260  # px: room for the map and seven classes at once
SMEAR_TABLE_MIN_HEIGHT = 300  # px: the six measures and three classes
SMEAR_TABLE_DELAY_MS = 250
GALLERY_NAME = "Selected cells"
UNDO_STEPS = 100  # labellings that Undo label can take back
MIN_CELL_ON_SCREEN_PX = 80  # a cell shown from the map is zoomed to at least this size


@job_worker
def _umap_job(embeddings: np.ndarray, report_epoch: Progress, stop: threading.Event):
    """The map's UMAP; epochs are reported through ``report_epoch`` (a signal: this generator
    cannot yield from inside umap's loop); a ``stop`` set during the neighbour search ends it
    there, a layout under way runs to its end."""
    yield 0, 0  # an indeterminate bar while the neighbours and the start layout are computed
    try:
        return fit_umap(embeddings, progress=report_epoch, should_stop=stop.is_set)
    except StepsCancelled:
        return None


def _weakly(method):
    """A mouse callback that calls ``method`` while its widget lives, without keeping the widget alive.

    The viewer outlives dock widgets; a bound method in its callbacks would keep a closed widget
    (and the map's canvas) alive.
    """
    reference = weakref.WeakMethod(method)

    def callback(viewer, event):
        bound = reference()
        if bound is not None:
            yield from bound(viewer, event)

    return callback



PLACE_COLUMNS = ("centroid_x", "centroid_y", "equivalent_diameter_px", "bbox_min_x", "bbox_min_y", "bbox_max_x",
                 "bbox_max_y")  # what showing a cell in its smear and in the gallery reads


BUTTON_TIPS = {  # the head is this panel's classifier; the tips say so where it first appears
    "Train head": "Train the head, a simple classifier, on the labelled cells: it learns their classes from "
                  "the embeddings and measurements and predicts a class for every other cell.",
    "Review uncertain": "Select the unlabelled cell the head is least sure of; label it, or press again to skip.",
    "Save head…": "Save the trained head (two files, .safetensors and .json) to apply it to other smears later, "
                  "here or with reddino-analyse --head.",
    "Apply saved head…": "Predict every embedded cell of the open smears with a saved head.",
    "Show in gallery": "Show the selected cells side by side under the smear.",
    "Undo label": "Give the cells of the last Assign, Clear label or key press the labels they had before "
                  f"(Ctrl+Z on the map, in this panel or over its smears; up to {UNDO_STEPS} steps back).",
    "Select class": "Select every cell of the class chosen in the list (its label, else its prediction).",
}


class CellMapWidget(MapHead, MapExport, JobWidget):
    """UMAP of the embedded cells, lasso and click selection, labelling, linear head, export."""

    _umap_epoch = Signal(int, int)  # (done, total) from the UMAP worker's thread

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        warm_up_umap()  # numba compiles in the background while the user segments and embeds
        self.pool: PooledCells | None = None
        self._pending: PooledCells | None = None  # the cells a running UMAP lays out
        self._stop_umap = threading.Event()
        self._umap_epoch.connect(self._on_epoch)
        self.xy: np.ndarray | None = None
        self.selected = np.zeros(0, dtype=bool)
        self.classifier: CellClassifier | None = None
        self.head_token: str | None = None  # marks the cells layers this head predicted (PREDICTED_BY)
        self._smear_colours: SmearColours | None = None
        self._smear_keys = SmearKeys(napari_viewer, self.press_key)
        self._review: list[int] = []  # points still to review, the least certain last
        self._label_undo: list[tuple[np.ndarray, np.ndarray]] = []  # (points, their labels before), newest last
        self._uncertain = np.zeros(0, dtype=int)
        self._unlike = np.zeros(0, dtype=bool)  # per point: beyond the reach of the head that predicted it
        self._head_applied = False  # the head was loaded from a file: its review shows unlike cells first
        self._colours = np.zeros((0, 4), dtype=np.float32)  # every point's colour before dimming
        self._started = 0.0

        self.canvas = MapCanvas()
        self.canvas.lassoed.connect(self._on_lasso)
        self.canvas.point_clicked.connect(self._on_point_clicked)
        self.class_list = ClassList(*(remembered_classes(napari_viewer) or (DEFAULT_CLASSES,)))
        self.smear_table = SmearTable()
        self.gallery = CellGallery()
        self.gallery.cell_clicked.connect(self._on_gallery_click)
        self.gallery.leave_out.connect(self.leave_out)
        self.gallery.shown.connect(self._fill_gallery)
        self._thumbnails: GalleryThumbnails | None = None
        # The table follows labelling a moment after its last key press (41 ms at 50,000 cells,
        # which labelling key by key need not wait for each time).
        self._smear_table_timer = QTimer(self, singleShot=True, interval=SMEAR_TABLE_DELAY_MS)
        self._smear_table_timer.timeout.connect(self._show_smear_table)
        self.class_list.changed.connect(self.recolour)
        self.class_list.changed.connect(lambda: remember_classes(self._viewer, self.class_list))
        self.class_list.renamed.connect(self._rename_class)
        self.class_list.remove_requested.connect(self._remove_class)
        self.class_list.refused.connect(self._say)
        self.colour_by = ComboBox(label="Colour by", choices=self._colour_choices)
        self.colour_by.changed.connect(self.recolour)
        self.centre_on_click = CheckBox(text="Centre the map on a clicked cell", value=True)
        self.selection_count = Label(value="No map yet.")
        self._make_export_options()
        self._run_button.text = "Compute map"

        actions = {
            "Assign": lambda: self.assign(self.class_list.current_class),
            "Clear label": lambda: self.assign(UNLABELLED),
            "Undo label": self.undo_label,
            "Clear selection": lambda: self.select(np.zeros(len(self.selected), dtype=bool)),
            "Select class": lambda: self.select_class(self.class_list.current_class),
            "Show in gallery": self.show_gallery,
            "Train head": self.train,
            "Review uncertain": self.review_next,
            "Save head…": self._save_head_dialog,
            "Apply saved head…": self._apply_head_dialog,
            "Export CSV…": self._export_dialog,
            "Import labels…": self._import_dialog,
        }
        self.buttons = {text: PushButton(text=text, tooltip=BUTTON_TIPS.get(text)) for text in actions}
        for text, action in actions.items():
            self.buttons[text].changed.connect(action)
        self._lay_out_map_widget()
        self._bind_keys()
        self._smear_press = _weakly(self._on_smear_press)
        napari_viewer.mouse_drag_callbacks.append(self._smear_press)
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._on_image_opened_or_closed)

    def _lay_out_map_widget(self) -> None:
        """The map on top; below it, in a scroll area, the controls, the class list and the head;
        the status line under both."""
        run = Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False)
        controls = Container(widgets=[run, self.colour_by, self.centre_on_click])
        labelling = Container(widgets=[self.selection_count, self._row("Assign", "Clear label", "Undo label"),
                                       self._row("Clear selection", "Select class", "Show in gallery")], labels=False)
        head = Container(
            widgets=[self._row("Train head", "Review uncertain"), self._row("Save head…", "Apply saved head…"),
                     self.with_embeddings, self.with_summary, self.with_galleries,
                     self._row("Export CSV…", "Import labels…")],
            labels=False,
        )
        self.class_list.table.setMinimumHeight(CLASS_TABLE_MIN_HEIGHT)
        panel = QWidget()
        panel_layout = QVBoxLayout(panel)
        per_smear = Label(value="Per smear (cells cut by the image border left out)")
        per_smear.native.setWordWrap(True)  # rather than widen the panel past the dock
        self.smear_table.setMinimumHeight(SMEAR_TABLE_MIN_HEIGHT)
        for part in (controls.native, labelling.native, self.class_list, per_smear.native, self.smear_table, head.native):
            panel_layout.addWidget(part)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(panel)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.canvas)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(0, 1)  # on a laptop screen, the class list shows too
        splitter.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        layout.addWidget(self.status.native)  # outside the scroll area: what just happened is always in view
        self.setMinimumWidth(MIN_WIDTH)

    def _row(self, *names: str) -> Container:
        return Container(widgets=[self.buttons[name] for name in names], layout="horizontal", labels=False)

    def _bind_keys(self) -> None:
        """Digits assign the class with that key, Backspace/Delete clear; on the map and in this panel
        (and on the map's cells layers, see :class:`.SmearKeys`). In the gallery digits assign too,
        and Backspace/Delete leave its highlighted cells out of the selection."""
        self.canvas.key_pressed.connect(self.press_key)
        self.canvas.undo_pressed.connect(self.undo_label)
        in_panel = Qt.ShortcutContext.WidgetWithChildrenShortcut
        QShortcut(QKeySequence.StandardKey.Undo, self, context=in_panel).activated.connect(self.undo_label)
        for key in LABEL_KEYS:
            QShortcut(QKeySequence(key), self, context=in_panel).activated.connect(lambda key=key: self.press_key(key))
            # In the gallery, Delete and Backspace leave the highlighted cells out rather than clear every label.
            in_gallery = (lambda key=key: self.press_key(key)) if key.isdigit() else (
                lambda: self.leave_out(self.gallery.highlighted()))
            QShortcut(QKeySequence(key), self.gallery, context=in_panel).activated.connect(in_gallery)

    def press_key(self, key: str) -> None:
        if key == UNDO_KEY:
            self.undo_label()
            return
        if key == REDO_KEY:
            self.status.value = ("Ctrl+Shift+Z does nothing over the mapped smears: napari's paint redo there would "
                                 "bring back a stroke from before the map and take the map away.")
            return
        name = UNLABELLED if key in ("Backspace", "Delete") else self.class_list.class_for_key(key)
        if name is None:
            n = len(self.class_list.classes)
            self.status.value = (f"No class has the key {key}: only the first ten classes have keys (1-9, 0)."
                                 if n >= 10 else f"No class has the key {key}: the list holds {counted(n, 'class')}.")
            return
        self.assign(name)

    # --- the map --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            pool = self._pooled(embedded_cells_layers(self._viewer))
        except PoolingError as error:
            self._refuse(f"{error}{left_out_words(self._viewer)}")
            return
        unplaced = [layer.name for layer in pool.layers if not set(PLACE_COLUMNS) <= set(layer.features)]
        if unplaced:
            self._refuse(f"The cells of {', '.join(map(repr, unplaced))} have no measurements to show them by (centre, "
                         "size, box): measure them first (Embed cells measures the cells it embeds; in Python, "
                         "napari_reddino.measure_cells).")
            return
        self._pending = pool
        self._started = time.perf_counter()
        self.status.value = f"UMAP of {counted(len(pool), 'cell')} from {counted(len(pool.layers), 'smear')}…"
        self._stop_umap = threading.Event()
        self._start(_umap_job, pool.embeddings, self._umap_epoch.emit, self._stop_umap)

    def _pooled(self, layers, then: str = "Compute map") -> PooledCells:
        """:meth:`PooledCells.from_layers`, refusing cells whose open smear's pixels changed since
        they were embedded (a correction applied to the image in place): their embeddings describe
        pixels that are gone. ``then``: what to do after embedding them again."""
        pool = PooledCells.from_layers(layers)
        if said := self._smears_changed(pool.layers, then):
            raise PoolingError(said)
        return pool

    def _smears_changed(self, layers, then: str = "Compute map") -> str:
        """What to say of the ``layers`` whose open smear's pixels changed since their cells were
        embedded; "" when none did. Smears in memory are hashed (about 80 ms a 48 Mpx smear); one
        read lazily from disk (dask, zarr) is not edited in place, and not read whole for this."""
        changed = [cells.name for cells in layers if (smear := smear_under(self._viewer, cells)) is not None
                   and isinstance(pixels := level_0(smear), np.ndarray) and image_changed_since_embedded(cells, pixels)]
        if not changed:
            return ""
        one = len(changed) == 1
        return (f"The smear{'' if one else 's'} under {', '.join(map(repr, changed))} changed since {'its' if one else 'their'} "
                "cells were embedded (pixels edited in place?), so the embeddings describe the old pixels: embed "
                f"{'it' if one else 'them'} again with Plugins > RedDino > Embed cells, then {then}.")

    def cancel(self) -> None:
        """Stop before the layout; a layout under way cannot be stopped (umap has no hook for it)
        and is dropped when it ends."""
        self._stop_umap.set()
        super().cancel()
        if self._worker is not None:
            self.status.value = "Cancelling: a layout under way runs to its end, then it is dropped…"

    def _on_progress(self, step) -> None:
        self._on_epoch(*step)

    def _on_epoch(self, done: int, total: int) -> None:
        if self._worker is not None:  # else a report queued before the run ended
            self._count(done, total, "UMAP")

    def _failed_job(self) -> str:
        return "The map"

    def _say(self, message: str) -> None:
        self.status.value = message

    def _closed(self) -> None:
        """The panel is gone: so are its colours over the smears and its keys and clicks on them
        (the cells keep their labels and predictions, and a reopened panel maps them again)."""
        super()._closed()
        self.forget_map()
        if self._smear_press in self._viewer.mouse_drag_callbacks:
            self._viewer.mouse_drag_callbacks.remove(self._smear_press)
        self._viewer.layers.events.removed.disconnect(self._on_layer_removed)
        for event in (self._viewer.layers.events.inserted, self._viewer.layers.events.removed):
            event.disconnect(self._on_image_opened_or_closed)
        self.canvas.close_view()
        if self._gallery_docked():
            self._viewer.window.remove_dock_widget(self.gallery)

    def _on_finished(self) -> None:
        worker, xy = self._end_run()
        pool, self._pending = self._pending, None
        if worker is not None and worker.abort_requested:
            self.status.value = "Cancelled; the map is as it was."
        elif xy is None:
            pass  # failed: _on_errored said why
        elif changed := self._changed_since_pooled(pool):
            self.status.value = f"The cells of {changed!r} changed while the map was computed; compute it again."
        else:
            self.show_map(pool, xy)
            twice = "".join(
                f" The smear {smear!r} is mapped twice ({' and '.join(map(repr, names))}): its cells count twice in "
                "the map, the head and the export; remove the layer you do not need."
                for smear, names in pool.smears_mapped_twice().items())
            self.status.value = (f"Map of {counted(len(xy), 'cell')} in {time.perf_counter() - self._started:.1f} s."
                                 f"{twice}{left_out_words(self._viewer)}")
        self.finished.emit()

    def _changed_since_pooled(self, pool: PooledCells) -> str | None:
        """The name of a pooled cells layer that was removed, re-embedded or repainted since ``pool``
        was made (a brush stroke while the map was computed sends no event we hear then)."""
        for position, cells in enumerate(pool.layers):
            if (cells not in self._viewer.layers or stored_fingerprint(cells) != pool.fingerprints[position]
                    or repainted_since_embedded(cells)):
                return cells.name
        return None

    def _map_is_current(self, *, pixels: bool = False) -> bool:
        """False, after saying so, when the map's cells were re-embedded or removed since it was
        made, or (``pixels``, for training and exporting) their smears' pixels changed since they
        were embedded: that hashes every smear, too slow for each label given."""
        if self.pool is not None and (changed := self._changed_since_pooled(self.pool)):
            self._map_is_stale(changed)
            self._refused()
            return False
        if pixels and self.pool is not None and (said := self._smears_changed(self.pool.layers)):
            self.forget_map()
            self.selection_count.value = "No map yet."
            self._refuse(f"{said} The map is removed until then.")
            return False
        return True

    def show_map(self, pool: PooledCells, xy: np.ndarray) -> None:
        """Show ``xy`` (one UMAP point per pooled cell) in the map and colour the smears."""
        self.forget_map()
        self.pool, self.xy = pool, np.asarray(xy, dtype=np.float32)
        self.selected = np.zeros(len(pool), dtype=bool)
        pool.write_columns({"umap_x": self.xy[:, 0], "umap_y": self.xy[:, 1]}, empty=np.nan)
        features = {"layer": [pool.layers[i].name for i in pool.layer_index], "label": pool.label_ids}
        self.canvas.show_points(self.xy, features)
        self._smear_colours = SmearColours(self._viewer, pool)
        self._thumbnails = GalleryThumbnails(self._viewer, pool)
        self._viewer.layers.selection.active = pool.layers[0]
        self._smear_keys.bind([*pool.layers, *self._smear_colours.layers])  # the colours' too, when made active
        for cells in pool.layers:  # new labels (a re-segmentation, a brush edit) or embeddings make the map stale
            cells.events.data.connect(self._on_cells_changed)
            cells.events.paint.connect(self._on_cells_changed)
            cells.events.metadata.connect(self._on_cells_metadata)
            cells.events.set_data.connect(self._on_cells_refreshed)  # an undo or redo says only this
        for column in ("manual_label", "predicted_class"):  # classes given before this panel opened
            for name in pd.unique(pool.column(column, UNLABELLED)):
                if name != UNLABELLED:
                    self.class_list.add_class(str(name))
        self._review_head_on_map()
        self.colour_by.reset_choices()
        self.recolour()

    def _review_head_on_map(self) -> None:
        """Review the panel's head on a new map where it predicted every cell (applied before the
        map was computed, or computed again): in the order its probabilities give."""
        head, pool = self.classifier, self.pool
        if head is None or any(cells.metadata.get(PREDICTED_BY) != self.head_token for cells in pool.layers):
            return
        proba = np.column_stack([pool.column(f"p_{name}") for name in head.classes])
        if np.isfinite(proba).all():  # else some cells were embedded again since
            self._order_review(proba, self._unlike_cells(head, pool)[0] if self._head_applied else None)

    def forget_map(self) -> None:
        """Remove the map's points and smear colours; the cells keep their labels and predictions."""
        if self.pool is not None:
            for cells in self.pool.layers:
                cells.events.data.disconnect(self._on_cells_changed)
                cells.events.paint.disconnect(self._on_cells_changed)
                cells.events.metadata.disconnect(self._on_cells_metadata)
                cells.events.set_data.disconnect(self._on_cells_refreshed)
            self._smear_keys.release()
        if self._smear_colours is not None:
            self._smear_colours.remove()
            self._smear_colours = None
        self.canvas.clear()
        self._smear_table_timer.stop()
        self.smear_table.forget()
        self.pool, self.xy, self._review = None, None, []
        self._label_undo.clear()
        self._uncertain = np.zeros(0, dtype=int)
        self.selected = np.zeros(0, dtype=bool)
        self._thumbnails = None
        self._fill_gallery()
        self.class_list.set_counts(None, None)  # they counted the map's cells

    def _on_layer_removed(self, event) -> None:
        """A mapped cells layer or one of the map's colour layers was removed: the map goes."""
        colours, removed = self._smear_colours, event.value
        if self.pool is None:
            return
        if removed in self.pool.layers:
            name, why = removed.name, "were removed; Compute map to map the smears still open"
        elif colours is not None and removed in colours.layers:
            name = self.pool.layers[colours.layers.index(removed)].name
            why = "lost their map colours (that layer was removed); Compute map to show the map again"
        else:
            return
        # napari may be removing several selected layers, the colours among them: changing the
        # layer list inside its removal loop would break it, so the colours go once it is done.
        self._smear_colours = None
        self._map_is_stale(name, why)
        if colours is not None:  # a lambda: PyQt holds a bound method weakly, and nothing else holds colours
            QTimer.singleShot(0, lambda: colours.remove())

    def _on_image_opened_or_closed(self, event) -> None:
        """The gallery shows a smear's pixels while it is open, each cell's mask otherwise."""
        if isinstance(event.value, Image) and self.pool is not None and self.gallery.isVisible():
            self._fill_gallery()

    def _on_cells_changed(self, event) -> None:
        self._map_is_stale(event.source.name)  # the cells layer whose data or paint event this is

    def _on_cells_refreshed(self, event) -> None:
        """A cells layer was redrawn: after an undo or redo its cells may not be those mapped."""
        if repainted_since_embedded(event.source):
            self._map_is_stale(event.source.name)

    def _on_cells_metadata(self, event) -> None:
        """Embedded again (another model or crop setting): the map shows the old embeddings.
        Segmented again, its labels carried to a new layer: the map shows the old cells."""
        if self.pool is None:
            return
        if newer := segmented_again_as(self._viewer, event.source):
            self._map_is_stale(event.source.name, f"segmented again as {newer!r}: embed that layer, then Compute map")
        elif changed := self._changed_since_pooled(self.pool):
            self._map_is_stale(changed)

    def _map_is_stale(self, name: str, why: str = "changed; embed them again, then Compute map") -> None:
        self.forget_map()
        self.status.value = f"The cells of {name!r} {why}."
        self.selection_count.value = "No map yet."

    def _colour_choices(self, _widget=None) -> list[str]:
        """The classes, then the measurements of any mapped smear (a gray smear lacks the colour
        ones; its cells are uncoloured by them), numbers wherever a smear has them."""
        tables = [layer.features for layer in self.pool.layers] if self.pool is not None else []
        columns = dict.fromkeys(c for table in tables for c in table.columns if c not in ("label", "index"))
        numeric = [c for c in columns if all(table[c].dtype.kind in "fiu" for table in tables if c in table)]
        return [MANUAL, PREDICTED, *numeric]

    def point_colours(self) -> np.ndarray:
        """(n, 4) colour of every point, by the chosen column, before selection dimming."""
        mode = self.colour_by.value
        if mode in (MANUAL, PREDICTED):
            column = "manual_label" if mode == MANUAL else "predicted_class"
            return class_colours(self.pool.column(column, UNLABELLED), self.class_list.colours)
        return value_colours(self.pool.column(mode), ensure_colormap("viridis"))

    def recolour(self, *_) -> None:
        """Recompute every cell's colour (colour-by, classes or labels changed) and the class counts."""
        if self.pool is None:
            return
        self._colours = self.point_colours()
        self.canvas.set_colours(self._colours)
        self._paint()
        manual, predicted = (pd.Series(self.pool.column(name, UNLABELLED)).value_counts().to_dict()
                             for name in ("manual_label", "predicted_class"))
        self.class_list.set_counts(manual, predicted)
        self._smear_table_timer.start()

    def _show_smear_table(self) -> None:
        if self.pool is not None:
            self.smear_table.show_summary(summarise_smears(self.pool.layers, self.class_list.classes))

    def _paint(self) -> None:
        """Show the selection on the map and the smears: bright, the rest dimmed."""
        self.canvas.show_selection(self.selected)
        self._smear_colours.paint(emphasise(self._colours, self.selected) * [1, 1, 1, SMEAR_FILL_ALPHA])
        count = int(self.selected.sum())
        self.selection_count.value = f"{count:,} of {len(self.pool):,} cells selected" if count else (
            f"{counted(len(self.pool), 'cell')}; lasso or click cells to select")
        if self.gallery.isVisible():  # else it fills when shown
            self._fill_gallery()

    # --- selection ------------------------------------------------------------------------

    def select(self, mask: np.ndarray) -> None:
        """Make the points in ``mask`` (a boolean array over the map's points) the selection."""
        if self.pool is None:
            return
        self.selected = np.asarray(mask, dtype=bool).copy()
        self._paint()

    def select_class(self, name: str | None) -> None:
        """Select every cell of class ``name``: its manual label, else the head's prediction (the
        class the smear table counts it as)."""
        if self.pool is None:
            self.status.value = "No map yet: Compute map, then select the cells of a class."
            return
        if name is None:
            self.status.value = "Choose a class in the list first."
            return
        manual = self.pool.column("manual_label", UNLABELLED)
        by_hand = manual == name
        by_head = (manual == UNLABELLED) & (self.pool.column("predicted_class", UNLABELLED) == name)
        self._review = []  # as for a lasso
        self.select(by_hand | by_head)
        count = int(by_hand.sum() + by_head.sum())
        self.status.value = (f"{counted(count, 'cell')} of {name!r} selected: {int(by_hand.sum()):,} labelled by hand, "
                             f"{int(by_head.sum()):,} predicted." if count else f"No cell is {name!r} yet.")

    def _on_lasso(self, mask: np.ndarray) -> None:
        self._review = []  # the user chose cells: labelling them does not jump to a reviewed one
        self.select(mask)

    def select_cell(self, layer: Labels, label: int, *, add: bool = False) -> int | None:
        """Select the cell ``label`` of ``layer`` (shift-click: add it, or take it out when selected); return its point, or None."""
        if self.pool is None or layer not in self.pool.layers:
            return None
        self._review = []  # as for a lasso
        points = self.pool.points_of(self.pool.layers.index(layer), [label])
        if not len(points):
            return None
        mask = self.selected.copy() if add else np.zeros(len(self.pool), dtype=bool)
        mask[points[0]] = not (add and self.selected[points[0]])
        self.select(mask)
        if self.centre_on_click.value:
            self.canvas.centre_on(int(points[0]))
        return int(points[0])

    def _on_smear_press(self, viewer, event):
        """A click on a smear (press and release without a drag, pan/zoom mode) selects that cell."""
        active = viewer.layers.selection.active
        if self.pool is None or getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return
        yield
        if event.type == "mouse_move" or self._smear_colours is None:  # a drag, or the map went meanwhile
            return
        if (unmapped := self._smear_colours.unmapped_on_top(event.position)) is not None:
            newer = carried_to(self._viewer, unmapped) if isinstance(unmapped, Labels) else None
            self.status.value = (f"{unmapped.name!r} is not on the map: " + (
                f"its labels went to {newer.name!r} when the smear was segmented again; hide it to pick the cells "
                "under it." if newer is not None else "embed its cells and Compute map to pick them here, or hide "
                "it to pick the cells of the smear under it."))
        elif (hit := self._smear_colours.cell_at(event.position)) is not None:
            self.select_cell(*hit, add="Shift" in event.modifiers)
        elif (behind := self._smear_colours.cell_at(event.position, hidden=True)) is not None:
            cells = behind[0]
            hidden = [layer.name for layer in (cells, self._smear_colours.layers[self.pool.layers.index(cells)])
                      if not layer.visible]
            verb, pronoun = ("are", "them") if len(hidden) > 1 else ("is", "it")
            self.status.value = (f"A cell of {cells.name!r} is there, but {' and '.join(map(repr, hidden))} {verb} "
                                 f"hidden: show {pronoun} to pick its cells in the smear.")

    def _on_point_clicked(self, point: int, add: bool) -> None:
        position = int(self.pool.layer_index[point])
        self.select_cell(self.pool.layers[position], int(self.pool.label_ids[point]), add=add)
        self._reveal(point)

    def _reveal(self, point: int) -> None:
        """Show the cell of ``point`` in its smear, saying which layers that hid."""
        uncovered = self._show_cell_in_smear(point)
        if uncovered and self.pool is not None:  # showing a hidden smear may have shown it changed
            self.status.value = f"Showing the cell's smear{uncovered}."

    def _show_cell_in_smear(self, point: int) -> str:
        """Centre the smear view on the cell of ``point``, on top of any smear that covered it;
        says which layers were hidden for it ("" when none). Showing a hidden cells layer redraws
        it, and a layer undone while hidden is then found changed: the map is dropped meanwhile."""
        position, label = int(self.pool.layer_index[point]), int(self.pool.label_ids[point])
        cells = self.pool.layers[position]
        hidden = self._smear_colours.uncover(position)
        row = cells.features.set_index("label").loc[label]
        self._viewer.scene.camera.center = tuple(cells.data_to_world([row["centroid_y"], row["centroid_x"]]))
        diameter = float(row["equivalent_diameter_px"]) * float(np.max(cells.scale))
        self._viewer.scene.camera.zoom = max(self._viewer.scene.camera.zoom, MIN_CELL_ON_SCREEN_PX / max(diameter, 1e-6))
        return f" (hid {', '.join(map(repr, hidden))}, which lay over it)" if hidden else ""

    # --- the gallery ----------------------------------------------------------------------

    def show_gallery(self) -> None:
        """Dock the gallery of the selected cells under the smear (or bring it forward)."""
        if not self._gallery_docked():
            self._viewer.window.add_dock_widget(self.gallery, name=GALLERY_NAME, area="bottom")
        dock = self.gallery.parent()
        dock.show()  # hidden through napari's Window menu, say
        dock.raise_()  # the tab in front, when tabbed; coming into view fills it (CellGallery.shown)

    def _gallery_docked(self) -> bool:
        return self.gallery.parent() is not None  # napari unparents it when its panel is closed

    def _fill_gallery(self) -> None:
        if self.pool is None:
            self.gallery.show_cells([], "No map yet: Compute map, then select cells to see them here.")
            return
        points = self._thumbnails.shown(self.selected)
        cells = self._thumbnails.entries(points, self.class_list.colours)
        self.gallery.show_cells(cells, gallery_heading(len(points), int(self.selected.sum())))

    def _on_gallery_click(self, point: int) -> None:
        """Show the cell in its smear and on the map; the selection stays as it is."""
        if self.pool is None:
            return
        if self.centre_on_click.value:
            self.canvas.centre_on(point)
        self._reveal(point)

    def leave_out(self, points: list[int]) -> None:
        """Take ``points`` out of the selection (cells in the gallery that do not belong with the rest)."""
        if self.pool is None or not points:
            return
        self._review = []  # as for a lasso: the user chose the cells
        mask = self.selected.copy()
        mask[np.asarray(points, dtype=int)] = False
        self.select(mask)

    # --- labels and the head --------------------------------------------------------------

    def assign(self, name: str | None) -> None:
        """Give the selected cells class ``name`` ("" clears their label)."""
        if self.pool is None:
            self.status.value = "No map yet: Compute map, then select cells on it or in a smear to label them."
            return
        if name is None:
            self.status.value = "Choose a class in the list first."
            return
        if not self.selected.any():
            self.status.value = "No cells selected: lasso them on the map, or click them in the smear."
            return
        for position in np.unique(self.pool.layer_index[self.selected]):  # a hidden layer's undo says nothing
            cells = self.pool.layers[position]
            if not cells.visible and repainted_since_embedded(cells):
                self._map_is_stale(cells.name)
                return
        points = np.flatnonzero(self.selected)
        before = self.pool.column("manual_label", UNLABELLED)[points]
        changed = before != name
        if name:
            others = int((changed & (before != UNLABELLED)).sum())
            done = f"{counted(len(points), 'cell')} labelled {name!r}" + (
                f" ({others} of them had another label; Undo label takes this back)." if others else ".")
        else:
            done = f"Label cleared from {counted(int((before != UNLABELLED).sum()), 'cell')}."
        if changed.any():
            self._label_undo = [*self._label_undo[-UNDO_STEPS + 1:], (points[changed], before[changed])]
        self.pool.write("manual_label", name, points)
        self.recolour()
        self.status.value = done
        if self._review:  # labelling a reviewed cell moves on to the next one
            self.review_next()
            self.status.value = f"{done} {self.status.value}"

    def undo_label(self) -> None:
        """Give the cells of the last labelling that changed labels (Assign, Clear label, a key)
        the labels they had before it."""
        if not self._label_undo:
            self.status.value = ("Nothing to undo: no labels were given or cleared on this map since it was computed "
                                 "(or since a class was renamed or removed, or labels were imported).")
            return
        if not self._map_is_current():
            return
        points, before = self._label_undo.pop()
        for label in pd.unique(before):
            self.pool.write("manual_label", label, points[before == label])
        self.recolour()
        verb = "has its label" if len(points) == 1 else "have their labels"
        self.status.value = f"Undone: {counted(len(points), 'cell')} {verb} of before again."

    def _rename_class(self, old: str, new: str) -> None:
        """Rename the class in the head and on every cells layer of the viewer, mapped or not,
        so no cell keeps a label that the class list no longer has."""
        if self.classifier is not None:
            self.classifier.rename_classes({old: new})
        self._label_undo.clear()  # it would bring back the old name
        self._replace_class(old, new, ("manual_label", "predicted_class"), {f"p_{old}": f"p_{new}"})
        for cells in self._viewer.layers:  # which p_ columns a head wrote: cleared with its predictions
            predicted = cells.metadata.get(PREDICTED_CLASSES, []) if isinstance(cells, Labels) else []
            if old in predicted:
                cells.metadata[PREDICTED_CLASSES] = [new if name == old else name for name in predicted]
        self.colour_by.reset_choices()

    def _replace_class(self, old: str, new: str, columns: tuple[str, ...], renamed_columns=None) -> None:
        """Write ``new`` where ``columns`` say ``old`` in the table of every cells layer of the
        viewer (and rename ``renamed_columns``): one assignment per table that changes, since
        each one re-validates the table and repaints."""
        for cells in self._viewer.layers:
            if not isinstance(cells, Labels):
                continue
            table = cells.features
            changed = table.rename(columns=renamed_columns or {})
            for column in columns:
                carrying = class_names(changed, column) == old
                if carrying.any():  # as text: a categorical column takes no new class
                    changed[column] = changed[column].astype(object).where(~carrying, new)
            if not changed.equals(table):
                cells.features = changed

    def _remove_class(self, name: str) -> None:
        """Remove a class from the list, once confirmed where cells carry it: cells labelled with it
        lose that label, and predictions that include it (a head's probabilities are shares among
        its classes) are cleared, with the panel's head if it has the class."""
        layers = cells_layers(self._viewer)

        def carrying(cells, column: str) -> int:
            return int((class_names(cells.features, column) == name).sum())

        labelled = sum(carrying(cells, "manual_label") for cells in layers)
        predicted = [cells for cells in layers if f"p_{name}" in cells.features or carrying(cells, "predicted_class")]
        head = self.classifier is not None and name in self.classifier.classes
        will, did = [], []  # what removing it does, asked before and said after
        if labelled:
            cells_text = f"{counted(labelled, 'cell')} labelled {name!r}"
            will.append(f"{cells_text} will be unlabelled")
            did.append(f"{cells_text} {'is' if labelled == 1 else 'are'} unlabelled")
        if predicted or head:
            what = f"the predictions that include {name!r}"
            will.append(f"{what} will be cleared")
            did.append(f"{what} are cleared (train the head again without it)")
        question = "; ".join(will)
        if will and QMessageBox.question(
            self, "Remove class?", f"{question[:1].upper()}{question[1:]}. Remove {name!r}?"
        ) != QMessageBox.StandardButton.Yes:
            return
        self._replace_class(name, UNLABELLED, ("manual_label",))
        self._label_undo.clear()  # it would bring back the class
        for cells in predicted:
            table = cells.features
            cells.features = table.drop(columns=[*self._probability_columns(cells),
                                                 *({"predicted_class", "prediction_probability"} & set(table))])
        if head:
            self.classifier, self.head_token, self._review, self._uncertain = None, None, [], np.zeros(0, dtype=int)
        key = key_of(self.class_list.classes.index(name))
        self.class_list.remove(name)
        self.colour_by.reset_choices()
        if key and (now := self.class_list.class_for_key(key)) is not None:  # a key pressed from habit labels it
            did.append(f"the classes below it moved up a key: {key} is {now!r} now")
        self.status.value = f"Class {name!r} removed" + (f"; {'; '.join(did)}." if did else ".")
