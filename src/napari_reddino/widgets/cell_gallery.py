"""The selected cells side by side: a panel the Cell map docks under the smear on request.

A lasso on the map picks cells that lie together in RedDino's embedding space; before they get
a class, the lab wants to see them. In the smears they are scattered (over several smears,
once pooled); here they sit in one grid, each with its class. Clicking one shows it in its
smear; cells that do not belong can be left out of the selection before the number key labels
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from napari.layers import Image
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..cell_map import UNLABELLED, PooledCells
from ..cell_thumbnails import THUMBNAIL_PX, cell_thumbnail
from ..cell_embeddings import crop_settings
from ..crop_windows import chosen_crops, square_windows
from ..smear_summary import OVERLAPPING_OUTLINE
from ..wording import counted
from .smear_links import level_0, smear_under

POINT_ROLE = Qt.ItemDataRole.UserRole
MAX_CELLS = 120  # a larger selection is shown as a random sample of this many
NO_CLASS_OUTLINE = (255, 255, 255)


@dataclass(frozen=True)
class GalleryCell:
    point: int  # the cell's point on the map
    thumbnail: np.ndarray  # (THUMBNAIL_PX, THUMBNAIL_PX, 3) uint8
    caption: str
    tooltip: str


def _pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb)
    height, width = rgb.shape[:2]
    image = QImage(rgb.data, width, height, 3 * width, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # the copy owns its pixels; rgb may go


class CellGallery(QWidget):
    """A grid of cell thumbnails with captions; says which cell was clicked and which to leave out."""

    cell_clicked = Signal(int)  # a point of the map (a plain click: Ctrl and Shift only highlight)
    leave_out = Signal(list)  # points to take out of the selection
    shown = Signal()  # the panel came into view (opened, or its tab brought forward)

    def __init__(self) -> None:
        super().__init__()
        self.heading = QLabel("Select cells on the map or in a smear to see them here.")
        self.heading.setWordWrap(True)
        self.grid = QListWidget()
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setMovement(QListView.Movement.Static)
        self.grid.setUniformItemSizes(True)
        self.grid.setWordWrap(True)
        self.grid.setIconSize(QSize(THUMBNAIL_PX, THUMBNAIL_PX))
        self.grid.setGridSize(QSize(THUMBNAIL_PX + 16, THUMBNAIL_PX + 36))
        self.grid.setMinimumHeight(THUMBNAIL_PX + 48)  # a whole row with its captions
        self.grid.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.grid.itemClicked.connect(self._on_click)
        self.leave_out_button = QPushButton("Leave the highlighted out")
        self.leave_out_button.setToolTip("Take the highlighted cells out of the selection (Delete)")
        self.leave_out_button.setEnabled(False)
        self.leave_out_button.clicked.connect(lambda: self.leave_out.emit(self.highlighted()))
        self.grid.itemSelectionChanged.connect(
            lambda: self.leave_out_button.setEnabled(bool(self.grid.selectedItems())))
        top = QHBoxLayout()
        top.addWidget(self.heading, stretch=1)
        top.addWidget(self.leave_out_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.grid)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.shown.emit()

    def _on_click(self, item: QListWidgetItem) -> None:
        if not QApplication.keyboardModifiers() & (Qt.KeyboardModifier.ControlModifier
                                                   | Qt.KeyboardModifier.ShiftModifier):
            self.cell_clicked.emit(int(item.data(POINT_ROLE)))

    def show_cells(self, cells: list[GalleryCell], heading: str) -> None:
        """Show ``cells`` in this order under ``heading``; cells shown before stay highlighted,
        and the grid stays scrolled where it was."""
        kept = set(self.highlighted())
        scrolled = self.grid.verticalScrollBar().value()
        self.grid.clear()
        for cell in cells:
            item = QListWidgetItem(QIcon(_pixmap(cell.thumbnail)), cell.caption)
            item.setData(POINT_ROLE, cell.point)
            item.setToolTip(cell.tooltip)
            item.setTextAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
            self.grid.addItem(item)
            item.setSelected(cell.point in kept)
        self.heading.setText(heading)
        self.grid.doItemsLayout()  # the scroll range of the new items, before scrolling back
        self.grid.verticalScrollBar().setValue(scrolled)

    def points(self) -> list[int]:
        """The map points shown, in order."""
        return [int(self.grid.item(row).data(POINT_ROLE)) for row in range(self.grid.count())]

    def highlighted(self) -> list[int]:
        return sorted(int(item.data(POINT_ROLE)) for item in self.grid.selectedItems())


def gallery_heading(shown: int, selected: int) -> str:
    if not selected:
        return "Select cells on the map or in a smear to see them here."
    what = (counted(selected, "selected cell") if shown == selected
            else f"{shown:,} of the {selected:,} selected cells, picked at random")
    return (f"{what}. Click one to show it in its smear; Ctrl- or Shift-click to highlight, Delete to leave the "
            "highlighted out of the selection; number keys label the whole selection.")


class GalleryThumbnails:
    """The gallery's entries for the points of one map. A thumbnail is kept while it is shown and
    cut anew when its outline colour, its smear layer or that layer's contrast changes."""

    def __init__(self, viewer, pool: PooledCells) -> None:
        self._viewer, self._pool = viewer, pool
        boxes = np.column_stack([pool.column(f"bbox_{edge}") for edge in ("min_x", "min_y", "max_x", "max_y")])
        self._windows = np.concatenate(  # each smear's cells sized among themselves, as the model's crops
            [square_windows(boxes[pool.span(position)], crops["margin"], crops["scale"])
             for position, crops in enumerate(chosen_crops(trained=crop_settings(layer)) for layer in pool.layers)]
        ).reshape(-1, 4)
        self._diameters = pool.column("equivalent_diameter_px")
        self._outline_shared = pool.column("outline_shared")
        self._sample_order = np.random.default_rng(0).permutation(len(pool))  # one per map: see shown
        self._made: dict[tuple, np.ndarray] = {}

    def shown(self, selected: np.ndarray) -> np.ndarray:
        """The selected points the gallery shows, in map order: all, or :data:`MAX_CELLS` of them
        picked at random once per map, so that a cell left out or added changes one thumbnail,
        not the whole sample."""
        points = np.flatnonzero(selected)
        if len(points) > MAX_CELLS:
            points = np.sort(points[np.argsort(self._sample_order[points], kind="stable")[:MAX_CELLS]])
        return points

    def entries(self, points: np.ndarray, palette: dict[str, np.ndarray]) -> list[GalleryCell]:
        pool = self._pool
        manual, predicted = pool.column("manual_label", UNLABELLED), pool.column("predicted_class", UNLABELLED)
        probability = pd.to_numeric(pd.Series(pool.column("prediction_probability")), errors="coerce").to_numpy(float)
        looks = [self._look(cells) for cells in pool.layers]
        entries, made = [], {}
        for point in map(int, points):
            position, label = int(pool.layer_index[point]), int(pool.label_ids[point])
            if manual[point] != UNLABELLED:
                name, caption, kind = manual[point], str(manual[point]), "manual label"
            elif predicted[point] != UNLABELLED:
                name, kind = predicted[point], "predicted class"
                caption = f"{name} ({probability[point]:.0%})" if np.isfinite(probability[point]) else str(name)
            else:
                name, caption, kind = UNLABELLED, "no class", "no class yet"
            outline = tuple(np.round(palette[name][:3] * 255).astype(int)) if name in palette else NO_CLASS_OUTLINE
            tooltip = (f"{pool.layers[position].name}, cell {label}\n{kind}: {caption}\n"
                       f"diameter {self._diameters[point]:.1f} px{_overlap(self._outline_shared[point])}")
            image, contrast_limits = looks[position]
            # A reopened image or new contrast: cut anew. The layer itself, not its id: the plugin's
            # viewer hands out a new proxy of it each time, equal to the others (and hashed alike).
            key = (point, outline, image, contrast_limits)
            made[key] = self._made.get(key)
            if made[key] is None:
                made[key] = cell_thumbnail(
                    None if image is None else level_0(image), np.asarray(pool.layers[position].data), label,
                    self._windows[point], contrast_limits=contrast_limits, outline=outline,
                )
            entries.append(GalleryCell(point, made[key], caption, tooltip))
        self._made = made  # only those shown: a day of lassos on a large map would pile up otherwise
        return entries

    def _look(self, cells) -> tuple[Image | None, tuple[float, ...]]:
        """The smear under ``cells`` and its contrast limits, as napari draws it now."""
        image = smear_under(self._viewer, cells)
        return image, (0.0, 1.0) if image is None else tuple(map(float, image.contrast_limits))


def _overlap(shared: float) -> str:
    """For a cell's tooltip: whether it overlaps a neighbour (see ``smear_summary.OVERLAPPING_OUTLINE``)."""
    if not shared >= OVERLAPPING_OUTLINE:  # NaN too: measured before outline_shared existed
        return ""
    return (f"\noverlaps a neighbour: {shared:.0%} of its outline is against it, where the segmentation "
            "split them")


