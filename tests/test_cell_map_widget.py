"""The Cell map widget end to end in a real viewer: segment, embed (tiny real ViT), UMAP, lasso,
smear colours, labels, linear head, review, CSV export, head saved and applied to another smear."""

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from _model_fixtures import tiny_folder  # noqa: F401  (fixture)
from napari.utils.colormaps import ensure_colormap
from napari.utils.notifications import notification_manager
from qtpy.QtCore import QPoint, Qt
from qtpy.QtTest import QTest
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QColorDialog, QDockWidget, QFileDialog, QMessageBox, QScrollArea

from napari_reddino import CellClassifier, embeddings_of
from napari_reddino.cell_embeddings import labels_digest, store_embeddings
from napari_reddino.cell_table import clear_predictions
from napari_reddino.cell_map import DIM_FACTOR, value_colours
from napari_reddino.embedding import clear_embedder_cache
from napari_reddino.umap_layout import N_EPOCHS
from napari_reddino.widgets.cell_map_widget import (
    GALLERY_NAME,
    MIN_WIDTH,
    PREDICTED,
    SMEAR_FILL_ALPHA,
)
from napari_reddino.widgets.cells_layer import CARRIED_TO
from napari_reddino.widgets.class_list import DEFAULT_CLASSES, KEY, LABELLED, NAME, NEW_CLASS_COLOURS
from napari_reddino.widgets.map_head import held_out_words
from napari_reddino.widgets.smear_keys import LABEL_KEYS_HELP
from napari_reddino.wording import counted

DATA = Path(__file__).parent / "data"
CHULA_1 = DATA / "chula_rbc12" / "1.jpg"
ASLAN_1 = DATA / "aslan_bcd" / "image-1.png"
TIMEOUT_MS = 300_000  # generous: CI machines are slower and busier than this one


@pytest.fixture
def viewer(make_napari_viewer, umap_compiled):
    clear_embedder_cache()
    yield make_napari_viewer(show=True)
    clear_embedder_cache()


def embed(viewer, qtbot, model: Path, image_path: Path, crops: tuple | None = None):
    """Open a smear and run Embed cells with "segment first", as a user does (with ``crops``, its
    Crop, Scale and Margin set so); return the cells layer."""
    (image,) = viewer.open(image_path)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    widget.reset_choices()
    widget.image.value = image
    widget.reset_choices()
    widget.model_name, widget.device.value = str(model), "cpu"
    if crops is not None:
        widget.crop_mode.value, widget.crop_scale.value, widget.margin.value = crops
    with qtbot.waitSignal(widget.embedded, timeout=TIMEOUT_MS) as done:
        widget.run()
    return done.args[0]


def compute_map(widget, qtbot):
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS):
        widget.run()
    assert widget.pool is not None, widget.status.value


def click(callback, target, position, *, shift=False, drag=False):
    """Drive a napari press/release mouse-callback generator with a click at ``position`` (with
    ``drag``, a press, a move and a release there: a pan)."""
    event = SimpleNamespace(type="mouse_press", position=position, modifiers=("Shift",) if shift else ())
    steps = callback(target, event)
    if steps is None:
        return
    next(steps, None)
    for event.type in ("mouse_move", "mouse_release") if drag else ("mouse_release",):
        next(steps, None)


def overlay_alpha(widget, cells, ids) -> np.ndarray:
    """Alpha with which the smear shows each cell of ``ids`` (through the map-colour layer)."""
    overlay = widget._viewer.layers[f"{cells.name} map colours"]
    ranks = np.array([overlay.data[cells.data == label][0] for label in ids])
    return overlay.colormap.map(ranks.astype(overlay.data.dtype))[:, 3]


def test_the_whole_journey_on_real_smears(viewer, qtbot, tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    model = tiny_folder[1]
    cells = embed(viewer, qtbot, model, CHULA_1)
    ids = embeddings_of(cells)[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    epochs = []
    widget._umap_epoch.connect(lambda done, total: epochs.append((done, total)))
    compute_map(widget, qtbot)
    assert epochs[0] == (0, N_EPOCHS) and epochs[-1] == (N_EPOCHS, N_EPOCHS)  # the bar follows umap's epochs
    embed_widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")[1]
    embed_widget.reset_choices()
    names = [layer.name for layer in viewer.layers]
    assert names.index(f"{cells.name} map colours") == names.index(cells.name) + 1  # the map's colours over the smear ...
    assert sorted(getattr(choice, "name", choice) for choice in embed_widget.cells.choices) == [
        cells.name, "segment first"]  # ... are no cells to embed

    # One point per cell, carrying its image and label id; its UMAP position is in the table.
    points = widget.canvas.points
    assert len(points.data) == len(ids) > 40
    np.testing.assert_array_equal(points.features["label"], ids)
    assert set(points.features["layer"]) == {cells.name}
    table = cells.features.set_index("label").loc[ids]
    np.testing.assert_allclose(points.data[:, 1], table["umap_x"], rtol=1e-6)
    np.testing.assert_allclose(points.data[:, 0], -table["umap_y"], rtol=1e-6)

    # A lasso given as a polygon selects exactly the points inside (a rectangle: checked by hand here).
    rows, cols = points.data[:, 0], points.data[:, 1]
    top, bottom = np.percentile(rows, [10, 60])
    left, right = np.percentile(cols, [20, 90])
    inside = (rows > top) & (rows < bottom) & (cols > left) & (cols < right)
    assert 0 < inside.sum() < len(ids)
    widget.canvas.select_polygon(np.array([[top, left], [top, right], [bottom, right], [bottom, left]]))
    np.testing.assert_array_equal(widget.selected, inside)
    assert widget.selection_count.value.startswith(f"{inside.sum():,} of {len(ids):,} cells selected")

    # The smear shows exactly those cells brightly; the others are dimmed.
    alpha = overlay_alpha(widget, cells, ids)
    np.testing.assert_allclose(alpha[inside], SMEAR_FILL_ALPHA, rtol=1e-5)
    assert np.all(alpha[~inside] <= SMEAR_FILL_ALPHA * DIM_FACTOR + 1e-6)
    # ...and so does the map: the selected points ringed, in their own colours at full strength,
    # the rest faded.
    np.testing.assert_array_equal(widget.canvas.selection.data, points.data[inside])
    np.testing.assert_array_equal(widget.canvas.selection.face_color[:, :3], points.face_color[inside, :3])
    assert np.all(widget.canvas.selection.face_color[:, 3] == 1) and (points.face_color[inside, 3] < 1).any()
    assert points.opacity < 0.5 and widget.canvas.selection.opacity == 1

    # Labels: by button for the lasso, by number key for a clicked cell.
    widget.class_list.table.selectRow(widget.class_list.classes.index("spherocyte"))
    widget.buttons["Assign"].native.click()
    manual = cells.features.set_index("label").loc[ids, "manual_label"].to_numpy()
    np.testing.assert_array_equal(manual == "spherocyte", inside)
    assert np.all(manual[~inside] == "")

    outside = ids[~inside]
    row, col = table.loc[outside[0], ["centroid_y", "centroid_x"]]
    cells.visible = False  # to see the smear's own pixels: a click picks nothing, and says why
    click(widget._on_smear_press, viewer, (row, col))
    assert not widget.selected[~inside].any() and widget.status.value == (
        f"A cell of {cells.name!r} is there, but {cells.name!r} is hidden: show it to pick its cells in the smear.")
    colours = viewer.layers[f"{cells.name} map colours"]
    colours.visible = False
    click(widget._on_smear_press, viewer, (row, col))
    assert widget.status.value == (f"A cell of {cells.name!r} is there, but {cells.name!r} and {colours.name!r} "
                                   "are hidden: show them to pick its cells in the smear.")
    cells.visible = colours.visible = True
    click(widget._on_smear_press, viewer, (row, col))  # a click on the smear selects that cell...
    np.testing.assert_array_equal(ids[widget.selected], [outside[0]])
    click(widget._on_smear_press, viewer, tuple(table.loc[outside[1], ["centroid_y", "centroid_x"]]), shift=True)
    np.testing.assert_array_equal(ids[widget.selected], outside[:2])  # ...shift adds to the selection
    np.testing.assert_allclose(widget.canvas.model.scene.camera.center[-2:], points.data[~inside][1], rtol=1e-5)
    second_cell = tuple(table.loc[outside[1], ["centroid_y", "centroid_x"]])
    click(widget._on_smear_press, viewer, second_cell, shift=True)  # shift on a selected cell takes it out
    np.testing.assert_array_equal(ids[widget.selected], [outside[0]])
    click(widget._on_smear_press, viewer, second_cell, drag=True)  # a pan that ends on a cell picks nothing
    np.testing.assert_array_equal(ids[widget.selected], [outside[0]])
    click(widget._on_smear_press, viewer, second_cell, shift=True)
    np.testing.assert_array_equal(ids[widget.selected], outside[:2])
    keypad = Qt.KeyboardModifier.KeypadModifier  # a technologist's counting keys: once napari's lasso modes
    qtbot.keyClick(widget.canvas.qt_viewer.canvas.native, Qt.Key.Key_2, keypad)
    assert list(cells.features.set_index("label")["manual_label"].loc[outside[:2]]) == ["macrocyte", "macrocyte"]
    assert widget.canvas.lasso.mode == "pan_zoom"  # (a vertex mode there, and clicks on the map picked nothing)
    qtbot.keyClick(widget.canvas.qt_viewer.canvas.native, "1")  # key 1 = the first class, "normal"
    manual = cells.features.set_index("label")["manual_label"]
    assert list(manual.loc[outside[:2]]) == ["normal", "normal"]
    # Over the smear too, the number keys label: napari's own keys there would switch to a brush.
    click(widget._on_smear_press, viewer, tuple(table.loc[outside[2], ["centroid_y", "centroid_x"]]))
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, "1")  # napari's: the eraser
    assert cells.features.set_index("label").loc[outside[2], "manual_label"] == "normal"
    viewer.layers.selection.active = viewer.layers[f"{cells.name} map colours"]  # its colours chosen in the list
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, "2")
    assert cells.features.set_index("label").loc[outside[2], "manual_label"] == "macrocyte"
    assert viewer.help == LABEL_KEYS_HELP
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, "1")
    viewer.layers.selection.active = cells
    assert cells.mode == "pan_zoom"
    assert viewer.layers.selection.active.name == cells.name
    assert cells.help == viewer.help == LABEL_KEYS_HELP  # the status bar's hint says what the keys do now ...
    cells.mode = "paint"
    assert cells.help == viewer.help == LABEL_KEYS_HELP  # ... in every mode: napari rewrites it on a mode change
    cells.mode = "pan_zoom"
    widget.select(~inside & (np.arange(len(ids)) % 2 == 0))
    widget.assign("normal")
    assert widget.status.value == f"{widget.selected.sum()} cells labelled 'normal'."
    counts = widget.class_list.table
    assert counts.item(0, 2).text() == str((cells.features["manual_label"] == "normal").sum())

    # Exported before a head: the summary counts the labels, and leaves the class shares empty.
    early = widget.export_csv(tmp_path / "early.csv")
    labelled = cells.features.set_index("label").loc[ids]
    unclassified = ((labelled["manual_label"] == "") & ~labelled["touches_border"]).sum()
    assert f"class shares left empty: {unclassified:,} whole cells without a class yet" in widget.status.value
    early_summary = pd.read_csv(tmp_path / "early_summary.csv").iloc[0]
    assert early_summary["unclassified"] == unclassified > 0 and np.isnan(early_summary["pct_normal"])
    assert early == tmp_path / "early.csv"
    whole_labelled = labelled[~labelled["touches_border"]]
    labelled_spherocytes = f"{(whole_labelled['manual_label'] == 'spherocyte').sum():,}"
    qtbot.waitUntil(lambda: widget.smear_table.text("spherocyte", 0) == labelled_spherocytes)

    # The head trains on the labelled cells and predicts every cell; smear and map follow it.
    cells.features = cells.features.assign(p_value=0.05)  # a column of the lab's own, not a class's probability
    widget.train()
    assert widget.colour_by.value == PREDICTED
    assert re.search(r"every cell has a predicted class\. On labelled cells left out of its training in turn, it "
                     r"named \d+% right \(mean over classes; weakest: (normal|spherocyte), \d+%\); expect less on "
                     r"other smears\.$",
                     widget.status.value)
    predicted = cells.features.set_index("label").loc[ids]
    assert set(predicted["predicted_class"]) <= {"normal", "spherocyte"}
    probabilities = predicted[["p_normal", "p_spherocyte"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(predicted["prediction_probability"], probabilities.max(axis=1), rtol=1e-6)
    widget.select(np.zeros(len(ids), dtype=bool))
    spherocyte_rgba = widget.class_list.colours["spherocyte"]
    is_spherocyte = predicted["predicted_class"].to_numpy() == "spherocyte"
    np.testing.assert_allclose(points.face_color[is_spherocyte], np.tile(spherocyte_rgba, (is_spherocyte.sum(), 1)))

    # Review uncertain: the least certain unlabelled cell first, of those the border does not cut (the
    # cut ones count in no share: they come last); labelling it moves on.
    widget.review_next()
    unlabelled = predicted["manual_label"].to_numpy() == ""
    cut = predicted["touches_border"].to_numpy(dtype=bool)
    first = np.flatnonzero(widget.selected)
    assert len(first) == 1 and unlabelled[first[0]] and not cut[first[0]]
    margin = np.abs(probabilities[:, 0] - probabilities[:, 1])
    assert margin[first[0]] == pytest.approx(margin[unlabelled & ~cut].min(), abs=1e-6)
    queue = widget._review[::-1]  # what comes next, in order
    assert cut[queue].tolist() == sorted(cut[queue].tolist()) and cut[queue].sum() == (unlabelled & cut).sum() > 0
    widget.assign("spherocyte")
    assert cells.features.set_index("label").loc[ids[first[0]], "manual_label"] == "spherocyte"
    (second,) = np.flatnonzero(widget.selected)
    assert unlabelled[second] and second != first[0]
    # Cells labelled meanwhile by other means (an import) are skipped, not shown as unlabelled.
    queue = list(widget._review)  # the least certain last
    next_ones, after_them = queue[-4:], queue[-5]
    table = cells.features
    cells.features = table.assign(manual_label=table["manual_label"].where(~table["label"].isin(ids[next_ones]), "normal"))
    widget.review_next()
    assert list(np.flatnonzero(widget.selected)) == [after_them]
    assert cells.features.set_index("label").loc[ids[after_them], "manual_label"] == ""

    # Colour by a measurement.
    widget.colour_by.value = "circularity"
    np.testing.assert_allclose(points.face_color, value_colours(widget.pool.column("circularity"),
                                                               ensure_colormap("viridis")), atol=1e-6)
    np.testing.assert_array_equal(widget.canvas.selection.face_color[:, :3],
                                  points.face_color[widget.selected, :3])  # in step

    # Export: written, read back column by column; an existing file is replaced only when confirmed.
    assert widget.with_summary.native.text().endswith("(_summary.csv)")  # the name it writes, as it writes it
    widget.with_embeddings.value = True
    csv = widget.export_csv(tmp_path / "cells")  # a name typed without .csv gets it
    assert csv == tmp_path / "cells.csv" and (tmp_path / "cells.npz").is_file()
    back = pd.read_csv(csv, dtype={"image": str})  # "1" (from 1.jpg) would otherwise read as a number
    assert len(back) == len(ids)
    assert list(back["image"].unique()) == [viewer.layers[0].name]
    features = cells.features.set_index("label").loc[back["label"]].reset_index()
    for column in ("centroid_x", "area_px", "circularity", "umap_x", "umap_y", "prediction_probability", "p_normal"):
        np.testing.assert_allclose(back[column], features[column], rtol=1e-9, err_msg=column)
    for column in ("predicted_class",):
        assert list(back[column]) == list(features[column])
    assert list(back["manual_label"].fillna("")) == list(features["manual_label"])
    assert set(back["model_id"]) == {embeddings_of(cells)[2]}
    assert widget.status.value == f"{len(ids):,} cells written to {csv}, one row per smear to cells_summary.csv."
    summary = pd.read_csv(tmp_path / "cells_summary.csv", dtype={"image": str}).iloc[0]
    whole = features[~features["touches_border"]]
    classes = np.where(whole["manual_label"] != "", whole["manual_label"], whole["predicted_class"])
    assert (summary["image"], summary["cells"], summary["whole_cells"]) == (viewer.layers[0].name, len(ids), len(whole))
    assert [column for column in summary.index if column.startswith("n_")] == [
        f"n_{name}" for name in widget.class_list.classes]  # every class of the list, in its order
    assert summary["n_spherocyte"] == (classes == "spherocyte").sum() > 0
    assert summary["pct_normal"] == pytest.approx(100 * (classes == "normal").mean())
    assert summary["diameter_mean_px"] == pytest.approx(whole["equivalent_diameter_px"].mean())
    # The panel shows the same per-smear numbers, shares included now that every cell has a class.
    panel = widget.smear_table
    spherocytes = (classes == "spherocyte").sum()
    shares = f"{spherocytes:,} ({100 * spherocytes / len(whole):.1f} %)"
    qtbot.waitUntil(lambda: panel.text("spherocyte", 0) == shares)  # a moment after the last change
    assert panel.horizontalHeaderItem(0).text() == viewer.layers[0].name
    assert panel.text("whole cells", 0) == f"{len(whole):,}"
    shown = [panel.verticalHeaderItem(row).text() for row in range(panel.rowCount())]
    assert "microcyte" not in shown  # no cell has it
    saved = np.load(csv.with_suffix(".npz"))
    np.testing.assert_array_equal(saved["label"], ids)
    np.testing.assert_allclose(saved["embedding"], embeddings_of(cells)[1])
    before = csv.stat().st_mtime_ns
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    assert widget.export_csv(csv) is None and csv.stat().st_mtime_ns == before
    assert widget.status.value == "Nothing was written: cells.csv, cells.npz and cells_summary.csv kept as they were."
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda _, title, text: asked.append(text) or QMessageBox.StandardButton.Yes)
    assert widget.export_csv(csv) == csv
    assert asked.pop() == "cells.csv, cells.npz and cells_summary.csv exist. Replace?"
    widget.with_embeddings.value = False  # the earlier export's .npz would not match the new table: it goes
    assert widget.export_csv(csv) == csv and not csv.with_suffix(".npz").exists()
    assert asked.pop() == ("cells.csv and cells_summary.csv exist and will be replaced; cells.npz, from an earlier "
                           "export, would not match the new table and will be deleted. Go on?")
    assert widget.status.value.endswith("; removed the earlier export's cells.npz.")
    widget.with_embeddings.value = True
    dated = widget.export_csv(tmp_path / "Smear 12.03.2024")  # a dot in the name is not a suffix
    assert dated == tmp_path / "Smear 12.03.2024.csv" and (tmp_path / "Smear 12.03.2024.npz").exists()
    assert (tmp_path / "Smear 12.03.2024_summary.csv").exists() and asked == []

    # Labels cleared by mistake come back from the export; a cell labelled since keeps its label.
    exported = cells.features.set_index("label").loc[ids, "manual_label"].to_numpy()
    widget.select(exported != "")
    widget.assign("")
    assert widget.status.value.startswith(f"Label cleared from {(exported != '').sum()} cells. Least certain unlabelled cell: ")
    widget.select(np.zeros(len(ids), dtype=bool))
    widget.assign("normal")  # nothing selected: says how to select
    assert widget.status.value == "No cells selected: lasso them on the map, or click them in the smear."
    newer = np.flatnonzero(exported == "spherocyte")[0]
    widget.select(np.arange(len(ids)) == newer)
    widget.assign("normal")
    widget.import_labels(csv)
    restored = cells.features.set_index("label").loc[ids, "manual_label"].to_numpy()
    assert restored[newer] == "normal"
    np.testing.assert_array_equal(np.delete(restored, newer), np.delete(exported, newer))
    imported = (exported != "").sum() - 1
    assert widget.status.value == (f"{imported:,} labels imported from cells.csv onto {cells.name!r}; "
                                   "1 cell labelled otherwise since the export kept that label.")
    row = widget.class_list.classes.index("spherocyte")
    assert widget.class_list.table.item(row, 2).text() == str((restored == "spherocyte").sum())
    # A colleague's class joins the list in a colour of its own.
    colleague = pd.read_csv(csv, dtype={"image": str}, keep_default_na=False)
    unlabelled = np.flatnonzero(colleague["manual_label"] == "")[0]
    colleague.loc[unlabelled, "manual_label"] = " acanthocyte "
    moved = np.flatnonzero(colleague["manual_label"] == "spherocyte")[0]  # a cell the colleague saw elsewhere
    colleague.loc[moved, "centroid_x"] += 5
    colleague.to_csv(tmp_path / "colleague.csv", index=False)
    widget.import_labels(tmp_path / "colleague.csv")
    assert widget.status.value.endswith(f"; 1 labelled cell from {cells.name!r} not imported: no cell is at its place "
                                        "now (segmented with other settings, or edited since the export).")
    assert cells.features.set_index("label").loc[colleague.loc[unlabelled, "label"], "manual_label"] == "acanthocyte"
    assert widget.class_list.classes[-1] == "acanthocyte"
    colours = widget.class_list.hex_colours
    assert colours["acanthocyte"] == NEW_CLASS_COLOURS[0] not in [colours[name] for name in DEFAULT_CLASSES]
    # Saved by Excel's plain CSV (Windows' Western letters): "drépanocyte ✓" came back as "drépanocyte ?"
    colleague.loc[unlabelled, "manual_label"] = "drépanocyte ✓".encode("cp1252", "replace").decode("cp1252")
    colleague.to_csv(tmp_path / "excel.csv", index=False, encoding="cp1252")
    cells.features.loc[cells.features["label"] == colleague.loc[unlabelled, "label"], "manual_label"] = ""
    widget.import_labels(tmp_path / "excel.csv")
    assert widget.status.value.endswith("; new class 'drépanocyte ?': where a '?' stands for a letter the spreadsheet "
                                        "could not save (Excel's plain CSV keeps Western letters only), rename it in "
                                        "the class list, and save as CSV UTF-8 next time.")
    widget.import_labels(tmp_path / "excel.csv")  # in the list now: said once
    assert "'?'" not in widget.status.value
    cells.features.loc[cells.features["label"] == colleague.loc[unlabelled, "label"], "manual_label"] = ""
    colleague.loc[unlabelled, "manual_label"] = "schistocyte?"  # a class of a doubt, in a file of every letter
    colleague.to_csv(tmp_path / "unsure.csv", index=False, encoding="utf-8")
    widget.import_labels(tmp_path / "unsure.csv")
    assert "schistocyte?" in widget.class_list.classes and "'?'" not in widget.status.value
    # Labels of the smear opened second yesterday ("1 [1]") come to it opened first today, and say so;
    # with those of the smear opened first beside them, the layer of that name takes its own.
    image = cells.metadata["source_image"]
    second = colleague.assign(layer=f"{image} [1] cells", image=f"{image} [1]")
    second.to_csv(tmp_path / "second.csv", index=False)
    widget.import_labels(tmp_path / "second.csv")
    assert f"; those from '{image} [1] cells' onto {cells.name!r};" in widget.status.value
    pd.concat([second, colleague]).to_csv(tmp_path / "both.csv", index=False)
    widget.import_labels(tmp_path / "both.csv")
    assert widget.status.value.endswith(f"; not imported: the labels from '{image} [1] cells', whose cells are in "
                                        f"{cells.name!r} too, which took those from {cells.name!r} (open the smear "
                                        "again for both).")

    # The map's own canvas is docked and shows the points.
    shot = widget.canvas.screenshot()
    assert shot.ndim == 3 and shot[..., :3].std() > 5
    assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 10

    # The head is saved, with the colours the list has now, then applied in one call to a second
    # smear; a head of another model is refused.
    widget.class_list.set_colour("spherocyte", "#12ab34")
    widget.save_head(tmp_path / "head")
    assert CellClassifier.load(tmp_path / "head").colours["spherocyte"] == "#12ab34"
    about = (tmp_path / "head.json").read_bytes()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    widget.save_head(tmp_path / "head.safetensors")  # both files exist: replaced only when confirmed
    assert (tmp_path / "head.json").read_bytes() == about
    replace = os.replace

    def refuse_the_json(source, target):  # a file held open by another program (Windows)
        if Path(target).suffix == ".json":
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_json)
    widget.save_head(tmp_path / "half")
    assert widget.status.value == ("The head was only partly saved (half.safetensors was written, but half.json "
                                   "could not be replaced (Permission denied); half.json is as before); save it again.")
    monkeypatch.setattr(os, "replace", replace)
    aslan = embed(viewer, qtbot, model, ASLAN_1)
    widget.apply_head(tmp_path / "head.safetensors")
    # trained among Chula cells, it has not seen Aslan's stain: said, for that smear only
    assert f"Most cells of {aslan.name!r} are unlike the cells the head was trained among" in widget.status.value
    assert "Compute map: then Review uncertain shows them first" in widget.status.value  # it is not on the map yet
    aslan_predicted = aslan.features["predicted_class"]
    assert len(aslan_predicted) == len(embeddings_of(aslan)[0]) and set(aslan_predicted) <= {"normal", "spherocyte"}
    # Exported now, the map's smear (Chula's) is written with its map positions, the smear the head
    # classified outside the map without.
    widget.export_csv(tmp_path / "classified.csv")
    assert widget.status.value.endswith(f" {aslan.name!r} has no map positions: classified by the head, but not in "
                                        "the map.")
    exported = pd.read_csv(tmp_path / "classified.csv", dtype={"layer": str}, keep_default_na=False, na_values=[""])
    assert exported["layer"].value_counts().to_dict() == {cells.name: len(ids), aslan.name: len(aslan.features)}
    on_aslan = (exported["layer"] == aslan.name).to_numpy()
    assert exported.loc[on_aslan, "umap_x"].isna().all() and exported.loc[~on_aslan, "umap_x"].notna().all()
    np.testing.assert_array_equal(exported.loc[on_aslan, "predicted_class"], aslan.features["predicted_class"])
    # Trained again on the map, the head has not classified Aslan's smear: left out, and said why.
    widget.train()
    widget.export_csv(tmp_path / "the_map_only.csv")
    assert widget.status.value.endswith(f" {aslan.name!r} is not in it: classified by an earlier head (apply the "
                                        "head to it again).")
    assert set(pd.read_csv(tmp_path / "the_map_only.csv", dtype={"layer": str})["layer"]) == {cells.name}
    other = CellClassifier(["a", "b"], model_id="someone-else/vit")
    rng = np.random.default_rng(0)
    other.fit(rng.normal(size=(20, embeddings_of(cells)[1].shape[1])), np.repeat(["a", "b"], 10))
    other.save(tmp_path / "other")
    widget.apply_head(tmp_path / "other.safetensors")
    assert "someone-else/vit" in widget.status.value

    # Both smears in one pooled map; a selection maps back to the right image, also once renamed.
    viewer.layers[aslan.metadata["source_image"]].name = "patient 17"
    assert aslan.metadata["source_image"] == "patient 17"
    widget.colour_by.value = "circularity"
    compute_map(widget, qtbot)
    pool = widget.pool
    # Its smears carry two heads' predictions (the one applied to Aslan's, the one trained since): said on export.
    widget.export_csv(tmp_path / "two_heads.csv")
    assert widget.status.value.endswith(f" {aslan.name!r} carries the predictions of an earlier head: train or apply "
                                        "the head again to classify every smear with one.")
    assert len(pool) == len(ids) + len(embeddings_of(aslan)[0])
    # A cell of the first smear is shown above the second, which napari opened over it.
    images = {layer: viewer.layers[layer.metadata["source_image"]] for layer in (cells, aslan)}
    widget.canvas.point_clicked.emit(int(np.flatnonzero(pool.layer_index == 0)[0]), False)
    assert images[cells].visible and cells.visible and not images[aslan].visible and not aslan.visible
    assert not viewer.layers[f"{aslan.name} map colours"].visible
    assert widget.status.value == (f"Showing the cell's smear (hid {images[aslan].name!r}, {aslan.name!r}, "
                                   f"'{aslan.name} map colours', which lay over it).")
    widget.canvas.point_clicked.emit(int(np.flatnonzero(pool.layer_index == 1)[0]), False)
    assert images[aslan].visible and aslan.visible and images[cells].visible  # on top: nothing to hide
    # A click on the top smear's background picks nothing, not the covered cell of the smear below.
    below = cells.features.set_index("label").loc[ids, ["centroid_y", "centroid_x"]].to_numpy()
    covered = [(y, x) for y, x in below if y < aslan.data.shape[0] and x < aslan.data.shape[1]
               and aslan.data[round(y), round(x)] == 0 and cells.data[round(y), round(x)] != 0]
    before = widget.selected.copy()
    click(widget._on_smear_press, viewer, covered[0])
    np.testing.assert_array_equal(widget.selected, before)
    images[aslan].visible = False  # the smear below shows through the top one's background: its cell is picked
    click(widget._on_smear_press, viewer, covered[0])
    assert pool.layer_index[widget.selected].tolist() == [0]
    images[aslan].visible = True
    widget.select(pool.layer_index == 1)
    aslan_ids = embeddings_of(aslan)[0]
    assert np.all(overlay_alpha(widget, aslan, aslan_ids) > SMEAR_FILL_ALPHA * DIM_FACTOR + 1e-6)
    assert np.all(overlay_alpha(widget, cells, ids) <= SMEAR_FILL_ALPHA * DIM_FACTOR + 1e-6)
    assert widget.colour_by.value == "circularity"  # the colouring chosen before stays with the new map
    colour = cells.features
    cells.features = colour.drop(columns=["mean_red"])  # as if the first smear were gray: the second's colour stays
    widget.colour_by.reset_choices()
    assert "mean_red" in widget.colour_by.choices
    cells.features = colour
    np.testing.assert_allclose(widget.canvas.points.face_color, value_colours(
        widget.pool.column("circularity"), ensure_colormap("viridis")), atol=1e-6)
    # The head predicted the first smear's map, not this one: review waits for a head on this map.
    widget.review_next()
    assert widget.status.value.startswith("Train the head (or apply a saved one) on this map first")
    # Applied to this map, review starts with the cells unlike those the head was trained among.
    widget.apply_head(tmp_path / "head.safetensors")
    widget.review_next()
    assert widget.status.value.startswith("Unlabelled cell unlike those the head was trained among: ")
    # A map computed after the head predicted its cells is reviewed the same way, without applying it again.
    compute_map(widget, qtbot)
    pool = widget.pool
    widget.review_next()
    assert widget.status.value.startswith("Unlabelled cell unlike those the head was trained among: ")

    # Retrained on two other classes, every cell carries only the new head's probabilities.
    widget.select(pool.layer_index == 0)
    widget.assign("target cell")
    widget.select(pool.layer_index == 1)
    widget.assign("ovalocyte")
    widget.train()
    columns = sorted(c for c in aslan.features.columns if c.startswith("p_"))
    assert columns == ["p_ovalocyte", "p_target cell"]
    assert sorted(c for c in cells.features.columns if c.startswith("p_")) == [*columns, "p_value"]
    # A renamed class is renamed in the table, its probability column and the head.
    widget.save_head(tmp_path / "before_rename")
    widget.class_list.table.item(widget.class_list.classes.index("ovalocyte"), NAME).setText("oval ")
    assert "oval" in widget.class_list.classes  # the name as typed, without the trailing space
    assert "p_oval" in aslan.features and "p_ovalocyte" not in aslan.features
    assert set(aslan.features["manual_label"]) == {"oval"}
    assert widget.classifier.classes == ["target cell", "oval"]
    # A cell embedded again loses the head's probabilities under the class's new name too.
    assert clear_predictions(aslan, aslan_ids[:1]) == 1
    assert aslan.features.set_index("label").loc[aslan_ids[0], ["p_oval", "p_target cell"]].isna().all()
    # A head saved before the rename predicts the class under its name now, not as a second class.
    widget.apply_head(tmp_path / "before_rename.safetensors")
    assert "its 'ovalocyte' is 'oval' now" in widget.status.value
    assert "ovalocyte" not in widget.class_list.classes and "p_ovalocyte" not in aslan.features
    assert set(aslan.features["predicted_class"]) <= {"target cell", "oval"} and "p_oval" in aslan.features
    # So after two classes swap names (through a spare one): each keeps its own predictions.
    oval_p = aslan.features["p_oval"].to_numpy()
    for old, new in (("target cell", "spare"), ("oval", "target cell"), ("spare", "oval")):
        widget.class_list.table.item(widget.class_list.classes.index(old), NAME).setText(new)
    widget.apply_head(tmp_path / "before_rename.safetensors")
    assert "its 'target cell' is 'oval' now; its 'ovalocyte' is 'target cell' now" in widget.status.value
    np.testing.assert_array_equal(aslan.features["p_target cell"], oval_p)
    assert not {"spare", "ovalocyte"} & set(widget.class_list.classes)
    for old, new in (("target cell", "spare"), ("oval", "target cell"), ("spare", "oval")):  # and back
        widget.class_list.table.item(widget.class_list.classes.index(old), NAME).setText(new)

    # New labels (here: one cell deleted) make the map stale: it is removed and says why.
    as_embedded = aslan.data
    aslan.data = np.where(aslan.data == aslan_ids[0], 0, aslan.data)
    assert widget.pool is None and widget.canvas.points is None
    assert not any(layer.name.endswith("map colours") for layer in viewer.layers)
    assert widget.status.value.startswith(f"The cells of {aslan.name!r} changed")
    widget.run()  # the deleted cell's embedding describes a cell that is gone: no map until embedded again
    assert widget.pool is None and widget.status.value.startswith(
        f"The cells of {aslan.name!r} were painted since they were embedded")
    # Without a map, Export writes the smears the head classified, but not one painted since.
    widget.export_csv(tmp_path / "no_map.csv")
    assert widget.status.value.endswith(f" {aslan.name!r} is not in it: painted, or its smear edited, since it was "
                                        "classified (embed it and apply the head again).")
    exported = pd.read_csv(tmp_path / "no_map.csv", dtype={"layer": str}, keep_default_na=False, na_values=[""])
    assert exported["layer"].tolist() == [cells.name] * len(cells.features) and exported["umap_x"].isna().all()
    aslan.data = as_embedded  # (or embed them again)

    # So does embedding the cells again (other crops, another model), at once.
    compute_map(widget, qtbot)
    ids_now, vectors, model_id = embeddings_of(cells)
    store_embeddings(cells, ids_now, vectors[:, ::-1], model_id=model_id, fingerprint="re-embedded")
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")
    store_embeddings(cells, ids_now, vectors, model_id=model_id, fingerprint="embedded again",
                     labels_digest=labels_digest(cells.data))

    # So does painting a cell with the brush, and removing a smear's cells layer.
    compute_map(widget, qtbot)
    cells.paint(tuple(table.loc[ids[0], ["centroid_y", "centroid_x"]]), 0)
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")
    assert "label eraser" in cells.help and "label eraser" in viewer.help  # no map: napari's keys and hint are back
    cells.undo()  # the painted cell's embedding is current again
    compute_map(widget, qtbot)
    assert widget.pool is not None
    cells.redo()  # napari says only that the layer was redrawn: that is enough
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")
    cells.undo()
    compute_map(widget, qtbot)
    cells.refresh()  # redrawn, as they were: the map stays
    assert widget.pool is not None
    cells.undo()
    compute_map(widget, qtbot)
    viewer.layers.remove(f"{aslan.name} map colours")  # taken for clutter: the map goes, saying how to get it back
    assert widget.pool is None and widget.status.value == (f"The cells of {aslan.name!r} lost their map colours (that "
                                                           "layer was removed); Compute map to show the map again.")
    qtbot.wait(10)
    assert [layer.name for layer in viewer.layers if layer.name.endswith("map colours")] == []
    compute_map(widget, qtbot)
    viewer.layers.remove(aslan)
    assert widget.pool is None and widget.status.value == (f"The cells of {aslan.name!r} were removed; Compute map to "
                                                           "map the smears still open.")
    qtbot.wait(10)
    assert [layer.name for layer in viewer.layers if layer.name.endswith("map colours")] == []  # the others' too

    # Without a map, a renamed class is renamed on the cells layers all the same.
    widget.class_list.table.item(widget.class_list.classes.index("target cell"), NAME).setText("target")
    assert "target" in set(cells.features["manual_label"]) and "target cell" not in set(cells.features["manual_label"])
    assert "p_target" in cells.features and "p_target cell" not in cells.features

    # Removing a class asks first when cells carry it, then unlabels them.
    labelled = int((cells.features["manual_label"] == "target").sum())
    widget.class_list.table.selectRow(widget.class_list.classes.index("target"))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    widget.class_list.remove_current()
    assert "target" in widget.class_list.classes and (cells.features["manual_label"] == "target").sum() == labelled
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    widget.class_list.remove_current()
    assert "target" not in widget.class_list.classes and "target" not in set(cells.features["manual_label"])
    # the head's probabilities were shares among its classes, 'target' one of them: they go with it
    assert widget.status.value == (f"Class 'target' removed; {labelled:,} cells labelled 'target' are unlabelled; "
                                   "the predictions that include 'target' are cleared (train the head again "
                                   "without it); the classes below it moved up a key: 5 is 'stomatocyte' now.")
    assert widget.classifier is None and "predicted_class" not in cells.features
    assert [column for column in cells.features if column.startswith("p_")] == ["p_value"]
    # A class no cell carries goes without a question.
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: pytest.fail("asked for nothing to lose"))
    widget.class_list.table.selectRow(widget.class_list.classes.index("teardrop"))
    widget.class_list.remove_current()
    assert "teardrop" not in widget.class_list.classes and widget.status.value == (
        "Class 'teardrop' removed; the classes below it moved up a key: 7 is 'burr cell' now.")
    widget.class_list.table.selectRow(len(widget.class_list.classes) - 1)  # the last: no key moves
    removed = widget.class_list.classes[-1]
    widget.class_list.remove_current()
    assert widget.status.value == f"Class {removed!r} removed."


def test_a_closed_map_panel_takes_its_colours_and_keys_and_a_new_one_finds_the_classes(viewer, qtbot,
                                                                                      tiny_folder):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    widget.assign("normal")  # before a map: says what to do first
    assert widget.status.value.startswith("No map yet: Compute map, then select cells")
    compute_map(widget, qtbot)
    widget.class_list.add_class("crenated")
    widget.select(np.arange(len(widget.pool)) < 3)
    widget.assign("crenated")
    widget.select(np.arange(len(widget.pool)) >= len(widget.pool) - 3)
    widget.assign("normal")
    for name in list(DEFAULT_CLASSES)[8:]:  # eight and crenated left: the key 0 has no class
        widget.class_list.remove(name)
    widget.press_key("0")
    assert widget.status.value == "No class has the key 0: the list holds 9 classes."
    assert f"{cells.name} map colours" in viewer.layers and "label eraser" not in cells.help

    viewer.window.remove_dock_widget(dock)  # as its close button does
    assert [layer.name for layer in viewer.layers] == ["1", cells.name]
    assert "label eraser" in cells.help  # napari's own keys are back
    assert (cells.features["manual_label"] == "crenated").sum() == 3  # the work stays on the cells

    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    widget.train()
    assert cells.metadata["predicted_classes"] == widget.classifier.classes
    viewer.window.remove_dock_widget(dock)  # as its close button does
    # A class of that head that no cell carries is in no list of the next panel, yet its
    # probabilities go with the head: the layer remembers which head predicted it.
    cells.features = cells.features.assign(p_retired=0.0)
    cells.metadata["predicted_classes"].append("retired")
    _, reopened = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(reopened, qtbot)
    assert "crenated" in reopened.class_list.classes and "retired" not in reopened.class_list.classes
    reopened.train()
    assert reopened.status.value.startswith("Head trained on 6 labelled cells")
    assert sorted(c for c in cells.features if c.startswith("p_")) == ["p_crenated", "p_normal"]


def test_a_refusal_while_the_map_is_computed_does_not_end_the_run(viewer, qtbot, tiny_folder):  # noqa: F811
    # A script waiting for `finished` after run() went on before the map was there.
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS):
        widget.run()
        with qtbot.assertNotEmitted(widget.finished, wait=0):
            widget.train()
        assert widget.status.value == "Compute the map first."
    assert widget.pool is not None and widget.xy is not None
    # Nor when the shown map is found stale (a cell erased in place, which sends no event) meanwhile.
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS):
        widget.run()
        cells.data[cells.data == widget.pool.label_ids[0]] = 0
        with qtbot.assertNotEmitted(widget.finished, wait=0):
            widget.train()
        assert widget.status.value == f"The cells of {cells.name!r} changed; embed them again, then Compute map."
    assert widget.pool is None  # nor is the new map shown: it was laid out from the cells as they were
    assert widget.status.value == f"The cells of {cells.name!r} changed while the map was computed; compute it again."


def test_a_reopened_map_panel_keeps_the_names_order_keys_colours_and_ids_of_its_classes(viewer):
    # It started from the default list: key 1 labelled with a class the lab had renamed away.
    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    widget.class_list.table.item(0, NAME).setText("discocyte")  # as typed over "normal"
    widget.class_list.table.selectRow(3)
    widget.class_list.move_current(-1)  # spherocyte up, to key 3
    widget.class_list.set_colour("discocyte", "#123456")
    widget.class_list.remove("other")
    ids = widget.class_list.ids
    viewer.window.remove_dock_widget(dock)
    _, reopened = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    assert reopened.class_list.classes[:4] == ["discocyte", "macrocyte", "spherocyte", "microcyte"]
    assert reopened.class_list.class_for_key("1") == "discocyte" and "other" not in reopened.class_list.classes
    assert reopened.class_list.hex_colours["discocyte"] == "#123456"
    assert reopened.class_list.ids == ids  # a head saved before still names its classes as they are now


def test_the_map_panel_can_be_closed_but_not_floated_or_dragged_out(viewer, qtbot, tiny_folder):  # noqa: F811
    embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    assert dock.features() == QDockWidget.DockWidgetFeature.DockWidgetClosable
    assert not dock.titleBarWidget().float_button.isVisible()
    title = dock.titleBarWidget()
    start = QPoint(title.width() // 2, title.height() // 2)
    QTest.mousePress(title, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    for step in range(1, 20):  # a drag that would take a movable panel out of the window
        QTest.mouseMove(title, start + QPoint(-20 * step, 10 * step))
    QTest.mouseRelease(title, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start + QPoint(-380, 190))
    QTest.mouseDClick(dock.titleBarWidget(), Qt.MouseButton.LeftButton)
    qtbot.wait(50)
    assert not dock.isFloating() and widget.canvas.qt_viewer is not None
    viewer.window._qt_window.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)  # napari's own move
    qtbot.wait(50)
    assert not dock.isFloating() and not dock.titleBarWidget().float_button.isVisible()
    widget.select(np.arange(len(widget.pool)) < 3)  # the map still draws and selects
    assert widget.selection_count.value.startswith("3 ")


def test_a_smear_mapped_twice_is_named_in_the_status_and_drawn_twice(viewer, qtbot, tiny_folder, tmp_path):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    again = viewer.add_labels(cells.data.copy(), name=f"{cells.name} again", features=cells.features.copy(),
                              metadata=dict(cells.metadata))  # segmented again, beside the labelled layer
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    assert len(widget.pool) == 2 * len(embeddings_of(cells)[0])
    assert widget.status.value.endswith(
        f" The smear '1' is mapped twice ({cells.name!r} and {again.name!r}): its cells count twice in the map, "
        "the head and the export; remove the layer you do not need.")
    widget.select(np.arange(len(widget.pool)) % 3 == 0)
    widget.assign("normal")
    widget.with_galleries.value = True
    widget.export_csv(tmp_path / "cells.csv")  # a picture per layer: neither replaces the other
    assert sorted(path.name for path in (tmp_path / "cells_galleries").iterdir()) == ["1 cells again.png", "1 cells.png"]
    viewer.layers.remove(again)
    compute_map(widget, qtbot)
    assert widget.status.value.startswith("Map of ") and "twice" not in widget.status.value
    # Deleting the cells and their colours at once: napari removes a selection one layer after
    # another from a list made before, in no fixed order; the colours must still be there.
    for layer in [cells, viewer.layers[f"{cells.name} map colours"]]:
        viewer.layers.remove(layer)
    assert widget.pool is None
    viewer.layers.select_all()
    viewer.layers.remove_selected()
    qtbot.waitUntil(lambda: len(viewer.layers) == 0)


def test_ctrl_z_over_a_mapped_smear_undoes_the_last_label_and_without_a_map_a_stroke(viewer, qtbot, tiny_folder):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    cells.paint(tuple(cells.features[["centroid_y", "centroid_x"]].iloc[0]), 0)  # a stroke, before the map
    painted = cells.data.copy()
    _, embed_panel = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    embed_panel.cells.value = cells
    with qtbot.waitSignal(embed_panel.embedded, timeout=TIMEOUT_MS):
        embed_panel.run()
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    widget.select(np.arange(len(widget.pool)) < 3)
    widget.assign("normal")
    canvas, ctrl = viewer.window._qt_viewer.canvas.native, Qt.KeyboardModifier.ControlModifier
    assert viewer.layers.selection.active.name == cells.name
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl)  # the label, not the stroke from before the map
    assert (cells.features["manual_label"] == "").all() and widget.pool is not None
    np.testing.assert_array_equal(cells.data, painted)
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl | Qt.KeyboardModifier.ShiftModifier)  # nor napari's redo
    assert widget.status.value.startswith("Ctrl+Shift+Z does nothing over the mapped smears")
    assert widget.pool is not None
    # A new stroke takes the map away, and gives napari its keys back: Ctrl+Z undoes that stroke.
    cells.paint(tuple(cells.features[["centroid_y", "centroid_x"]].iloc[5]), 0)
    assert widget.pool is None
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl)
    np.testing.assert_array_equal(cells.data, painted)


def test_a_click_on_a_smear_not_on_the_map_picks_no_cell_of_a_mapped_smear_under_it(viewer, qtbot, tiny_folder):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    (aslan,) = viewer.open(ASLAN_1)  # napari opens it over the mapped smear; its cells are not embedded yet
    centres = cells.features[["centroid_y", "centroid_x"]].to_numpy()
    y, x = next((y, x) for y, x in centres if y < aslan.data.shape[0] and x < aslan.data.shape[1])
    under = int(cells.data[round(y), round(x)])
    assert under != 0
    click(widget._on_smear_press, viewer, (y, x))
    assert not widget.selected.any()
    assert widget.status.value == (f"{aslan.name!r} is not on the map: embed its cells and Compute map to pick them "
                                   "here, or hide it to pick the cells of the smear under it.")
    aslan.visible = False  # the mapped smear shows again: its cell is picked
    click(widget._on_smear_press, viewer, (y, x))
    assert widget.pool.label_ids[widget.selected].tolist() == [under]


def test_a_smear_changed_while_hidden_or_segmented_again_takes_the_map_away(viewer, qtbot, tiny_folder,  # noqa: F811
                                                                            tmp_path):
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    cells.visible = False
    gone = int(widget.pool.label_ids[0])
    cells.data[cells.data == gone] = 0  # an undo of a hidden layer: napari says nothing
    widget.select(np.arange(len(widget.pool)) < 3)
    widget.assign("normal")  # the next label finds it
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")
    assert "normal" not in set(cells.features.get("manual_label", pd.Series(dtype=object)))  # nothing written

    embed_widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")[1]
    embed_widget.cells.value = cells
    with qtbot.waitSignal(embed_widget.embedded, timeout=TIMEOUT_MS):
        embed_widget.run()
    compute_map(widget, qtbot)
    cells.visible = False
    cells.data[cells.data == int(widget.pool.label_ids[0])] = 0
    widget.canvas.point_clicked.emit(0, False)  # shown again to show the cell: found changed, and said so
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")

    with qtbot.waitSignal(embed_widget.embedded, timeout=TIMEOUT_MS):
        embed_widget.run()
    compute_map(widget, qtbot)
    for name, cell in (("normal", 0), ("spherocyte", 1)):
        widget.select(np.arange(len(widget.pool)) == cell)
        widget.assign(name)
    widget.train()
    cells.visible = False
    cells.data[cells.data == int(widget.pool.label_ids[2])] = 0
    widget.review_next()  # the cell to review is shown in its smear: found changed, the same way
    assert widget.pool is None and widget.status.value.startswith(f"The cells of {cells.name!r} changed")

    with qtbot.waitSignal(embed_widget.embedded, timeout=TIMEOUT_MS):
        embed_widget.run()
    compute_map(widget, qtbot)
    exported = widget.export_csv(tmp_path / "before.csv")  # labelled, before the smear is segmented again
    again = viewer.add_labels(cells.data.copy(), name=f"{cells.name} [1]", features=cells.features.copy(),
                              metadata=dict(cells.metadata))  # the smear segmented again (and embedded) ...
    cells.metadata = {**cells.metadata, CARRIED_TO: str(again.unique_id)}  # ... its labels carried, as Segment does
    assert widget.pool is None and widget.status.value == (
        f"The cells of {cells.name!r} segmented again as {again.name!r}: embed that layer, then Compute map.")
    compute_map(widget, qtbot)
    assert [layer.name for layer in widget.pool.layers] == [again.name]  # its cells are not counted twice
    assert widget.status.value.endswith(f" {cells.name!r} is left out: it was segmented again as {again.name!r} "
                                        "(embed that layer to map it).")
    # The export's labels go to the newer layer of the smear, not to the hidden one of its name.
    labelled = cells.features["manual_label"].copy()
    again.features = again.features.assign(manual_label="")
    widget.import_labels(exported)
    assert widget.status.value.startswith(f"2 labels imported from before.csv onto {again.name!r}")
    pd.testing.assert_series_equal(again.features["manual_label"], labelled)
    pd.testing.assert_series_equal(cells.features["manual_label"], labelled)
    viewer.layers.remove(again)
    compute_map(widget, qtbot)  # the newer layer is gone: the labelled one is mapped as before
    assert [layer.name for layer in widget.pool.layers] == [cells.name] and "left out" not in widget.status.value


def test_a_smear_whose_pixels_changed_since_embedding_is_embedded_again_before_it_is_mapped_or_classified(
        viewer, qtbot, tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    image = viewer.layers[cells.metadata["source_image"]]
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    for name, cell in (("normal", 0), ("spherocyte", 1)):
        widget.select(np.arange(len(widget.pool)) == cell)
        widget.assign(name)
    image.data[:] = 255 - image.data  # a correction applied in place: napari hears of no change
    widget.train()
    stale = (f"The smear under {cells.name!r} changed since its cells were embedded (pixels edited in place?), so "
             "the embeddings describe the old pixels: embed it again with Plugins > RedDino > Embed cells, then "
             "Compute map.")
    assert widget.status.value == f"{stale} The map is removed until then."
    assert widget.pool is None and widget.classifier is None
    assert "predicted_class" not in cells.features
    assert cells.features.set_index("label")["manual_label"].value_counts().to_dict() == {
        "": len(cells.features) - 2, "normal": 1, "spherocyte": 1}  # the labels given stay
    widget.run()
    assert widget.status.value == stale and widget.pool is None
    widget.export_csv(tmp_path / "cells.csv")
    assert not (tmp_path / "cells.csv").exists()
    head = CellClassifier(["normal", "spherocyte"], model_id=embeddings_of(cells)[2])
    head.fit(embeddings_of(cells)[1][:2], ["normal", "spherocyte"])
    head.save(tmp_path / "head")
    widget.apply_head(tmp_path / "head.safetensors")  # without a map: the same refusal, with its own next step
    assert widget.status.value == stale.replace("then Compute map.", "then apply the head again.")
    assert "predicted_class" not in cells.features

    embed_widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")[1]
    embed_widget.cells.value = cells
    before, red = embeddings_of(cells)[1].copy(), cells.features["mean_red"].to_numpy()
    with qtbot.waitSignal(embed_widget.embedded, timeout=TIMEOUT_MS):
        embed_widget.run()
    assert not np.allclose(embeddings_of(cells)[1], before)  # the model saw the new pixels
    np.testing.assert_allclose(cells.features["mean_red"], 255 - red, rtol=1e-5)  # and so did the measurements
    assert cells.features.set_index("label")["manual_label"].value_counts().to_dict() == {
        "": len(cells.features) - 2, "normal": 1, "spherocyte": 1}
    compute_map(widget, qtbot)
    widget.train()
    assert widget.classifier is not None and (cells.features["predicted_class"] != "").all()

    # A class removed while the map is shown takes Undo label's history along: an undo would bring it back.
    widget.select(np.arange(len(widget.pool)) == 2)
    widget.assign("spherocyte")
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    widget.class_list.table.selectRow(widget.class_list.classes.index("spherocyte"))
    widget.class_list.remove_current()
    widget.undo_label()
    assert widget.status.value.startswith("Nothing to undo") and "spherocyte" not in set(cells.features["manual_label"])


def test_a_map_that_fails_says_why_and_ends_once(viewer, qtbot, tiny_folder):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], ASLAN_1)
    embeddings_of(cells)[1][0, 0] = np.nan  # a damaged embedding
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    ended = []
    widget.finished.connect(lambda: ended.append(widget.status.value))
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS):
        widget.run()
    qtbot.wait(100)
    says = "The map failed: Embeddings contain NaN or infinite values; embed the cells again."
    assert ended == [says] and notification_manager.records[-1].message == says
    assert widget.pool is None and widget._pending is None and widget._run_button.enabled


def test_a_smear_read_lazily_is_not_hashed_whole_and_one_in_memory_is(viewer):
    import dask.array as da

    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    ids = np.arange(1, 5)
    for name, data in (("lazy", da.from_array(pixels, chunks=(30, 40, 3))), ("in memory", pixels)):
        viewer.add_image(data, name=name, rgb=True)
        cells = viewer.add_labels(np.repeat(np.repeat(ids.reshape(2, 2), 30, 0), 40, 1).astype(np.int32),
                                  name=f"{name} cells", metadata={"source_image": name})
        store_embeddings(cells, ids, np.ones((4, 8), np.float32), model_id="m", fingerprint="f",
                         image_digest="the pixels before an edit")
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    layers = [viewer.layers["lazy cells"], viewer.layers["in memory cells"]]
    # A dask or zarr smear is read from disk, not edited in place: reading it whole at each Train
    # and Export would freeze the panel. One in memory is hashed, and found changed.
    assert widget._smears_changed(layers).startswith("The smear under 'in memory cells' changed since")


def test_a_map_cancelled_during_its_layout_is_dropped_and_the_next_one_is_shown(viewer, qtbot):
    n = 5_000
    ids = np.arange(1, n + 1)
    cells = viewer.add_labels(ids.reshape(50, 100).astype(np.int32), name="many cells",
                              features=pd.DataFrame({"label": ids}))
    vectors = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    store_embeddings(cells, ids, vectors, model_id="m", fingerprint="f")
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    widget.run()  # embedded by hand, never measured: no cell could be shown in its smear
    assert widget.status.value.startswith("The cells of 'many cells' have no measurements to show them by")
    row, col = np.divmod(ids - 1, 100)  # each cell is one pixel
    cells.features = cells.features.assign(centroid_y=row, centroid_x=col, equivalent_diameter_px=1.13,
                                           bbox_min_y=row, bbox_min_x=col, bbox_max_y=row + 1, bbox_max_x=col + 1)
    epochs = []

    def cancel_at_the_first_epoch(done, total):
        epochs.append(done)
        if len(epochs) == 1:
            widget.cancel()

    widget._umap_epoch.connect(cancel_at_the_first_epoch)
    with qtbot.waitSignal(widget.finished, timeout=TIMEOUT_MS):
        widget.run()
    assert widget.status.value == "Cancelled; the map is as it was."
    assert widget.pool is None and widget._progress is None and widget._run_button.enabled
    widget._umap_epoch.disconnect(cancel_at_the_first_epoch)
    compute_map(widget, qtbot)  # nothing of the cancelled run is left in the way
    assert len(widget.canvas.points.data) == n


def test_at_its_narrowest_the_panel_shows_every_control_whole_class_names_and_the_status(viewer, qtbot):
    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    dock.parent().resizeDocks([dock], [MIN_WIDTH], Qt.Orientation.Horizontal)  # dragged as narrow as it goes
    qtbot.waitUntil(lambda: widget.width() == MIN_WIDTH)
    scroll = widget.findChild(QScrollArea)
    assert scroll.widget().minimumSizeHint().width() <= scroll.viewport().width()
    assert not scroll.horizontalScrollBar().isVisible()
    assert widget.status.native.isVisible() and not scroll.isAncestorOf(widget.status.native)  # never scrolled away
    table = widget.class_list.table
    widest_name = max(table.fontMetrics().horizontalAdvance(name) for name in DEFAULT_CLASSES)
    assert table.columnWidth(NAME) > widest_name
    widget.selection_count.value = "52,038 of 52,038 cells selected"
    controls = [*widget.buttons.values(), widget.selection_count]
    qtbot.waitUntil(lambda: all(control.native.width() >= control.native.sizeHint().width() for control in controls))


def test_a_head_class_whose_name_another_class_took_comes_back_under_a_name_of_its_own(viewer, qtbot, tiny_folder,  # noqa: F811
                                                                                        tmp_path):
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    classes = widget.class_list
    x = widget.canvas.points.data[:, 1]
    left = x < np.median(x)
    for name, chosen in (("target cell", left), ("ovalocyte", ~left)):
        widget.select(chosen)
        widget.assign(name)
    widget.train()
    widget.save_head(tmp_path / "head")
    trained = cells.features[["p_target cell", "p_ovalocyte"]].to_numpy()
    head_ids = {name: classes.id_of(name) for name in ("target cell", "ovalocyte")}
    # Target cell removed; stomatocyte (not in the head) renamed target cell: the head's own
    # target cell is another class than the list's.
    classes.remove("target cell")
    stomatocyte = classes.id_of("stomatocyte")
    classes.table.item(classes.classes.index("stomatocyte"), NAME).setText("target cell")
    for own in ("target cell (head)", "target cell (head 2)"):  # names the lab gave classes of its own
        classes.add_class(own)
    for said in ("its own 'target cell' is 'target cell (head 3)'",  # applied again, it finds its class so named
                 "its 'target cell' is 'target cell (head 3)' now"):
        widget.apply_head(tmp_path / "head.safetensors")
        assert said in widget.status.value
        assert classes.id_of("target cell (head 3)") == head_ids["target cell"]
        assert classes.id_of("target cell") == stomatocyte and classes.id_of("ovalocyte") == head_ids["ovalocyte"]
        np.testing.assert_allclose(cells.features[["p_target cell (head 3)", "p_ovalocyte"]], trained, atol=1e-6)
        assert "p_target cell" not in cells.features
        assert set(cells.features["predicted_class"]) <= {"target cell (head 3)", "ovalocyte"}
        assert len(classes.classes) == len(DEFAULT_CLASSES) + 2  # no (head 4) on the second apply
    # A head of another session (ids this list never had) with a class the list lacks: applied
    # twice, its classes are the list's of their names, and the new one joins the list once.
    about = json.loads((tmp_path / "head.json").read_text())
    about.update(classes=["normal", "acanthocyte"], colours={},
                 class_ids={"normal": uuid.uuid4().hex, "acanthocyte": uuid.uuid4().hex})
    (tmp_path / "colleague.json").write_text(json.dumps(about))
    shutil.copy(tmp_path / "head.safetensors", tmp_path / "colleague.safetensors")
    for _ in range(2):
        widget.apply_head(tmp_path / "colleague.safetensors")
        assert "(head" not in widget.status.value.split(" applied to ")[1]
        assert "normal (head)" not in classes.classes and classes.classes.count("acanthocyte") == 1
        assert set(cells.features["predicted_class"]) <= {"normal", "acanthocyte"}


def test_every_button_does_what_its_name_says(viewer, qtbot, tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    widget.export_csv(tmp_path / "cells.csv")  # no map, no head: nothing to write yet
    assert widget.status.value == ("Compute the map first, or apply a saved head: Export writes the map's smears and "
                                   "those the head classified.") and not (tmp_path / "cells.csv").exists()
    compute_map(widget, qtbot)
    n = len(widget.pool)
    classes = widget.class_list

    def press(name: str, current_class: str | None = None) -> None:
        if current_class is not None:
            classes.table.setCurrentCell(classes.classes.index(current_class), NAME)
        widget.buttons[name].native.click()

    def manual() -> np.ndarray:
        return widget.pool.column("manual_label", "")

    x = widget.canvas.points.data[:, 1]
    left = x < np.median(x)
    widget.select(left)
    press("Assign", "normal")
    widget.select(~left)
    press("Assign", "spherocyte")
    np.testing.assert_array_equal(manual(), np.where(left, "normal", "spherocyte"))
    press("Undo label")  # takes the two labellings back, the newest first, then has nothing left
    np.testing.assert_array_equal(manual(), np.where(left, "normal", ""))
    press("Undo label")
    assert (manual() == "").all() and widget.status.value == "Undone: " + counted(int(left.sum()), "cell") + (
        " have their labels of before again.")
    press("Undo label")
    assert widget.status.value.startswith("Nothing to undo")
    # Up to 100 labellings back, as the tooltip says: of 101, all but the first are taken back.
    widget.select(np.arange(n) == 0)
    cycle = classes.classes[:3]
    for step in range(101):
        press("Assign", cycle[step % 3])
    for _ in range(100):
        press("Undo label")
    assert widget.status.value.startswith("Undone: ")
    assert manual()[0] == cycle[0] and (manual()[1:] == "").all()
    press("Undo label")
    assert widget.status.value.startswith("Nothing to undo")
    widget.select(left)
    press("Assign", "normal")
    widget.select(~left)
    press("Assign", "spherocyte")
    widget.select(np.arange(n) == 0)
    press("Clear label")
    assert manual()[0] == "" and (manual()[1:] != "").all()
    qtbot.keyClick(widget.canvas.qt_viewer.canvas.native, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(manual(), np.where(left, "normal", "spherocyte"))  # Ctrl+Z on the map
    assert widget.status.value == "Undone: 1 cell has its label of before again."
    widget.select(np.ones(n, dtype=bool))
    press("Assign", "spherocyte")
    assert widget.status.value == (f"{n} cells labelled 'spherocyte' ({left.sum()} of them had another label; "
                                   "Undo label takes this back).")
    press("Undo label")
    np.testing.assert_array_equal(manual(), np.where(left, "normal", "spherocyte"))
    widget.select(np.arange(n) == 0)
    press("Clear label")
    assert manual()[0] == "" and (manual()[1:] != "").all()
    press("Clear selection")
    assert not widget.selected.any()
    # Drawn on the map: a lasso selects the points inside it; a click picks the nearest point, but
    # only near one; shift-click adds.
    corner = widget.canvas.points.data.min(axis=0) - 1
    far = widget.canvas.points.data.max(axis=0) + 1
    widget.canvas.lasso.add_polygons([np.array([corner, [corner[0], far[1]], far, [far[0], corner[1]]])])
    assert widget.selected.all()
    press("Clear selection")
    first, second = widget.canvas.points.data[:2]
    click(widget.canvas._on_press, widget.canvas.model, tuple(first))
    click(widget.canvas._on_press, widget.canvas.model, tuple(second), shift=True)
    assert np.flatnonzero(widget.selected).tolist() == [0, 1]
    click(widget.canvas._on_press, widget.canvas.model, tuple(far + 100))  # nowhere near a cell
    click(widget.canvas._on_press, widget.canvas.model, tuple(first), drag=True)  # a pan
    assert np.flatnonzero(widget.selected).tolist() == [0, 1]
    press("Clear selection")
    # Zoomed far in, points are drawn at most 40 px wide: a click picks within 1.5 of those, as seen.
    points = widget.canvas.points.data
    gaps = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.diag(np.full(n, np.inf))
    lone = int(np.argmax(gaps.min(axis=1)))  # the point farthest from its nearest neighbour
    size = float(np.mean(widget.canvas.points.size))
    widget.canvas.model.scene.camera.zoom = zoom = max(80 / size, 200 / gaps[lone].min())  # drawn at 40 px
    click(widget.canvas._on_press, widget.canvas.model, tuple(points[lone] + [80 / zoom, 0]))  # 80 px off
    assert not widget.selected.any()
    click(widget.canvas._on_press, widget.canvas.model, tuple(points[lone] + [50 / zoom, 0]))  # 50 px off
    assert np.flatnonzero(widget.selected).tolist() == [lone]
    press("Clear selection")
    # On a HiDPI screen (2 device px per px) the limit is 40 device px: 20 px, so a click picks within 30.
    monkeypatch.setattr(type(widget.canvas.qt_viewer), "devicePixelRatioF", lambda self: 2.0)
    click(widget.canvas._on_press, widget.canvas.model, tuple(points[lone] + [40 / zoom, 0]))
    assert not widget.selected.any()
    click(widget.canvas._on_press, widget.canvas.model, tuple(points[lone] + [25 / zoom, 0]))
    assert np.flatnonzero(widget.selected).tolist() == [lone]
    press("Clear selection")
    # Zoomed far out, points are drawn at least 4 device px wide: a click 3.5 px off, beyond 1.5 times
    # the 2 px they would be, still picks one.
    monkeypatch.setattr(type(widget.canvas.qt_viewer), "devicePixelRatioF", lambda self: 1.0)
    widget.canvas.model.scene.camera.zoom = zoom = 2 / size
    assert gaps[lone].min() * zoom > 7  # no other point within 3.5 px of the click
    click(widget.canvas._on_press, widget.canvas.model, tuple(points[lone] + [3.5 / zoom, 0]))
    assert np.flatnonzero(widget.selected).tolist() == [lone]
    press("Clear selection")
    # A class's colour, chosen by double-clicking its key, colours its cells on the map and in exports.
    widget.colour_by.value = "manual label"
    monkeypatch.setattr(QColorDialog, "getColor", lambda *args, **kwargs: QColor("#123456"))
    classes.table.cellDoubleClicked.emit(classes.classes.index("spherocyte"), KEY)
    assert classes.hex_colours["spherocyte"] == "#123456"
    faces, chosen = widget.canvas.points.face_color, np.array([0x12, 0x34, 0x56, 0xFF]) / 255
    spherocytes = manual() == "spherocyte"
    np.testing.assert_allclose(faces[spherocytes], np.tile(chosen, (spherocytes.sum(), 1)), atol=1e-6)
    assert not np.isclose(faces[~spherocytes], chosen, atol=1e-3).all(axis=1).any()

    # (a label column kept as categories, blanks missing, as a table read back may hold it)
    cells.features = cells.features.assign(manual_label=pd.Categorical(cells.features["manual_label"].replace("", None)))
    press("Train head")
    predicted = widget.pool.column("predicted_class", "")
    assert set(predicted) <= {"normal", "spherocyte"} and (predicted != "").all()
    assert "Not used" not in widget.status.value  # every measurement of the head was there
    press("Review uncertain")
    assert np.flatnonzero(widget.selected).tolist() == [0]  # the one unlabelled cell
    press("Select class", "spherocyte")
    np.testing.assert_array_equal(widget.selected, np.where(manual() != "", manual(), predicted) == "spherocyte")
    press("Show in gallery")
    assert GALLERY_NAME in viewer.window.dock_widgets and widget.gallery.points() == np.flatnonzero(
        widget.selected).tolist()
    # A class renamed is renamed in a label column of categories too (which takes no new name as it is).
    assert isinstance(cells.features["manual_label"].dtype, pd.CategoricalDtype)
    spherocytes = manual() == "spherocyte"
    classes.table.item(classes.classes.index("spherocyte"), NAME).setText("sphero")
    np.testing.assert_array_equal(manual() == "sphero", spherocytes)
    classes.table.item(classes.classes.index("sphero"), NAME).setText("spherocyte")
    press("Undo label")  # the labellings before a rename named classes by their old names
    assert widget.status.value.startswith("Nothing to undo")

    # A measurement some cells lack is left out of the head, and the status says which.
    complete = cells.features
    cells.features = complete.assign(circularity=complete["circularity"].where(complete.index != 3))
    press("Train head")
    assert widget.status.value.endswith("Not used: circularity, which some of the cells lack (a gray smear has no "
                                        "colour; cells measured by an older version lack the newer measurements).")
    cells.features = complete
    press("Train head")

    # The file buttons ask for a name, then write or read that file.
    def answer(name: str) -> None:
        chosen = (str(tmp_path / name), "")
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: chosen)
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: chosen)

    answer("head.safetensors")
    press("Save head…")
    assert (tmp_path / "head.safetensors").is_file()
    about = json.loads((tmp_path / "head.json").read_text())
    assert about["crops"] == {"mode": "masked", "scale": "smear", "margin": 0.25}  # as the cells were cut
    widget.save_head(tmp_path / "gone" / "head")
    assert widget.status.value == f"The head was not saved: No folder {tmp_path / 'gone'} to write head.safetensors in."
    cells.features = cells.features.drop(columns=["predicted_class"])
    press("Apply saved head…")
    np.testing.assert_array_equal(widget.pool.column("predicted_class", ""), predicted)
    # A head trained on cells cut otherwise is refused: the same model sees those crops otherwise.
    (tmp_path / "context.safetensors").write_bytes((tmp_path / "head.safetensors").read_bytes())
    (tmp_path / "context.json").write_text(json.dumps(about | {"crops": about["crops"] | {"mode": "context"}}))
    answer("context.safetensors")
    press("Apply saved head…")
    assert widget.status.value.startswith("The head 'context' was trained on cells embedded from context crops at "
                                          "smear scale, margin 0.25, but these cells were embedded from masked")
    answer("cells.csv")
    press("Export CSV…")
    exported = pd.read_csv(tmp_path / "cells.csv", keep_default_na=False)
    np.testing.assert_array_equal(exported["manual_label"], manual())
    replace = os.replace

    def locked(source, target):  # cells.csv open in a spreadsheet, on Windows
        if Path(target).name == "cells.csv":
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", locked)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    press("Export CSV…")
    assert widget.status.value == ("Nothing was written: cells.csv could not be replaced (Permission denied); it is "
                                   "as before. If it is open in another program (a spreadsheet, say), close it "
                                   "there and try again.")
    monkeypatch.setattr(os, "replace", replace)
    widget.select(np.arange(n) == 0)
    press("Assign", "normal")
    cells.features = cells.features.assign(manual_label="")
    press("Import labels…")
    np.testing.assert_array_equal(manual(), exported["manual_label"])
    press("Undo label")  # would write the labels of before the import over the imported ones
    assert widget.status.value.startswith("Nothing to undo")
    press("Assign", "normal")
    compute_map(widget, qtbot)
    press("Undo label")  # a new map's point numbers may be other cells
    assert widget.status.value.startswith("Nothing to undo")
    np.testing.assert_array_equal(manual(), np.where(np.arange(n) == 0, "normal", exported["manual_label"]))

    # A run that ends while Replace? is asked (its dialog runs Qt's events) takes the map away.
    def map_gone_then_yes(*args, **kwargs):
        widget.forget_map()
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", map_gone_then_yes)
    written = (tmp_path / "cells.csv").read_bytes()
    press("Export CSV…")
    assert widget.status.value == ("Nothing was written: the map's cells changed while the question was open; "
                                   "Compute map, then export again.")
    assert (tmp_path / "cells.csv").read_bytes() == written
    assert {classes.table.item(row, LABELLED).text() for row in range(len(classes.classes))} == {""}  # no map to count


def test_the_held_out_check_names_the_classes_that_need_a_second_labelled_cell():
    labels = np.array(["normal", "normal", "teardrop", "", "schistocyte"], dtype=object)
    assert held_out_words(None, labels) == ("Label a second cell of 'schistocyte', 'teardrop' to see how the head does "
                                            "on cells it was not trained on.")
    assert held_out_words({"normal": 0.9, "teardrop": 0.5}, labels) == (
        "On labelled cells left out of its training in turn, it named 70% right (mean over classes; weakest: "
        "teardrop, 50%); expect less on other smears.")
