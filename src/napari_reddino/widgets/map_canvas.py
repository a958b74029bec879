"""The cell map's own canvas: a second napari canvas (``napari.qt.QtViewer``) docked beside the smear.

It holds three layers of its own ``ViewerModel``: the "cell map" Points layer (one point per
cell, ``features`` = its cells layer and label id), the "selected cells" Points layer that rings
the selection, and a "lasso" Shapes layer in which a free-hand polygon selects points. A canvas
of its own keeps its own camera: zooming into a cell of the smear does not throw the map out of
view, and the map's points never overlap the smear.

The panel that holds the map can be closed but not floated or dragged elsewhere. Either takes
the panel out of napari's window for a moment, Qt makes a new OpenGL context for the canvas, and
vispy draws with the objects of the old one: GL errors on every frame, and under Linux's Mesa a
crash of napari (vispy issue 1759; napari issue 9464 shows the same for napari's own histogram).
"""

import weakref

import numpy as np
import pandas as pd
from napari.components import ViewerModel
from napari.qt import QtViewer
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QDockWidget, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from ..cell_map import points_in_polygon

POINT_SIZE_FRACTION = 1 / 50  # point diameter relative to the map's extent
MAP_DIM_OPACITY = 0.35  # the points outside a selection, still visible as context
CLICK_RADIUS_POINTS = 1.5  # a click this many drawn point diameters from a point picks it
DRAWN_SIZE_LIMITS = (4, 40)  # a point's diameter at any zoom, in device pixels (half as many logical on HiDPI)
LABEL_KEYS = {getattr(Qt.Key, f"Key_{digit}"): str(digit) for digit in range(10)} | {
    Qt.Key.Key_Backspace: "Backspace", Qt.Key.Key_Delete: "Delete"}
MIN_HEIGHT = 200  # px: usable, and with Segment and Embed tabbed beside it napari's window needs 764 px


def map_coordinates(xy: np.ndarray) -> np.ndarray:
    """UMAP (x, y) to napari (row, column), with y pointing up as in a plot."""
    xy = np.asarray(xy, dtype=np.float32)
    return np.column_stack([-xy[:, 1], xy[:, 0]]) if len(xy) else np.empty((0, 2), np.float32)


def _forgetter(canvas: "MapCanvas"):
    """When Qt deletes the map's QtViewer (its window closed), drop the Python reference too.

    napari's main window keeps its dock widgets' Python objects; without this the map's QtViewer
    would outlive its window (napari's test fixture counts that as a leak).
    """
    reference = weakref.ref(canvas)

    def forget(*_):
        canvas = reference()
        if canvas is not None:
            canvas.qt_viewer = None

    return forget


def keep_docked(dock: QDockWidget) -> None:
    """Let ``dock`` be closed only: not floated, not dragged (see the module docstring), and
    without napari's float button, which napari makes again with each new title bar."""
    dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetClosable)

    def hide_float_button(*_) -> None:
        button = getattr(dock.titleBarWidget(), "float_button", None)
        if button is not None:
            button.hide()

    hide_float_button()
    dock.dockLocationChanged.connect(hide_float_button)  # after napari's own handler, which makes the title bar


class MapCanvas(QWidget):
    """The UMAP view: show points, colour them, lasso them, click them."""

    lassoed = Signal(object)  # bool mask over the points inside the drawn polygon
    point_clicked = Signal(int, bool)  # point index, whether shift was held
    key_pressed = Signal(str)  # a digit, Backspace or Delete typed on the map
    undo_pressed = Signal()  # Ctrl+Z (the platform's Undo) on the map

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = ViewerModel(title="Cell map")
        self.qt_viewer = QtViewer(self.model)
        self.points = None
        self.selection = None
        self.lasso = self.model.add_shapes(
            name="lasso", ndim=2, edge_color="yellow", face_color=[1, 1, 0, 0.15], edge_width=0.02
        )
        self.lasso.events.data.connect(self._on_lasso_drawn)
        self.model.mouse_drag_callbacks.append(self._on_press)
        self.qt_viewer.canvas.native.installEventFilter(self)
        self.qt_viewer.destroyed.connect(_forgetter(self))

        self.lasso_button = QPushButton("Lasso")
        self.lasso_button.setCheckable(True)
        self.lasso_button.setToolTip("Draw around points to select their cells (free-hand polygon)")
        self.lasso_button.toggled.connect(self._set_lasso_mode)
        self.fit_button = QPushButton("Fit view")
        self.fit_button.clicked.connect(self.model.reset_view)
        tools = QHBoxLayout()
        tools.addWidget(self.lasso_button)
        tools.addWidget(self.fit_button)
        tools.addStretch()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(tools)
        layout.addWidget(self.qt_viewer, stretch=1)
        self.setMinimumHeight(MIN_HEIGHT)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        dock = self.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        if dock is not None and dock.features() != QDockWidget.DockWidgetFeature.DockWidgetClosable:
            keep_docked(dock)

    @property
    def coordinates(self) -> np.ndarray:
        return self.points.data if self.points is not None else np.empty((0, 2))

    def close_view(self) -> None:
        """Close the map's QtViewer (its vispy canvas and GL context) now, at a quiet moment,
        rather than whenever Python's garbage collector drops a closed panel: a GL canvas deleted
        while napari is busy with its own canvas can crash the process."""
        if self.qt_viewer is not None:
            self.clear()
            self.qt_viewer.close()
            self.qt_viewer.deleteLater()

    def clear(self) -> None:
        for layer in (self.points, self.selection):
            if layer is not None:
                self.model.layers.remove(layer)
        self.points = self.selection = None

    def show_points(self, xy: np.ndarray, features: pd.DataFrame) -> None:
        """Replace the map's points by ``xy`` (UMAP x, y per cell), one row of ``features`` each."""
        data = map_coordinates(xy)
        extent = float(np.ptp(data, axis=0).max()) if len(data) > 1 else 1.0
        self.clear()
        style = {"size": max(extent, 1e-6) * POINT_SIZE_FRACTION, "canvas_size_limits": DRAWN_SIZE_LIMITS}
        self.points = self.model.add_points(data, name="cell map", features=features, border_width=0, **style)
        self.selection = self.model.add_points(
            np.empty((0, 2)), name="selected cells", face_color="transparent", border_width=0.3,
            border_color="white", **style
        )
        for layer in (self.selection, self.points):  # the lasso stays on top
            self.model.layers.move(self.model.layers.index(layer), 0)
        self.model.reset_view()
        self.model.layers.selection.active = self.lasso

    def set_colours(self, colours: np.ndarray) -> None:
        """Face colour of every point (a full Points update: only when the colours change; the
        selection's rings take theirs when it is shown again)."""
        if self.points is not None:
            self.points.face_color = colours

    def show_selection(self, selected: np.ndarray) -> None:
        """Ring the selected points in white, filled with their own colours made opaque (an
        unlabelled cell's grey too, as the smears show a selection), and fade the rest of the map
        (one opacity, not n colours).

        napari rebuilds every point of a layer on any per-point change (~0.1 s at 50,000 points), so
        a selection replaces only the layer of rings (positions, then colours: 10-55 ms more than
        the positions alone for 5-100 % of 52,000 points; benchmarks/RESULTS.md) and the big
        layer's opacity.
        """
        if self.points is None:
            return
        self.selection.data = self.points.data[selected]
        if selected.any():  # napari takes no colours for no points (it warns, and whitens them)
            self.selection.face_color = self.points.face_color[selected] * [1, 1, 1, 0] + [0, 0, 0, 1]
        self.points.opacity = MAP_DIM_OPACITY if selected.any() else 1.0

    def centre_on(self, index: int) -> None:
        self.model.scene.camera.center = tuple(self.coordinates[index])

    def screenshot(self) -> np.ndarray:
        return self.qt_viewer.screenshot(flash=False)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        """Digits (the number row's or the keypad's), Backspace and Delete on the map are labelling
        keys, not napari's layer-mode keys; Undo undoes a labelling."""
        if event.type() in (QEvent.Type.ShortcutOverride, QEvent.Type.KeyPress):
            if event.matches(QKeySequence.StandardKey.Undo):
                if event.type() == QEvent.Type.KeyPress:
                    self.undo_pressed.emit()
                event.accept()
                return True
            key = LABEL_KEYS.get(event.key())
            if key is not None and not event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier:
                if event.type() == QEvent.Type.KeyPress:
                    self.key_pressed.emit(key)
                event.accept()
                return True
        return super().eventFilter(watched, event)

    def _set_lasso_mode(self, on: bool) -> None:
        self.model.layers.selection.active = self.lasso
        self.lasso.mode = "add_polygon_lasso" if on else "pan_zoom"

    def select_polygon(self, polygon: np.ndarray) -> None:
        """Select the points inside ``polygon`` ((m, 2) in map row/column), as a drawn lasso does."""
        self.lassoed.emit(points_in_polygon(self.coordinates, polygon))

    def _on_lasso_drawn(self, event) -> None:
        if getattr(event, "action", "added") != "added" or not len(self.lasso.data):
            return
        polygon = np.asarray(self.lasso.data[-1])
        QTimer.singleShot(0, self._clear_lasso)  # not while the Shapes layer is still handling its event
        self.select_polygon(polygon)

    def _clear_lasso(self) -> None:
        if len(self.lasso.data):
            self.lasso.data = []

    def _on_press(self, model, event):
        """A click (press and release without dragging) in pan/zoom mode picks the nearest point."""
        if self.points is None or self.lasso.mode != "pan_zoom" or not len(self.coordinates):
            return
        yield
        if event.type == "mouse_move":
            return  # a drag pans the map
        distances = np.linalg.norm(self.coordinates - np.asarray(event.position)[-2:], axis=1)
        nearest = int(np.argmin(distances))
        zoom = self.model.scene.camera.zoom  # logical screen px per map unit
        ratio = self.qt_viewer.devicePixelRatioF() if self.qt_viewer is not None else 1.0  # vispy clamps in device px
        drawn = np.clip(float(np.mean(self.points.size)) * zoom * ratio, *DRAWN_SIZE_LIMITS) / ratio
        if distances[nearest] * zoom <= CLICK_RADIUS_POINTS * drawn:
            self.point_clicked.emit(nearest, "Shift" in event.modifiers)
