"""The Cell map's per-smear summary at a glance: one column per smear, one row per number a
smear report gives (whole cells, diameter, its CV, pallor, the share of overlapping cells,
then the count and share of each class, the share's 95 % interval in its tooltip), from
:func:`~napari_reddino.smear_summary.summarise_smears`, as the export writes it."""

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem

from ..smear_summary import OVERLAPPING_OUTLINE


class SmearTable(QTableWidget):
    """Read-only; :meth:`show_summary` replaces what it shows."""

    def __init__(self):
        super().__init__(0, 0)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.setToolTip(
            "Per smear, without the cells cut by the image border. Overlapping: cells with "
            f"{OVERLAPPING_OUTLINE:.0%} or more of their outline against another cell, where the segmentation "
            "split them; their shape says less. Many overlapping cells point to a thick part of the smear (read a "
            "thinner one), or to rouleaux or agglutination, findings in themselves. Central pallor: the median of "
            "1 - centre density / rim density (0: no pale centre; higher: paler). A class's share appears once "
            "every whole cell has a class (train or apply a head); hover over it for its 95 % interval.")

    def show_summary(self, summary: pd.DataFrame) -> None:
        """Show ``summary`` (as :func:`summarise_smears` gives it); classes that no cell of any
        smear has are left out, the others keep the summary's order."""
        classes = [column[2:] for column in summary.columns if column.startswith("n_") and summary[column].sum() > 0]
        rows = _rows(summary, classes)
        self.clear()
        self.setRowCount(len(rows))
        self.setColumnCount(len(summary))
        names = summary["image"].astype(str)
        headers = summary["layer"].astype(str) if names.duplicated().any() else names
        self.setHorizontalHeaderLabels(list(headers))
        self.setVerticalHeaderLabels([name for name, _ in rows])
        for row, (name, texts) in enumerate(rows):
            tips = _share_tips(summary, name) if name in classes else [""] * len(texts)
            for column, (text, tip) in enumerate(zip(texts, tips)):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                item.setToolTip(tip)
                self.setItem(row, column, item)

    def forget(self) -> None:
        self.setRowCount(0)
        self.setColumnCount(0)

    def text(self, row_name: str, column: int) -> str:
        """What the cell of the row named ``row_name`` and the smear in ``column`` shows ("" when
        there is no such row)."""
        item = self._item(row_name, column)
        return item.text() if item else ""

    def tip(self, row_name: str, column: int) -> str:
        """That cell's tooltip ("" when there is no such row)."""
        item = self._item(row_name, column)
        return item.toolTip() if item else ""

    def _item(self, row_name: str, column: int) -> QTableWidgetItem | None:
        rows = [self.verticalHeaderItem(row).text() for row in range(self.rowCount())]
        return self.item(rows.index(row_name), column) if row_name in rows else None


def _rows(summary: pd.DataFrame, classes: list[str]) -> list[tuple[str, list[str]]]:
    rows = [
        ("whole cells", [f"{n:,}" for n in summary["whole_cells"]]),
        _diameter_row(summary),
        ("diameter CV", [_number(cv, "{:.1f} %") for cv in summary["diameter_cv_pct"]]),
        ("central pallor", [_number(value, "{:.2f}") for value in summary["central_pallor_median"]]),
        ("overlapping", [_number(value, "{:.0f} %") for value in summary["overlapping_pct"]]),
        ("with a class", [f"{done:,} of {whole:,}" for done, whole in zip(summary["classified"], summary["whole_cells"])]),
    ]
    for name in classes:
        rows.append((name, [f"{n:,}" if np.isnan(pct) else f"{n:,} ({_percent(pct)} %)"
                            for n, pct in zip(summary[f"n_{name}"], summary[f"pct_{name}"])]))
    return rows


def _percent(value: float) -> str:
    """A percentage to one decimal, "<0.1" where one above 0 would show as 0.0 (1 cell of 3,000),
    and ">99.9" where one below 100 would show as 100.0."""
    if 0 < value < 0.05:
        return "<0.1"
    return ">99.9" if 99.95 <= value < 100 else f"{value:.1f}"


def _share_tips(summary: pd.DataFrame, name: str) -> list[str]:
    """Each smear's 95 % interval of the class's share, where it has a share."""
    return ["" if np.isnan(low) else
            f"95 % interval of the share from counting {classified:,} cells: {_percent(low)}-{_percent(high)} %. "
            "Counting alone: the head's errors come on top."
            for low, high, classified in zip(summary[f"pct_{name}_low95"], summary[f"pct_{name}_high95"],
                                             summary["classified"])]


def _diameter_row(summary: pd.DataFrame) -> tuple[str, list[str]]:
    """In µm where the smear's pixel size is known, else in px; the unit goes in the row's name
    when all smears share it, else beside each number."""
    in_um = summary["diameter_mean_um"].notna().to_numpy()
    texts = [_mean_sd(row[f"diameter_mean_{suffix}"], row[f"diameter_sd_{suffix}"])
             for suffix, (_, row) in zip(np.where(in_um, "um", "px"), summary.iterrows())]
    if in_um.all() or not in_um.any():
        return f"diameter ({'µm' if in_um.all() else 'px'})", texts
    return "diameter", [f"{text} {'µm' if um else 'px'}" if text else "" for text, um in zip(texts, in_um)]


def _mean_sd(mean: float, sd: float) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.2f}" if np.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"


def _number(value: float, form: str) -> str:
    return "" if np.isnan(value) else form.format(value)
