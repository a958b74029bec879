"""The editable list of morphology classes: name, colour, key, and how many cells each holds.

Each class also has an id that stays with it through renames and moves (``id_of``,
``name_of``): a head saved in this session records its classes' ids, so applied after a rename,
even a swap of two names, it predicts each class under the name it has now.
"""

import colorsys
import itertools
import uuid
import weakref
from collections.abc import Mapping

import numpy as np
from napari.utils.colormaps.standardize_color import transform_color
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QColorDialog,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

# The Chula RBC-12 classes a hematology lab names most often, with colours far apart (CIEDE2000
# 15 or more), from the grey of unlabelled cells, and from the map's black and its white ring.
DEFAULT_CLASSES = {
    "normal": "#4daf4a",
    "macrocyte": "#377eb8",
    "microcyte": "#a6cee3",
    "spherocyte": "#e41a1c",
    "target cell": "#ff7f00",
    "stomatocyte": "#984ea3",
    "ovalocyte": "#f781bf",
    "teardrop": "#a65628",
    "burr cell": "#ffff33",
    "schistocyte": "#20b2aa",
    "hypochromia": "#b2df8a",
    "elliptocyte": "#fb9a99",
    "other": "#e6ab02",
}
# For classes added later (a new class, a colleague's labels, a saved head's), each the farthest
# (CIEDE2000) from those before it and the defaults: 12.6 or more apart; then round the hue circle.
NEW_CLASS_COLOURS = ("#00ffff", "#ff00ff", "#c5b0d5", "#7b68ee", "#e7298a", "#bcbd22", "#00ff7f", "#7fffd4",
                     "#ffbb78", "#ff6347", "#adff2f", "#1b9e77")
KEY, NAME, LABELLED, PREDICTED = range(4)
KEY_TIP = "Double-click to change the colour"


# The last list of each viewer's Cell map: a panel closed and opened again keeps its classes' names,
# order (so their keys), colours and ids. By id: viewers compare equal by value.
_REMEMBERED: dict[int, tuple[weakref.ref, dict[str, str], dict[str, str]]] = {}


def remember_classes(viewer, class_list: "ClassList") -> None:
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a proxy, new objects on every access
    _REMEMBERED[id(viewer)] = (weakref.ref(viewer), class_list.hex_colours, class_list.ids)


def remembered_classes(viewer) -> tuple[dict[str, str], dict[str, str]] | None:
    """The colours and ids of the classes ``viewer``'s last Cell map listed, in its order; None if none did."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    viewer_of, colours, ids = _REMEMBERED.get(id(viewer), (lambda: None, {}, {}))
    return (colours, ids) if viewer_of() is viewer else None


def key_of(row: int) -> str:
    """Keys 1-9 then 0 assign the first ten classes."""
    return str((row + 1) % 10) if row < 10 else ""


def _hue_circle():
    """Saturated colours a golden angle apart round the hue circle, never grey: for a class list
    longer than the palettes."""
    for step in itertools.count():
        red, green, blue = colorsys.hsv_to_rgb(step * 0.618034 % 1, 0.75, 0.95)
        yield f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


class ClassList(QWidget):
    changed = Signal()  # a class was added, removed, renamed or recoloured
    renamed = Signal(str, str)  # old name, new name
    refused = Signal(str)  # why an edit was undone, for the owner's status line
    remove_requested = Signal(str)  # Remove was clicked on this class; the owner decides (remove())

    def __init__(self, classes: Mapping[str, str] = DEFAULT_CLASSES, ids: Mapping[str, str] | None = None,
                 parent: QWidget | None = None):
        """``classes``: name and colour of each class, in order; ``ids``: their ids, where known."""
        super().__init__(parent)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Key", "Class", "Labelled", "Predicted"])
        every_cell = ("every cell of the map, those cut by the image border too (the per-smear table counts whole "
                      "cells only, as at the microscope)")
        self.table.horizontalHeaderItem(LABELLED).setToolTip(f"Cells labelled with this class by hand: {every_cell}")
        self.table.horizontalHeaderItem(PREDICTED).setToolTip(
            f"Cells the head predicts to be of this class, those labelled by hand too (the per-smear table and Select "
            f"class take a cell's label, else its prediction): {every_cell}")
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)  # the name gets the room left
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self._names: list[str] = []  # what the names were before an edit
        self.removed_ids: set[str] = set()  # of the classes removed: a head's class of one is no class of the list
        self.table.cellDoubleClicked.connect(self._on_double_click)
        self.table.itemChanged.connect(self._on_item_changed)
        for name, colour in classes.items():
            self.add_class(name, colour, (ids or {}).get(name))
        self.table.selectRow(0)

        add, remove = QPushButton("Add class"), QPushButton("Remove class")
        add.clicked.connect(lambda: self.add_class(self._new_name()))
        remove.clicked.connect(self.remove_current)
        up, down = QPushButton("Up"), QPushButton("Down")
        up.setToolTip("Move the selected class up: the first ten classes have keys 1-9, 0")
        down.setToolTip("Move the selected class down")
        up.clicked.connect(lambda: self.move_current(-1))
        down.clicked.connect(lambda: self.move_current(+1))
        buttons = QHBoxLayout()
        for button in (add, remove, up, down):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        layout.addLayout(buttons)

    @property
    def classes(self) -> list[str]:
        return [self.table.item(row, NAME).text() for row in range(self.table.rowCount())]

    @property
    def hex_colours(self) -> dict[str, str]:
        """``#rrggbb`` of every class, by name."""
        return {
            self.table.item(row, NAME).text(): self.table.item(row, KEY).background().color().name()
            for row in range(self.table.rowCount())
        }

    @property
    def colours(self) -> dict[str, np.ndarray]:
        """RGBA (float32) of every class, by name."""
        return {name: transform_color(colour)[0] for name, colour in self.hex_colours.items()}

    @property
    def ids(self) -> dict[str, str]:
        """Every class's id, by name."""
        return {name: self.id_of(name) for name in self.classes}

    @property
    def current_class(self) -> str | None:
        row = self.table.currentRow()
        return self.table.item(row, NAME).text() if row >= 0 else None

    def class_for_key(self, key: str) -> str | None:
        rows = [row for row in range(self.table.rowCount()) if key_of(row) == key]
        return self.table.item(rows[0], NAME).text() if rows else None

    def id_of(self, name: str) -> str | None:
        rows = [row for row in range(self.table.rowCount()) if self.table.item(row, NAME).text() == name]
        return self.table.item(rows[0], NAME).data(Qt.ItemDataRole.UserRole) if rows else None

    def name_of(self, class_id: str) -> str | None:
        """The name now of the class with id ``class_id``; None if no class has it (removed, or of another session)."""
        names = [self.table.item(row, NAME).text() for row in range(self.table.rowCount())
                 if self.table.item(row, NAME).data(Qt.ItemDataRole.UserRole) == class_id]
        return names[0] if names else None

    def add_class(self, name: str, colour: str | None = None, class_id: str | None = None) -> None:
        """Add ``name`` at the end (nothing if it is there); without ``colour``, the first of
        :data:`NEW_CLASS_COLOURS` no class has yet; without ``class_id`` (or with one another
        class holds: ids name one class each), a new id."""
        if name in self.classes:
            return
        if colour is None:
            taken = set(self.hex_colours.values())
            colour = next(c for c in itertools.chain(NEW_CLASS_COLOURS, _hue_circle()) if c not in taken)
        if not class_id or self.name_of(class_id) is not None:
            class_id = uuid.uuid4().hex
        self.table.blockSignals(True)
        row = self.table.rowCount()
        self.table.insertRow(row)
        key = QTableWidgetItem()  # its key and tip: _renumber_keys
        key.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
        key.setBackground(QColor(colour))
        self.table.setItem(row, KEY, key)
        item = QTableWidgetItem(name)
        item.setData(Qt.ItemDataRole.UserRole, class_id)
        self.table.setItem(row, NAME, item)
        self._names.append(name)
        for column in (LABELLED, PREDICTED):
            count = QTableWidgetItem("")  # blank until a map counts
            count.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
            self.table.setItem(row, column, count)
        self._renumber_keys()
        self.table.blockSignals(False)
        self.changed.emit()

    def remove_current(self) -> None:
        """Ask to remove the selected class (the last one stays): see :attr:`remove_requested`."""
        row = self.table.currentRow()
        if row >= 0 and self.table.rowCount() == 1:
            self.refused.emit("The last class stays: add another class before removing this one.")
        elif row >= 0:
            self.remove_requested.emit(self._names[row])

    def move_current(self, step: int) -> None:
        """Move the selected class ``step`` rows (-1 up, +1 down); keys follow the rows."""
        self.table.setFocus()  # a name still being typed is committed to its own row first
        row = self.table.currentRow()
        other = row + step
        if row < 0 or not 0 <= other < self.table.rowCount():
            return
        self.table.blockSignals(True)
        for column in range(self.table.columnCount()):
            mine, theirs = self.table.takeItem(row, column), self.table.takeItem(other, column)
            self.table.setItem(row, column, theirs)
            self.table.setItem(other, column, mine)
        self.table.blockSignals(False)
        self._names[row], self._names[other] = self._names[other], self._names[row]
        self._renumber_keys()
        self.table.selectRow(other)
        self.changed.emit()

    def remove(self, name: str) -> None:
        row = self._names.index(name)
        self.removed_ids.add(self.table.item(row, NAME).data(Qt.ItemDataRole.UserRole))
        self.table.removeRow(row)
        del self._names[row]
        self._renumber_keys()
        self.changed.emit()

    def set_colour(self, name: str, colour: str) -> None:
        self.table.item(self.classes.index(name), KEY).setBackground(QColor(colour))
        self.changed.emit()

    def set_counts(self, labelled: dict[str, int] | None, predicted: dict[str, int] | None) -> None:
        """Each class's cells in the map, labelled and predicted; blank for None (no map)."""
        self.table.blockSignals(True)
        for row, name in enumerate(self.classes):
            for column, counts in ((LABELLED, labelled), (PREDICTED, predicted)):
                self.table.item(row, column).setText("" if counts is None else str(counts.get(name, 0)))
        self.table.blockSignals(False)

    def _renumber_keys(self) -> None:
        for row in range(self.table.rowCount()):
            key = self.table.item(row, KEY)
            key.setText(key_of(row))
            key.setToolTip(KEY_TIP if key_of(row) else f"{KEY_TIP}. No key: only the first ten classes have one "
                           "(1-9, 0); move this class Up to give it one")

    def _new_name(self) -> str:
        number = 1
        while f"class {number}" in self.classes:
            number += 1
        return f"class {number}"

    def _on_double_click(self, row: int, column: int) -> None:
        if column == KEY:
            colour = QColorDialog.getColor(self.table.item(row, KEY).background().color(), self, "Class colour")
            if colour.isValid():
                self.set_colour(self.table.item(row, NAME).text(), colour.name())

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if item.column() != NAME:
            return
        row, new = item.row(), item.text().strip()
        old = self._names[row]
        # another class's name in another case ("Normal" beside "normal") would split its cells in two
        taken = next((name for name in self._names[:row] + self._names[row + 1 :] if name.casefold() == new.casefold()),
                     None)
        if not new or taken is not None:
            self.table.blockSignals(True)
            item.setText(old)  # empty or taken: keep the old name
            self.table.blockSignals(False)
            self.refused.emit(f"A class needs a name; {old!r} keeps its name." if not new else
                              f"There is already a class {taken!r}; {old!r} keeps its name." if taken == new else
                              f"There is already a class {taken!r} ({new!r} in another case); {old!r} keeps its name.")
            return
        if item.text() != new:  # the name as used everywhere else: without surrounding spaces
            self.table.blockSignals(True)
            item.setText(new)
            self.table.blockSignals(False)
        if new == old:  # only spaces were added: nothing is renamed
            return
        self._names[row] = new
        self.renamed.emit(old, new)
        self.changed.emit()
