"""The Segment cells widget, docked through the manifest in a real viewer, on real smears."""

import gc
import re
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from napari.layers import Labels
from PIL import Image
from napari.utils.notifications import NotificationSeverity, notification_manager
from skimage.io import imread

from _layers import LazyLevel

from napari_reddino import estimate_cell_diameter, segment_cells
from napari_reddino.widgets.smear_colours import MARK
from napari_reddino.cell_embeddings import labels_digest
from napari_reddino.widgets.cells_layer import (CARRIED_TO, MEASURED_IMAGE, MEASURED_LABELS, SEGMENTED_LABELS,
                                                 carried_to, measured_on)
from napari_reddino.widgets.smear_links import SOURCE_DIGEST

DATA = Path(__file__).parent / "data"
CHULA_1 = DATA / "chula_rbc12" / "1.jpg"
RUN_TIMEOUT_MS = 60_000


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Segment cells")
    return widget


@pytest.fixture
def chula(viewer):
    """Chula RBC-12 image 1 as the plugin's sample opens it: 0.2 µm pixels, 117 annotated cells."""
    (layer,) = viewer.open_sample("napari-reddino", "chula-smear")
    np.testing.assert_array_equal(layer.data, imread(CHULA_1))
    return layer


def annotated_centres() -> np.ndarray:
    """(row, col) of every annotated cell; the file lists ``x y class``."""
    return np.loadtxt(DATA / "chula_rbc12" / "1.txt", usecols=(1, 0))


def labels_layers(viewer) -> list[Labels]:
    return [layer for layer in viewer.layers if isinstance(layer, Labels)]


def run(widget, qtbot):
    """Run the widget and wait for the end of the run, whatever its outcome."""
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()


def assert_one_row_per_cell(cells: Labels) -> None:
    ids = np.unique(cells.data)
    np.testing.assert_array_equal(cells.features["label"], ids[ids > 0])
    np.testing.assert_array_equal(cells.features["index"], cells.features["label"])


def test_segments_the_chula_smear_into_a_hoverable_cells_layer(viewer, widget, chula, qtbot):
    assert widget.image.value.name == chula.name
    assert widget.pixel_size.value == pytest.approx(0.2)  # prefilled from the layer's metadata

    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()

    (cells,) = labels_layers(viewer)
    assert result.args[0].name == cells.name == "smear (chula) cells"
    assert_one_row_per_cell(cells)
    count = len(cells.features)
    assert 100 <= count <= 140
    assert widget.status.value.startswith(f"{count:,} cells found in ")
    np.testing.assert_allclose(cells.scale, (0.2, 0.2))
    np.testing.assert_allclose(cells.translate, chula.translate)
    assert cells.contour == 2
    assert cells.metadata["source_image"] == chula.name
    assert cells.metadata["pixel_size_um"] == pytest.approx(0.2)
    assert cells.metadata["cell_diameter_px"] == pytest.approx(37.5)  # a red cell is ~7.5 µm
    assert cells.metadata["cell_diameter_from"] == "pixel size"
    assert "area_um2" in cells.features

    # Hovering: the world position of an annotated centre finds its cell and that cell's row.
    rows = cells.features.set_index("label")
    hits = [cells.get_value(centre * 0.2, world=True) for centre in annotated_centres()]
    found = [label for label in hits if label]
    assert len(found) >= 0.9 * len(hits)
    assert all(rows.loc[label, "index"] == label for label in found)
    status = cells.get_status(annotated_centres()[0] * 0.2, world=True)
    assert f"label: {hits[0]}, " in status["coordinates"]

    widget.cell_diameter.value = 30
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):
        widget.run()

    assert labels_layers(viewer) == [cells]
    assert cells.metadata["cell_diameter_px"] == 30
    assert cells.metadata["cell_diameter_from"] == "given"
    assert_one_row_per_cell(cells)

    # A renamed smear is segmented again into its own cells layer, found by its link, not its name.
    chula.name = "patient 17"
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert labels_layers(viewer) == [cells] and cells.metadata["source_image"] == "patient 17"
    chula.name = "smear (chula)"

    # Labels of blanks are none: the layer is segmented again in place, and shown if it was hidden.
    # A brush stroke taken back before it cannot be redone into the new cells.
    cells.features = cells.features.assign(manual_label=" ")
    y, x = (size // 2 for size in cells.data.shape)
    cells.paint((y, x), 7)
    cells.undo()
    cells.visible = False
    widget.cell_diameter.value = widget.pixel_size.value = 0  # auto and unknown: the size is estimated
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert labels_layers(viewer) == [cells] and cells.visible
    assert cells.metadata["cell_diameter_from"] == "estimated from the image"
    assert cells.metadata["cell_diameter_px"] == estimate_cell_diameter(chula.data)
    assert "area_um2" not in cells.features
    np.testing.assert_array_equal(cells.data, segment_cells(chula.data))  # as the API segments it
    segmented = cells.data.copy()
    cells.redo()
    cells.undo()
    np.testing.assert_array_equal(cells.data, segmented)

    # Once its cells carry the user's labels, a cells layer is kept and the new one goes beside it,
    # above the old one's map colours (and below a smear opened later).
    cells.features = cells.features.assign(manual_label=["normal"] + [""] * (len(cells.features) - 1))
    kept = cells.data.copy()
    colours = viewer.add_labels(np.zeros_like(kept), name=f"{cells.name} map colours", metadata={MARK: chula.name})
    later = viewer.add_image(chula.data, name="a later smear")
    widget.image.value = chula  # (opening it chose the later smear)
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    again = result.args[0]
    assert list(viewer.layers) == [chula, cells, colours, again, later]
    assert again.name == "smear (chula) cells [1]"
    # The same settings find the same cells: the label goes to the new layer's cell at that place,
    # and the labelled layer is hidden beneath it.
    first = cells.features.iloc[0]
    at_place = again.data[int(round(first["centroid_y"])), int(round(first["centroid_x"]))]
    assert again.features.set_index("label")["manual_label"].to_dict() == {
        label: "normal" if label == at_place else "" for label in again.features["label"]}
    assert not cells.visible and widget.status.value.endswith(
        f"; 1 label of {cells.name!r} carried over to the same cells; {cells.name!r} is hidden")
    # Segmented a third time: the labels come from the newer layer only, so one cleared there stays so.
    again.features = again.features.assign(manual_label=np.where(np.arange(len(again.features)) == 1, "target cell", ""))
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    third = result.args[0]
    assert set(third.features["manual_label"]) == {"", "target cell"} and not again.visible
    assert widget.status.value.endswith(f"; 1 label of {again.name!r} carried over to the same cells; "
                                        f"{again.name!r} is hidden")
    viewer.layers.remove(third)
    viewer.layers.remove(again)  # gone: the labels it took are with the first layer again
    cells.visible = True
    # Segmented again, the new layer takes the removed one's name; the labels come over all the same.
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    fourth = result.args[0]
    assert fourth.name == again.name and not cells.visible
    assert list(fourth.features["manual_label"]).count("normal") == 1
    fourth.name = "patient 7"  # renamed: the layer whose labels it took is still left behind
    assert carried_to(viewer, cells).unique_id == fourth.unique_id
    viewer.layers.remove(fourth)
    assert carried_to(viewer, cells) is None
    cells.visible = True
    cells.name = "mine"  # renamed while mapped: still its smear's, and so are its map colours
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    assert list(viewer.layers) == [chula, cells, colours, result.args[0], later]
    np.testing.assert_array_equal(cells.data, kept)
    assert list(cells.features["manual_label"][:2]) == ["normal", ""]
    assert list(result.args[0].features["manual_label"]).count("normal") == 1  # carried from 'mine'
    assert_one_row_per_cell(result.args[0])
    # Segmented otherwise (cells twice as large expected: some are merged), the labels of cells not
    # found again stay behind on the hidden layer, and the status says how many.
    labelled = result.args[0]
    labelled.features = labelled.features.assign(manual_label="normal")
    widget.cell_diameter.value = 2 * labelled.metadata["cell_diameter_px"]
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    said = re.search(r"; ([\d,]+) labels? of '[^']+' carried over to the same cells, ([\d,]+) not \(those cells "
                     r"were split, merged or drawn otherwise\); '[^']+' is hidden$", widget.status.value)
    carried, missed = (int(number.replace(",", "")) for number in said.groups())
    assert missed > 0 and carried + missed == len(labelled.features)
    assert (result.args[0].features["manual_label"] == "normal").sum() == carried and not labelled.visible


def test_masks_a_lab_saved_under_the_smear_s_cells_name_are_kept_beside_a_new_segmentation(viewer, widget, chula,
                                                                                             qtbot):
    masks = np.zeros(chula.data.shape[:2], np.int32)
    masks[100:140, 100:140] = 1  # opened from "chula-smear cells.tif": no record of being segmented here
    theirs = viewer.add_labels(masks.copy(), name=f"{chula.name} cells")
    run(widget, qtbot)
    (new,) = [layer for layer in labels_layers(viewer) if layer.name != theirs.name]
    assert new.metadata["source_image"] == chula.name and len(new.features) > 100
    np.testing.assert_array_equal(theirs.data, masks)


def test_labelled_masks_of_another_size_under_the_smear_s_name_give_no_labels_and_stay_shown(viewer, widget, chula,
                                                                                             qtbot):
    # A lab's masks of the smear at half its size, labelled: no cell of theirs lies where the new
    # cells are, so nothing is carried and their layer stays as it was.
    masks = np.zeros((chula.data.shape[0] // 2, chula.data.shape[1] // 2), np.int32)
    masks[50:70, 50:70] = 1
    theirs = viewer.add_labels(masks, name=f"{chula.name} cells", features={"label": [1], "manual_label": ["normal"]})
    run(widget, qtbot)
    (new,) = [layer for layer in labels_layers(viewer) if layer.name != theirs.name]
    assert theirs.visible and "carried over" not in widget.status.value
    assert "manual_label" not in new.features and CARRIED_TO not in theirs.metadata


def test_cells_of_an_older_version_are_replaced_unless_edited_since_they_were_measured(viewer, widget, chula, qtbot):
    run(widget, qtbot)
    (cells,) = labels_layers(viewer)
    del cells.metadata[SEGMENTED_LABELS]  # an older version recorded only the labels it measured
    run(widget, qtbot)
    assert labels_layers(viewer) == [cells] and SEGMENTED_LABELS in cells.metadata  # replaced in place

    del cells.metadata[SEGMENTED_LABELS]
    painted = cells.data.copy()
    painted[:12, :12] = painted.max() + 1  # a cell drawn by hand since it was measured
    cells.data = painted
    run(widget, qtbot)
    (new,) = [layer for layer in labels_layers(viewer) if layer is not cells]
    np.testing.assert_array_equal(cells.data, painted)
    assert not cells.visible and new.visible and "edited by hand since they were segmented" in widget.status.value


def test_blank_image_gives_a_notice_and_no_layer(viewer, widget, qtbot):
    viewer.add_image(np.full((256, 256, 3), 230, np.uint8), rgb=True, name="blank")

    run(widget, qtbot)

    assert labels_layers(viewer) == []
    notice = "No cells found in 'blank': is it a blood smear? Try setting the cell diameter."
    assert widget.status.value == notice
    assert notification_manager.records[-1].message == notice
    # Smaller than the diameter it gives when nothing stands out: not a diameter the user typed.
    viewer.add_image(np.full((24, 24, 3), 230, np.uint8), rgb=True, name="tiny blank")
    run(widget, qtbot)
    assert widget.status.value == "No cells found in 'tiny blank': is it a blood smear? Try setting the cell diameter."


BAD_LAYERS = {
    "two channels": ((np.arange(64 * 64 * 2) % 251).astype(np.uint8).reshape(64, 64, 2), "(64, 64, 2)"),
    "stack": ((np.arange(3 * 64 * 64) % 251).astype(np.uint8).reshape(3, 64, 64),
              "(3, 64, 64) is a 3-D stack of planes in napari, not one smear (a colour photo stored channel by channel?"),
    "nan": (np.where(np.eye(64, dtype=bool), np.nan, 0.5).astype(np.float32), "NaN"),
    "small colour": (np.full((24, 160, 3), 200, np.uint8), "(24, 160, 3) is shown by napari as 24 planes of 160 x 3, "
                     "not in colour: napari takes an image for colour only when both its sides exceed 30 px."),
}


def test_bad_images_give_a_clear_error_and_leave_the_cells_layer_untouched(viewer, widget, chula, qtbot):
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):
        widget.run()
    (cells,) = labels_layers(viewer)
    data, features, metadata = cells.data.copy(), cells.features.copy(), dict(cells.metadata)
    huge = np.broadcast_to(np.uint8(200), (20_000, 16_000, 3))  # 320 Mpx, of no memory: never read whole
    viewer.add_image([huge, huge[::64, ::64]], multiscale=True, rgb=True, name="pyramid")
    planes = np.broadcast_to(np.uint8(200), (3, 20_000, 16_000))
    viewer.add_image([planes, planes[:, ::64, ::64]], multiscale=True, name="pyramid of planes")
    for name, (pixels, _) in BAD_LAYERS.items():
        viewer.add_image(pixels, name=name)
    expected = {name: detail for name, (_, detail) in BAD_LAYERS.items()} | {
        "pyramid": "'pyramid' is a slide pyramid whose full resolution, 16,000 x 20,000 px (320,000,000 pixels), is "
                   "more than the widgets read at once (268,435,456 pixels): save the region to analyse as a TIFF",
        "pyramid of planes": "(3, 20000, 16000) is a 3-D stack of planes in napari, not one smear"}

    for name, detail in expected.items():
        widget.image.value = viewer.layers[name]
        run(widget, qtbot)

        assert detail in widget.status.value
        assert "RGB (H, W, 3)" in widget.status.value or name in ("nan", "small colour", "pyramid")
        notification = notification_manager.records[-1]
        assert notification.severity == NotificationSeverity.ERROR
        assert notification.message == widget.status.value

    assert labels_layers(viewer) == [cells]
    np.testing.assert_array_equal(cells.data, data)
    assert cells.features.equals(features)
    assert cells.metadata == metadata


def test_files_napari_opens_as_their_stored_planes_are_refused_with_the_way_to_open_them(viewer, widget, chula,
                                                                                         qtbot, tmp_path):
    # A CMYK file's inks pass for RGB and alpha (42 cells found instead of 124); gray with alpha is two planes.
    with Image.open(DATA / "chula_rbc12" / "1.jpg") as photo:
        photo.convert("CMYK").save(tmp_path / "print.jpg")
        photo.convert("CMYK").save(tmp_path / "print.tif")
        photo.convert("LA").save(tmp_path / "gray.png")
    for name in ("print.jpg", "print.tif", "gray.png"):
        (layer,) = viewer.open(tmp_path / name)
        widget.image.value = layer
        run(widget, qtbot)
        kind = ("is a CMYK image (a print workflow's), whose four inks napari shows as red, green, blue and alpha"
                if name.startswith("print") else "of shape (480, 640, 2) is a gray image with alpha, which napari "
                                                  "shows as 480 planes")
        assert widget.status.value.startswith(f"{layer.name!r} {kind}. Open it with `python -m napari_reddino "
                                              f"--image \"{tmp_path / name}\"`, which reads it as the smear it is")
    assert labels_layers(viewer) == []
    # The same pixels from no such file: the layer says nothing otherwise, so they are taken as RGBA.
    widget.image.value = viewer.add_image(np.asarray(Image.open(tmp_path / "print.jpg")), name="inks", rgb=True)
    run(widget, qtbot)
    assert len(labels_layers(viewer)) == 1


def test_a_slide_pyramid_is_segmented_at_full_resolution_with_its_cells_on_its_pixels(viewer, widget, chula, qtbot):
    # as a reader of pyramidal TIFFs opens one: levels halving, in micrometres, a little off the origin
    pyramid = viewer.add_image([chula.data, chula.data[::2, ::2], chula.data[::4, ::4]], multiscale=True, rgb=True,
                               name="slide", scale=(0.25, 0.25), translate=(100.0, 50.0))
    widget.image.value = pyramid
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    cells = result.args[0]
    np.testing.assert_array_equal(cells.data, segment_cells(chula.data))
    assert tuple(cells.scale) == (0.25, 0.25) and tuple(cells.translate) == (100.0, 50.0)
    assert widget.status.value.startswith(f"{len(cells.features)} cells found in 'slide'")


def test_cancel_leaves_no_layer(viewer, widget, chula, qtbot):
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        widget.cancel()

    assert labels_layers(viewer) == []
    assert widget.status.value == "Cancelled; nothing was changed."


def test_a_smear_renamed_while_it_is_segmented_gets_cells_of_its_new_name_and_a_closed_one_none(
        viewer, widget, chula, qtbot):
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
        chula.name = "patient 0042"  # before the result arrives
    cells = result.args[0]
    assert (cells.name, cells.metadata["source_image"]) == ("patient 0042 cells", "patient 0042")
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        cells.name = "kept"
        viewer.layers.remove(chula)
    assert labels_layers(viewer) == [cells] and cells.name == "kept"
    assert widget.status.value == "'patient 0042' was closed while it was segmented; no cells layer was added."


def test_a_smear_closed_while_it_is_segmented_is_let_go_of(viewer, widget, qtbot):
    # A lab closes smear after smear; the panel must not keep the last one's pixels.
    image = viewer.add_image(imread(CHULA_1)[:300, :300].copy(), name="closed")
    pixels = weakref.ref(image.data)
    widget.image.value = image
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        viewer.layers.remove(image)
    del image
    gc.collect()
    assert pixels() is None and labels_layers(viewer) == []


def test_the_image_choice_follows_the_smear_selected_in_the_layer_list(viewer, widget):
    first = viewer.open(CHULA_1)[0]
    second = viewer.add_image(imread(CHULA_1)[::2, ::2], rgb=True, name="half")
    assert widget.image.value is second  # the one just opened
    viewer.layers.selection.active = first
    assert widget.image.value is first
    cells = viewer.add_labels(np.zeros((480, 640), np.int32), name="1 cells")  # a cells layer: no image to follow
    assert viewer.layers.selection.active is cells and widget.image.value is first


def test_a_smear_selected_while_another_is_segmented_is_chosen_when_the_run_ends(viewer, widget, chula, qtbot):
    other = viewer.add_image(imread(CHULA_1)[::2, ::2], rgb=True, name="next smear")
    viewer.layers.selection.active = chula
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
        viewer.layers.selection.active = other  # the run goes on with the smear it began with
        assert widget.image.value is chula
    assert result.args[0].metadata["source_image"] == chula.name
    assert widget.image.value is other and widget.status.value.startswith(f"{len(result.args[0].features)} cells found "
                                                                           f"in {chula.name!r} in ")
    widget.pixel_size.value = 0.4  # typed for the smear now chosen
    assert other.metadata["pixel_size_um"] == 0.4 and chula.metadata["pixel_size_um"] == pytest.approx(0.2)
    # Chosen in the panel after a selection in the layer list, during a run: the panel's choice stays.
    third = viewer.add_image(imread(CHULA_1)[::3, ::3], rgb=True, name="third smear")
    widget.image.value = chula
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        viewer.layers.selection.active = other
        widget.image.value = third
    assert widget.image.value is third


def test_closing_the_panel_mid_run_cancels_it(viewer, widget, chula, qtbot):
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        viewer.window.remove_dock_widget(widget)  # as its close button does
    assert labels_layers(viewer) == []  # nothing lands in the viewer from a panel that is gone
    other = viewer.add_image(chula.data[::2, ::2], rgb=True, name="half")
    assert viewer.layers.selection.active is other and widget.image.value is chula  # it follows no more


def test_a_cell_diameter_and_pixel_size_typed_for_a_smear_stay_with_that_smear(viewer, widget):
    first = viewer.open(CHULA_1)[0]
    second = viewer.add_image(imread(CHULA_1)[::2, ::2], rgb=True, name="half")
    widget.reset_choices()
    widget.image.value = first
    assert widget.pixel_size.value == 0  # a file says nothing of its pixel size
    widget.pixel_size.value = 0.25
    widget.image.value = second
    assert widget.pixel_size.value == 0
    widget.pixel_size.value = 0.5
    widget.image.value = first
    assert widget.pixel_size.value == pytest.approx(0.25)
    # kept on the layers, where Embed cells reads it when it segments a smear first
    assert (first.metadata["pixel_size_um"], second.metadata["pixel_size_um"]) == (0.25, 0.5)
    widget.pixel_size.value = 0  # back to unknown
    assert first.metadata["pixel_size_um"] is None
    widget.cell_diameter.value = 32
    widget.image.value = second
    assert widget.cell_diameter.value == 0  # auto: 32 px was typed for the first smear, not this one
    widget.image.value = first
    assert widget.cell_diameter.value == 32 and first.metadata["cell_diameter_px"] == 32


def test_cells_edited_by_hand_are_kept_beside_those_of_a_new_segmentation(viewer, widget, chula, qtbot):
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):
        widget.run()
    (cells,) = labels_layers(viewer)
    cells.paint(tuple(size // 2 for size in cells.data.shape), 7)  # a brush stroke: a cell split or merged
    edited = cells.data.copy()
    cells.metadata[MEASURED_LABELS] = labels_digest(edited)  # as Embed cells records, measuring the edited cells
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    again = result.args[0]
    assert labels_layers(viewer) == [cells, again] and again.name == f"{cells.name} [1]"
    np.testing.assert_array_equal(cells.data, edited)
    assert again.visible and not cells.visible
    assert widget.status.value.endswith(f"; {cells.name!r}, its cells edited by hand since they were segmented, "
                                        "is kept as it was, hidden")
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS):  # the new layer, as segmented, is replaced
        widget.run()
    assert labels_layers(viewer) == [cells, again] and not cells.visible
    np.testing.assert_array_equal(cells.data, edited)


def test_cells_lie_on_their_smear_however_it_is_placed_in_the_world(viewer, widget, qtbot):
    smear = viewer.add_image(imread(CHULA_1), rgb=True, name="tilted", scale=(0.2, 0.2), translate=(5, 7),
                             rotate=10, shear=[0.1], affine=[[1, 0, 3], [0, 0.9, -2], [0, 0, 1]],
                             units=("um", "um"))  # as some slide readers open one
    widget.reset_choices()
    widget.image.value = smear
    for turn in (10, -25):  # segmented, then turned and segmented again: the same layer follows
        smear.rotate = turn
        with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
            widget.run()
        cells = result.args[0]
        assert labels_layers(viewer) == [cells]
        for world in [(10.0, 10.0), (40.0, 60.0)]:
            np.testing.assert_allclose(cells.world_to_data(world), smear.world_to_data(world), atol=1e-9)
        assert cells.units == smear.units


def test_a_pixel_size_that_cannot_be_is_refused_before_segmenting_even_with_a_typed_diameter(viewer, widget,
                                                                                            chula):
    widget.cell_diameter.value, widget.pixel_size.value = 40, 3.45  # the camera's pixel pitch
    widget.run()
    assert widget.status.value.startswith("At 3.45 µm per pixel a red cell would be 2.2 px across")
    assert widget._worker is None and not labels_layers(viewer)


def test_a_smear_s_own_pixel_size_is_used_unrounded(viewer, widget, qtbot):
    smear = viewer.add_image(imread(CHULA_1), rgb=True, name="1", metadata={"pixel_size_um": 0.12345})
    widget.reset_choices()
    widget.image.value = smear
    assert widget.pixel_size.value == pytest.approx(0.1235)  # shown to four places
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    cells = result.args[0]
    assert cells.metadata["pixel_size_um"] == 0.12345
    row = cells.features.iloc[0]
    assert row["equivalent_diameter_um"] == pytest.approx(row["equivalent_diameter_px"] * 0.12345, rel=1e-12)
    widget.pixel_size.value = 0.2  # typed: that one
    with qtbot.waitSignal(widget.segmented, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    assert result.args[0].metadata["pixel_size_um"] == pytest.approx(0.2)


def test_a_long_message_wraps_in_the_panel_without_widening_the_dock(make_napari_viewer, qtbot):
    shown = make_napari_viewer(show=True)
    shown.window.resize(1280, 800)
    _, widget = shown.window.add_plugin_dock_widget("napari-reddino", "Segment cells")
    qtbot.wait(50)
    width = widget.width()
    widget.status.value = "A model that cannot load explains at length what to do. " * 10
    qtbot.wait(50)
    assert widget.width() == width
    widget.status.value = "118 cells found in 0.8 s"
    qtbot.waitUntil(lambda: widget.status.native.height() < 2 * widget.status.native.fontMetrics().height())  # 1 line


def test_a_table_counts_as_measured_on_the_labels_and_pixels_its_layer_records():
    table = pd.DataFrame({"label": [1, 2]})
    layer = SimpleNamespace(features=table, metadata={MEASURED_LABELS: "labels", MEASURED_IMAGE: "pixels"})
    assert measured_on(layer, "labels", "pixels")
    assert not measured_on(layer, "labels", "pixels edited in place") and not measured_on(layer, "painted", "pixels")
    # Layers from before the pixels were recorded: those they were segmented (and measured) from.
    earlier = SimpleNamespace(features=table, metadata={MEASURED_LABELS: "labels", SOURCE_DIGEST: "pixels"})
    assert measured_on(earlier, "labels", "pixels") and not measured_on(earlier, "labels", "corrected")
    unknown = SimpleNamespace(features=table, metadata={MEASURED_LABELS: "labels"})  # another tool's
    assert measured_on(unknown, "labels", "pixels")
    assert not measured_on(SimpleNamespace(features=pd.DataFrame(), metadata=layer.metadata), "labels", "pixels")


def test_a_lazy_pyramid_is_read_in_a_worker_that_cancel_stops_and_whose_failure_is_said(viewer, widget, chula, qtbot):
    """A level read from disk (dask, zarr) is read off napari's thread: 4 s at 268 Mpx froze the window."""
    gate = threading.Event()
    held = LazyLevel(chula.data, gate=gate)
    viewer.add_image([held, chula.data[::2, ::2]], multiscale=True, rgb=True, name="slide")
    widget.reset_choices()
    widget.image.value = viewer.layers["slide"]
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        assert widget.status.value == "Reading 'slide'…" and not widget._run_button.enabled
        qtbot.waitUntil(lambda: len(held.read_in) == 1)  # napari answers while the read waits
        widget.cancel()
        gate.set()
    assert widget.status.value == "Cancelled; nothing was changed." and widget._run_button.enabled
    assert held.read_in[0] is not threading.main_thread() and labels_layers(viewer) == []
    gate.clear()
    held.read_in.clear()
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        qtbot.waitUntil(lambda: len(held.read_in) == 1)
        viewer.layers.remove("slide")  # closed while read: not segmented for minutes in vain
        gate.set()
    assert widget.status.value == "'slide' was closed while it was read; nothing was changed."
    assert labels_layers(viewer) == [] and widget._run_button.enabled
    viewer.add_image([LazyLevel(chula.data, error=OSError("the share went away")), chula.data[::2, ::2]],
                     multiscale=True, rgb=True, name="slide")
    widget.reset_choices()
    widget.image.value = viewer.layers["slide"]
    run(widget, qtbot)
    assert widget.status.value == "Segmentation failed: OSError: the share went away" and labels_layers(viewer) == []
    assert widget._run_button.enabled
