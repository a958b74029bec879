"""The Cell map's per-smear table, from summarise_smears of hand-counted smears."""

import numpy as np
import pandas as pd
from test_smear_summary import counted_layer

from napari_reddino.smear_summary import summarise_smears
from napari_reddino.widgets.smear_table import SmearTable


def headers(table: SmearTable) -> list[str]:
    return [table.horizontalHeaderItem(column).text() for column in range(table.columnCount())]


def test_each_smear_is_shown_in_micrometres_where_its_pixel_size_is_known(qtbot):
    known, unknown = counted_layer("A cells"), counted_layer("B cells")
    unknown.features = unknown.features.drop(columns="equivalent_diameter_um")
    table = SmearTable()
    qtbot.addWidget(table)

    table.show_summary(summarise_smears([known, known]))
    assert table.text("diameter (µm)", 0) == f"8.00 ± {np.std([6, 7, 8, 9, 10], ddof=1):.2f}"  # whole cells only
    assert headers(table) == ["A cells", "A cells"]  # one smear twice: its layers name the columns
    assert table.text("whole cells", 1) == "5"
    assert table.text("diameter CV", 0) == f"{100 * np.sqrt(2.5) / 8:.1f} %" == "19.8 %"
    assert table.text("central pallor", 0) == "0.30"  # the median of the whole cells' 0.1 ... 0.5
    other = counted_layer("B cells")
    other.features = other.features.assign(central_pallor=[0.05, 0.05, 0.2, 0.6, 0.6, 0.9])
    table.show_summary(summarise_smears([known, other]))
    assert headers(table) == ["A", "B"] and table.text("central pallor", 1) == "0.20"

    table.show_summary(summarise_smears([known, unknown]))
    assert table.text("diameter", 0) == f"8.00 ± {np.std([6, 7, 8, 9, 10], ddof=1):.2f} µm"
    assert table.text("diameter", 1) == f"40.00 ± {np.std([30, 35, 40, 45, 50], ddof=1):.2f} px"

    table.show_summary(summarise_smears([unknown]))
    assert table.text("diameter (px)", 0) == f"40.00 ± {np.std([30, 35, 40, 45, 50], ddof=1):.2f}"


def test_shares_appear_once_every_whole_cell_has_a_class(qtbot):
    layer = counted_layer()
    table = SmearTable()
    qtbot.addWidget(table)
    table.show_summary(summarise_smears(layer, classes=["normal", "spherocyte", "schistocyte"]))
    assert table.text("with a class", 0) == "4 of 5"
    assert table.text("overlapping", 0) == "40 %"  # two of the five whole cells
    assert table.text("spherocyte", 0) == "2"  # a manual label and a prediction; no share yet
    assert table.tip("spherocyte", 0) == ""
    assert table.text("schistocyte", 0) == ""  # no cell has it: no row
    layer.features.loc[4, "predicted_class"] = "normal"
    table.show_summary(summarise_smears(layer, classes=["normal", "spherocyte"]))
    shown = {name: table.text(name, 0) for name in ("normal", "spherocyte", "target cell")}
    assert shown == {"normal": "2 (40.0 %)", "spherocyte": "2 (40.0 %)", "target cell": "1 (20.0 %)"}
    assert table.tip("target cell", 0).startswith("95 % interval of the share from counting 5 cells: 0.5-71.6 %.")
    assert table.tip("with a class", 0) == ""


def test_a_share_under_a_twentieth_of_a_percent_is_not_shown_as_none(qtbot):
    layer = counted_layer()
    features = layer.features.iloc[:5]
    many = features.loc[[1] * 2999].assign(label=range(10, 3009), manual_label="", predicted_class="normal")
    layer.features = pd.concat([features.iloc[[0]].assign(manual_label="spherocyte"), many], ignore_index=True)
    table = SmearTable()
    qtbot.addWidget(table)
    table.show_summary(summarise_smears(layer, classes=["normal", "spherocyte"]))
    assert table.text("spherocyte", 0) == "1 (<0.1 %)"  # 1 of 3,000: 0.03 %, which one decimal shows as 0.0
    assert table.tip("spherocyte", 0).startswith("95 % interval of the share from counting 3,000 cells: <0.1-0.2 %.")
    assert table.text("normal", 0) == "2,999 (>99.9 %)"  # nor the others' as all
