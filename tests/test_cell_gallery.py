"""The gallery of selected cells: thumbnails cut from the real smear, and the panel in a real viewer
beside the Cell map (tiny real ViT, real UMAP)."""

import subprocess
import sys

import numpy as np
import pandas as pd
from _model_fixtures import tiny_folder  # noqa: F401  (fixture)
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage
from qtpy.QtWidgets import QMessageBox
from skimage.io import imread, imsave
from test_cell_map_widget import ASLAN_1, CHULA_1, compute_map, embed, viewer  # noqa: F401  (fixture)

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_map import UNLABELLED
from napari_reddino.cell_thumbnails import THUMBNAIL_PX, cell_thumbnail, display_rgb
from napari_reddino.class_gallery import GAP_PX, ROW_CELLS, class_gallery, pictures_in
from napari_reddino.crop_windows import cell_windows, square_windows
from napari_reddino.smear_summary import OVERLAPPING_OUTLINE
from napari_reddino.widgets.cell_gallery import MAX_CELLS
from napari_reddino.widgets.cell_map_widget import GALLERY_NAME
from napari_reddino.widgets.smear_links import SOURCE_LAYER


def test_the_windows_are_the_model_crops_sized_among_the_smear_s_cells():
    boxes = np.array([(20, 10, 50, 30), (0, 0, 20, 20), (100, 100, 120, 120)])  # x0, y0, x1, y1
    # at cell scale a 30 x 20 px box gets 30 px and a quarter of it on each side
    np.testing.assert_allclose(square_windows(boxes[:1], scale="cell"), [(12.5, -2.5, 57.5, 42.5)])
    # at smear scale the 20 px cells get 1.25 x the median side (20 px) before the margin: 37.5 px
    np.testing.assert_allclose(square_windows(boxes)[1:], [(-8.75, -8.75, 28.75, 28.75), (91.25, 91.25, 128.75, 128.75)])
    smear = imread(CHULA_1)
    labels = segment_cells(smear)
    table = measure_cells(labels, smear)
    bounds = table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float)
    np.testing.assert_allclose(square_windows(bounds), cell_windows(labels).boxes)  # what the model sees


def test_a_thumbnail_is_the_smear_around_the_cell_with_its_outline_drawn_in():
    smear = imread(CHULA_1)
    labels = segment_cells(smear)
    label = int(labels[labels.shape[0] // 2, :].max())  # a cell on the middle row
    rows, cols = np.nonzero(labels == label)
    top, left, side = rows.min() - 10, cols.min() - 10, max(np.ptp(rows), np.ptp(cols)) + 21
    assert top >= 0 and left >= 0  # inside the smear: every pixel of the window is the smear's
    window = (left, top, left + side, top + side)
    thumbnail = cell_thumbnail(smear, labels, label, window, outline=(0, 255, 0), size=side)  # no resampling
    pixels = smear[top:top + side, left:left + side, :3]
    mask = labels[top:top + side, left:left + side] == label
    edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1] \
        | mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]  # 4-neighbour boundary
    np.testing.assert_array_equal(thumbnail[~edge], pixels[~edge])
    assert (thumbnail[edge] == [0, 255, 0]).all()
    assert edge.sum() >= 0.8 * np.pi * np.sqrt(4 * mask.sum() / np.pi)  # all the way round the cell
    shown = cell_thumbnail(smear, labels, label, window)
    assert shown.shape == (THUMBNAIL_PX, THUMBNAIL_PX, 3) and shown.dtype == np.uint8


def test_a_thumbnail_at_the_border_is_black_beyond_the_smear_and_grey_without_one():
    smear = imread(CHULA_1)
    labels = np.zeros(smear.shape[:2], dtype=np.int32)
    labels[0:20, 0:20] = 7  # a cell in the corner
    corner = (-5, -5, 25, 25)
    thumbnail = cell_thumbnail(smear, labels, 7, corner, size=30)
    assert (thumbnail[:5] == 0).all() and (thumbnail[:, :5] == 0).all()
    np.testing.assert_array_equal(thumbnail[6:24, 6:24], smear[1:19, 1:19, :3])
    gray16 = smear[..., 1].astype(np.uint16) * 16  # a 12-bit grayscale camera
    thumbnail = cell_thumbnail(gray16, labels, 7, corner, contrast_limits=(0, 4095), size=30)
    np.testing.assert_allclose(thumbnail[6:24, 6:24, 0], smear[1:19, 1:19, 1].astype(float) * 16 / 4095 * 255, atol=0.51)
    assert (thumbnail[..., 0] == thumbnail[..., 2]).all()
    halved = cell_thumbnail(smear, labels, 7, corner, size=15)  # each pixel the mean of a 2 x 2 block
    np.testing.assert_allclose(halved[3:11, 3:11], smear[1:17, 1:17, :3].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3)),
                               atol=0.51)
    unoutlined = cell_thumbnail(smear, labels, 8, corner, size=15)  # no cell 8: no outline over the edge
    assert (unoutlined[:2] == 0).all() and (unoutlined[:, :2] == 0).all()  # wholly beyond the smear
    # half beyond it (rows -1 and 0): half as bright as the smear's first row, fading to black
    np.testing.assert_allclose(unoutlined[2, 3:11], smear[0, 1:17, :3].reshape(8, 2, 3).mean(axis=1) / 2, atol=0.51)
    mask_only = cell_thumbnail(None, labels, 7, corner, size=30)
    assert mask_only[15, 15].tolist() == [160, 160, 160] and mask_only[27, 27].tolist() == [40, 40, 40]


def test_a_thumbnail_of_a_wide_window_is_the_smear_averaged_not_sampled():
    smear = imread(CHULA_1)
    no_cell = np.zeros(smear.shape[:2], dtype=np.int32)
    top, left = 100, 200  # a window of 4 x 24 px inside the smear: each thumbnail pixel the mean of a 4 x 4 block
    thumbnail = cell_thumbnail(smear, no_cell, 1, (left, top, left + 96, top + 96), size=24)
    blocks = smear[top:top + 96, left:left + 96, :3].astype(float).reshape(24, 4, 24, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(thumbnail, blocks, atol=0.51)
    # Stripes one pixel wide, every third pixel lit: sampled, a thumbnail pixel every 3 px would
    # land on the same phase of them each time and show a flat 0 or 255, not their mean.
    stripes = np.zeros((300, 300), dtype=np.uint8)
    stripes[:, ::3] = 255
    shown = cell_thumbnail(stripes, no_cell[:300, :300], 1, (30, 30, 120, 120), size=30)
    np.testing.assert_allclose(shown, 85, atol=0.51)
    # Every fifth pixel lit, 3.5 smear pixels a thumbnail pixel: each thumbnail pixel should show
    # the lit share of its 3.5 px (0 to 1/3.5 of 255). Sampled, the mean error was 47 levels.
    stripes = np.zeros((300, 300), dtype=np.uint8)
    stripes[:, ::5] = 255
    shown = cell_thumbnail(stripes, no_cell[:300, :300], 1, (30, 30, 135, 135), size=30)[..., 0].astype(float)
    edges = 30 + 3.5 * np.arange(31)
    lit_before = np.concatenate([[0], np.cumsum(np.arange(300) % 5 == 0)])  # lit pixels left of each edge
    lit_up_to = lit_before[edges.astype(int)] + (edges.astype(int) % 5 == 0) * (edges % 1)
    area_mean = np.diff(lit_up_to) / 3.5 * 255
    assert abs(shown.mean() - 51) < 3 and np.abs(shown - area_mean).mean() < 30


def test_display_scales_by_the_contrast_limits_as_napari_draws():
    gray12 = np.array([[0, 1000, 4095, 5000]], dtype=np.uint16)
    np.testing.assert_array_equal(display_rgb(gray12, (0, 4095))[0, :, 0], [0, 62, 255, 255])
    assert display_rgb(gray12, (1000, 2000))[0, 1].tolist() == [0, 0, 0]


def test_the_cell_map_and_its_gallery_load_without_torch():
    """Mapping and labelling need no torch: the window geometry lives apart from the crops."""
    code = "import sys, napari_reddino.widgets.cell_map_widget; print(sorted(set(sys.modules) & {'torch', 'timm'}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def icon_pixels(item) -> np.ndarray:
    image = item.icon().pixmap(THUMBNAIL_PX, THUMBNAIL_PX).toImage().convertToFormat(QImage.Format.Format_RGB888)
    pointer = image.constBits()
    pointer.setsize(image.sizeInBytes())
    rows = np.frombuffer(pointer, np.uint8).reshape(image.height(), image.bytesPerLine())
    return rows[:, :3 * image.width()].reshape(image.height(), image.width(), 3).copy()  # before image goes


def click_item(qtbot, grid, row: int, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    qtbot.mouseClick(grid.viewport(), Qt.MouseButton.LeftButton, modifier, grid.visualItemRect(grid.item(row)).center())


def test_the_gallery_shows_the_selection_labels_it_and_leaves_cells_out(viewer, qtbot, tiny_folder):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1, crops=("masked", "cell", 0.5))
    dock, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    gallery = widget.gallery
    widget.select(np.arange(len(widget.pool)) % 10 == 3)
    chosen = np.flatnonzero(widget.selected)
    widget.show_gallery()
    assert GALLERY_NAME in viewer.window.dock_widgets
    assert gallery.points() == chosen.tolist()
    assert gallery.heading.text().startswith(f"{len(chosen)} selected cells.")
    # Each thumbnail is its cell in the window the model's crop had (here sized to the cell, with a wide margin).
    table = cells.features.set_index("label")
    bounds = table.loc[widget.pool.label_ids, ["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]]
    windows = square_windows(bounds.to_numpy(float), 0.5, "cell")
    smear = viewer.layers["1"]
    first = int(widget.pool.label_ids[chosen[0]])
    expected = cell_thumbnail(smear.data, cells.data, first, windows[chosen[0]], contrast_limits=smear.contrast_limits)
    # (Xvfb's 16-bit screen keeps 5-6 bits of each channel of a pixmap, so the icon is within 8 levels.)
    assert np.abs(icon_pixels(gallery.grid.item(0)).astype(int) - expected).max() <= 8
    assert np.abs(icon_pixels(gallery.grid.item(1)).astype(int) - expected).mean() > 8  # another cell
    assert gallery.grid.item(0).text() == "no class"
    # Shown again unchanged, the thumbnails are not cut anew (the plugin's viewer hands out a new
    # proxy of the smear layer each time: the cache must know it for the same layer).
    thumbnails = widget._thumbnails
    again = [cell.thumbnail for cell in thumbnails.entries(chosen, widget.class_list.colours)]
    assert all(a is b for a, b in zip(again, (cell.thumbnail for cell in thumbnails.entries(
        chosen, widget.class_list.colours))))
    # A cell cut from an overlapping neighbour says so when hovered.
    overlapping = table.loc[widget.pool.label_ids[chosen], "outline_shared"].to_numpy() >= OVERLAPPING_OUTLINE
    assert 0 < overlapping.sum() < len(chosen)
    assert [("overlaps a neighbour" in gallery.grid.item(row).toolTip()) for row in range(len(chosen))] == \
        overlapping.tolist()

    # A number key in the gallery labels the whole selection; the captions follow.
    window = viewer.window._qt_window
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow)  # shortcuts fire only in the active window
    gallery.grid.setFocus()
    qtbot.keyClick(gallery.grid, "1")
    manual = cells.features.set_index("label")["manual_label"]
    assert (manual.loc[widget.pool.label_ids[chosen]] == "normal").all()
    assert [gallery.grid.item(row).text() for row in range(gallery.grid.count())] == ["normal"] * len(chosen)
    # ... and the outlines: each thumbnail is cut again in its class's colour
    normal = tuple(np.round(widget.class_list.colours["normal"][:3] * 255).astype(int))
    outlined = cell_thumbnail(smear.data, cells.data, first, windows[chosen[0]], contrast_limits=smear.contrast_limits,
                              outline=normal)
    assert np.abs(icon_pixels(gallery.grid.item(0)).astype(int) - outlined).max() <= 8

    # Ctrl-click highlights without moving the view; Delete leaves the highlighted out (their labels stay).
    centre = viewer.scene.camera.center
    click_item(qtbot, gallery.grid, 1, Qt.KeyboardModifier.ControlModifier)
    click_item(qtbot, gallery.grid, 3, Qt.KeyboardModifier.ControlModifier)
    assert gallery.highlighted() == [chosen[1], chosen[3]] and viewer.scene.camera.center == centre
    widget.recolour()  # the gallery is filled again (a label, a colour): the highlighted stay so
    assert gallery.highlighted() == [chosen[1], chosen[3]]
    qtbot.keyClick(gallery.grid, Qt.Key.Key_Delete)
    kept = np.delete(chosen, [1, 3])
    np.testing.assert_array_equal(np.flatnonzero(widget.selected), kept)
    assert gallery.points() == kept.tolist()
    assert (cells.features.set_index("label").loc[widget.pool.label_ids[chosen], "manual_label"] == "normal").all()

    # A plain click shows the cell in its smear and leaves the selection as it is.
    click_item(qtbot, gallery.grid, 2)
    label = int(widget.pool.label_ids[kept[2]])
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], table.loc[label, ["centroid_y", "centroid_x"]], atol=1e-3)
    np.testing.assert_array_equal(np.flatnonzero(widget.selected), kept)

    # A selection larger than the gallery is shown as a sample, said so; a cell left out of it
    # changes that one thumbnail, not the sample.
    widget.select(np.ones(len(widget.pool), dtype=bool))
    assert len(widget.pool) > MAX_CELLS
    sample = gallery.points()
    assert len(sample) == MAX_CELLS and sample == sorted(sample)
    assert gallery.heading.text().startswith(f"{MAX_CELLS} of the {len(widget.pool)} selected cells, picked at random")
    widget.leave_out([sample[5]])
    assert len(gallery.points()) == MAX_CELLS and len(set(gallery.points()) & set(sample)) == MAX_CELLS - 1

    # Closed with its own button and opened again, it shows the selection; with the smear
    # closed, each cell's mask stands in for it.
    viewer.window.remove_dock_widget(gallery)  # as its close button does
    viewer.layers.remove(smear)
    widget.show_gallery()
    assert len(gallery.points()) == MAX_CELLS and set(gallery.points()) <= set(np.flatnonzero(widget.selected))
    point = gallery.points()[0]
    grey = cell_thumbnail(None, cells.data, int(widget.pool.label_ids[point]), windows[point])
    assert np.abs(icon_pixels(gallery.grid.item(0)).astype(int) - grey).max() <= 8
    # Another image opened under its name (a second camera's "Image001") is not its smear: the masks
    # stay. Its own pixels opened again are, and the cells link to that layer from then on.
    other = viewer.add_image(smear.data[::-1], name="1", rgb=smear.rgb)
    assert np.abs(icon_pixels(gallery.grid.item(0)).astype(int) - grey).max() <= 8
    viewer.layers.remove(other)
    again = viewer.add_image(smear.data, name="1", rgb=smear.rgb)  # the open gallery shows it at once
    cut = cell_thumbnail(again.data, cells.data, int(widget.pool.label_ids[point]), windows[point],
                         contrast_limits=again.contrast_limits)
    assert np.abs(icon_pixels(gallery.grid.item(0)).astype(int) - cut).max() <= 8
    assert cells.metadata[SOURCE_LAYER] == str(again.unique_id)

    # Painting the cells drops the map, and the gallery empties; closing the Cell map closes the gallery.
    cells.paint((5, 5), 1)
    assert gallery.points() == [] and gallery.heading.text().startswith("No map yet")
    viewer.window.remove_dock_widget(dock)
    assert GALLERY_NAME not in viewer.window.dock_widgets


def test_predictions_show_with_their_probability_and_a_class_is_selected_whole(viewer, qtbot, tiny_folder):  # noqa: F811
    embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    n = len(widget.pool)
    widget.select(np.arange(n) < 4)
    widget.assign("normal")
    widget.select(np.arange(n) >= n - 4)
    widget.assign("spherocyte")
    widget.train()
    widget.select(np.arange(n) == n // 2)
    widget.show_gallery()
    predicted = widget.pool.column("predicted_class", UNLABELLED)[n // 2]
    probability = widget.pool.column("prediction_probability")[n // 2]
    assert widget.gallery.grid.item(0).text() == f"{predicted} ({probability:.0%})"
    assert "predicted class" in widget.gallery.grid.item(0).toolTip()

    # Select class: the cells labelled so by hand, and the unlabelled ones the head calls so.
    manual = widget.pool.column("manual_label", UNLABELLED)
    calls_normal = (manual == UNLABELLED) & (widget.pool.column("predicted_class", UNLABELLED) == "normal")
    assert 0 < calls_normal.sum() < n - 8  # the head calls some cells normal, not all
    widget.class_list.table.selectRow(widget.class_list.classes.index("normal"))
    widget.buttons["Select class"].changed.emit(True)
    np.testing.assert_array_equal(widget.selected, (manual == "normal") | calls_normal)
    assert widget.status.value == f"{4 + calls_normal.sum()} cells of 'normal' selected: 4 labelled by hand, " \
                                  f"{calls_normal.sum()} predicted."
    assert widget.gallery.points() == np.flatnonzero(widget.selected).tolist()
    widget.select_class("teardrop")
    assert not widget.selected.any() and widget.status.value == "No cell is 'teardrop' yet."


def test_export_draws_each_smear_s_classes_beside_the_table(viewer, qtbot, tiny_folder, tmp_path, monkeypatch):  # noqa: F811
    cells = embed(viewer, qtbot, tiny_folder[1], CHULA_1)
    embed(viewer, qtbot, tiny_folder[1], ASLAN_1)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    compute_map(widget, qtbot)
    on_chula = widget.pool.layer_index == list(widget.pool.layers).index(cells)
    every = np.arange(len(widget.pool))
    widget.select(on_chula & (every % 5 == 0))
    widget.assign("normal")
    widget.select(on_chula & (every % 5 == 1))
    widget.assign("spherocyte")
    widget.with_galleries.value = True
    csv = widget.export_csv(tmp_path / "cells")
    assert widget.status.value.endswith("; 1 class picture in cells_galleries; no picture of 'image-1' "
                                        "(none of its whole cells has a class yet).")
    # The smear as it is shown, its classes in the list's order and colours.
    drawn = imread(tmp_path / "cells_galleries" / "1.png")[..., :3]
    assert drawn.shape[0] == 2 * (THUMBNAIL_PX + 2 * GAP_PX)  # normal, spherocyte
    smear = viewer.layers["1"]
    np.testing.assert_array_equal(drawn, class_gallery(smear.data, cells.data, pd.DataFrame(cells.features),
                                                       widget.class_list.classes, widget.class_list.hex_colours,
                                                       contrast_limits=smear.contrast_limits))
    normal = np.array([int(widget.class_list.hex_colours["normal"][i:i + 2], 16) for i in (1, 3, 5)])
    first = drawn[GAP_PX:GAP_PX + THUMBNAIL_PX, -ROW_CELLS * (THUMBNAIL_PX + GAP_PX):]
    assert (first == normal).all(axis=-1).sum() > 10 * 30  # ten cells outlined in the colour of "normal"

    # Exported again, the folder is drawn anew, once asked; No keeps everything.
    answer, asked = QMessageBox.StandardButton.No, []
    monkeypatch.setattr(QMessageBox, "question", lambda _, title, text: asked.append(text) or answer)
    before = (tmp_path / "cells_galleries" / "1.png").stat().st_mtime_ns
    assert widget.export_csv(csv) is None
    assert asked.pop() == "cells.csv, cells_summary.csv and cells_galleries (1 picture, drawn anew) exist. Replace?"
    assert (tmp_path / "cells_galleries" / "1.png").stat().st_mtime_ns == before
    # With its smear closed, a smear's picture is not drawn again, and the old one goes: it would not match.
    answer = QMessageBox.StandardButton.Yes
    viewer.layers.remove(smear)
    assert widget.export_csv(csv) == csv
    assert widget.status.value.endswith("; no picture of '1' (its image is not open), 'image-1' (none of its whole "
                                        "cells has a class yet); removed the earlier export's 1 picture.")
    assert not (tmp_path / "cells_galleries").exists()

    # An export without pictures takes an earlier export's away, once asked.
    (tmp_path / "cells_galleries").mkdir()
    imsave(tmp_path / "cells_galleries" / "1.png", drawn, check_contrast=False)
    widget.with_galleries.value = False
    assert widget.export_csv(csv) == csv
    assert asked.pop() == ("cells.csv and cells_summary.csv exist and will be replaced; cells_galleries (1 picture), "
                           "from an earlier export, would not match the new table and will be deleted. Go on?")
    assert widget.status.value.endswith("; removed the earlier export's 1 picture.")
    assert pictures_in(tmp_path / "cells_galleries") == []

    # A file where the pictures would go: refused before anything is written.
    (tmp_path / "cells_galleries").write_text("notes")
    widget.with_galleries.value = True
    before = csv.stat().st_mtime_ns
    assert widget.export_csv(csv) is None and csv.stat().st_mtime_ns == before
    assert widget.status.value == ("Nothing was written: cells_galleries is a file, where the pictures would go; "
                                   "move it, or untick Also draw each smear's classes.")
