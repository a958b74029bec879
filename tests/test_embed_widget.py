"""The Embed cells widget, docked through the manifest, with a tiny real ViT loaded by load_embedder."""

import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _layers import LazyLevel
from _model_fixtures import TINY_DIM, hub_cache, record_crops, serving_hub, tiny_folder  # noqa: F401  (fixtures)
from napari.layers import Labels
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt, QTimer
from skimage.io import imread

from napari_reddino import embeddings_of, measure_cells, segment_cells
from napari_reddino.cell_embeddings import (
    METADATA_KEY,
    EmbeddedCells,
    changed_embeddings,
    crop_settings,
    fingerprint,
    image_digest,
    labels_digest,
    repainted_since_embedded,
    store_embeddings,
    stored_fingerprint,
)
from napari_reddino.cell_table import image_name
from napari_reddino.embedding import Embedder, clear_embedder_cache, list_devices, load_embedder
from napari_reddino.widgets import embed_widget, job_widget
from napari_reddino.widgets.embed_widget import SEGMENT_FIRST, EmbedCellsWidget
from napari_reddino.widgets.smear_colours import own_cells
from napari_reddino.widgets.smear_links import SOURCE_DIGEST

CHULA_1, CHULA_26 = (Path(__file__).parent / "data" / "chula_rbc12" / f"{n}.jpg" for n in (1, 26))
RUN_TIMEOUT_MS = 60_000
DONE = re.compile(r"^([\d,]+) cells? embedded in \d+\.\d s \([\d,]+ cells/s\) with tiny_model on cpu"
                  r"(?:; the embeddings of ([\d,]+) unchanged cells? were kept)?"
                  r"(?:; the head's predictions for ([\d,]+) cells? are cleared \(train or apply it again\))?$")


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_embedder_cache()
    yield
    clear_embedder_cache()


@pytest.fixture(scope="module")
def chula_pixels_and_cells():
    image = imread(CHULA_1)
    return image, segment_cells(image, cell_diameter=37.5)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def widget(viewer, tiny_folder):
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    widget.model_name = str(tiny_folder[1])
    widget.device.value = "cpu"
    return widget


def test_a_long_model_path_is_whole_in_the_tooltip(widget, tmp_path):
    path = str(tmp_path / ("a_long_folder_name_" * 5) / "s1")
    widget.model_name = path
    box = widget.model.native
    assert box.toolTip().startswith(path + "\n")  # the box shows only part of it
    assert box.lineEdit().cursorPosition() == len(path)  # what the box shows is the end: the model's folder
    widget.model_name = "reddino-small"
    assert box.toolTip().startswith("reddino-small\n") and path not in box.toolTip()


def run(widget, qtbot):
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()


def label_ids(cells: Labels) -> np.ndarray:
    ids = np.unique(cells.data)
    return ids[ids > 0]


def test_embeds_a_segmented_smear_once_and_again_only_when_the_labels_change(
    viewer, widget, chula_pixels_and_cells, qtbot
):
    image, labels = chula_pixels_and_cells
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="smear cells", metadata={"source_image": "smear"})
    widget.reset_choices()
    assert widget.cells.value is cells
    assert embeddings_of(cells) is None
    # the defaults, which classified Chula cells best; context crops at cell scale first, where
    # removing a cell leaves the other cells' crops as they were
    assert (widget.crop_mode.value, widget.crop_scale.value) == ("masked", "smear")
    widget.crop_mode.value, widget.crop_scale.value = "context", "cell"

    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()

    assert result.args[0] is cells
    ids, embeddings, model_id = embeddings_of(cells)
    np.testing.assert_array_equal(ids, label_ids(cells))
    assert ids.dtype == np.int64 and embeddings.dtype == np.float32
    assert embeddings.shape == (len(ids), TINY_DIM) and np.isfinite(embeddings).all()
    assert len(np.unique(embeddings.round(5), axis=0)) == len(ids)  # one vector per cell, not one for all
    assert model_id.startswith(f"{Path(widget.model_name).name}@sha256:")
    assert DONE.match(widget.status.value).group(1) == f"{len(ids):,}"
    assert not any(str(column).startswith("emb") for column in cells.features.columns)
    assert_embedded_with_settings(widget, image, cells)

    # Unchanged: nothing is recomputed, also from a fresh widget (the embeddings live on the layer).
    stored = cells.metadata[METADATA_KEY]["embeddings"]
    with qtbot.assertNotEmitted(widget.embedded):
        run(widget, qtbot)
    assert widget.status.value == (
        f"The embeddings of the {len(ids):,} cells of 'smear cells' ({Path(widget.model_name).name}) are already "
        "up to date; nothing to do."
    )
    reopened = EmbedCellsWidget(viewer)
    reopened.model_name, reopened.device.value = widget.model_name, "cpu"
    reopened.crop_mode.value, reopened.crop_scale.value = "context", "cell"
    assert reopened.cells.value is cells
    with qtbot.assertNotEmitted(reopened.embedded):
        run(reopened, qtbot)
    assert "up to date" in reopened.status.value
    assert cells.metadata[METADATA_KEY]["embeddings"] is stored

    # A deleted cell: recomputed, without that cell.
    gone = ids[len(ids) // 2]
    cells.data[cells.data == gone] = 0
    cells.refresh()
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    new_ids, new_embeddings, _ = embeddings_of(cells)
    assert new_embeddings is not stored
    np.testing.assert_array_equal(new_ids, ids[ids != gone])
    np.testing.assert_allclose(new_embeddings, embeddings[ids != gone], atol=1e-5)  # context crops: the rest unchanged

    # Another crop mode is another fingerprint too.
    widget.crop_mode.value = "masked"
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert cells.metadata[METADATA_KEY]["crop_mode"] == "masked"
    assert_embedded_with_settings(widget, image, cells)

    # So is another crop scale; at smear scale each crop shows its cell's size, so the cells'
    # embeddings differ from those at cell scale.
    masked = cells.metadata[METADATA_KEY]["embeddings"]
    widget.crop_scale.value = "smear"
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    record = cells.metadata[METADATA_KEY]
    assert (record["crop_mode"], record["crop_scale"]) == ("masked", "smear")
    assert not np.allclose(record["embeddings"], masked, atol=1e-3)
    assert_embedded_with_settings(widget, image, cells)


def assert_embedded_with_settings(widget, image, cells) -> None:
    """The cells' stored embeddings are what the API gives with the widget's crop settings."""
    ids, embeddings, _ = embeddings_of(cells)
    expected_ids, expected = load_embedder(widget.model_name, device="cpu").embed(
        image, cells.data, mode=widget.crop_mode.value, scale=widget.crop_scale.value, margin=widget.margin.value)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)


def test_segment_first_adds_the_cells_layer_then_embeds_it(viewer, widget, qtbot):
    (image,) = viewer.open_sample("napari-reddino", "chula-smear")
    widget.reset_choices()
    assert widget.image.value is image
    assert widget.cells.value == SEGMENT_FIRST

    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
        image.name = "patient 0042"  # renamed while it is segmented: its cells take the new name

    (cells,) = [layer for layer in viewer.layers if isinstance(layer, Labels)]
    # the widget sees the viewer (and its layers) through napari's public-only proxy
    assert result.args[0].name == widget.cells.value.name == cells.name
    # the layer the Segment cells widget makes: same name, metadata, scale and table
    assert cells.name == "patient 0042 cells"
    assert cells.metadata["source_image"] == "patient 0042"
    assert cells.metadata["cell_diameter_from"] == "pixel size"
    np.testing.assert_allclose(cells.scale, image.scale)
    np.testing.assert_array_equal(cells.features["label"], label_ids(cells))
    ids, embeddings, _ = embeddings_of(cells)
    np.testing.assert_array_equal(ids, label_ids(cells))
    assert embeddings.shape == (len(ids), TINY_DIM)
    assert DONE.match(widget.status.value)

    # Segmented again once its cells carry labels: a new layer beside, the labels carried over.
    cells.features = cells.features.assign(manual_label=np.where(np.arange(len(ids)) < 5, "target cell", ""))
    widget.cells.value = SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    again = viewer.layers[result.args[0].name]
    assert again.name == f"{cells.name} [1]" and not cells.visible
    np.testing.assert_array_equal(again.data, cells.data)  # the same settings: the same cells, the same ids
    assert again.features["manual_label"].tolist() == cells.features["manual_label"].tolist()
    assert notification_manager.records[-1].message == (
        f"{again.name!r}: 5 labels of {cells.name!r} carried over to the same cells; {cells.name!r} is hidden.")


def test_a_smear_segmented_again_keeps_what_its_cells_carried_or_the_embeddings_of_cells_that_stayed(
        viewer, widget, qtbot):
    (image,) = viewer.open_sample("napari-reddino", "chula-smear")
    widget.reset_choices()
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    cells = result.args[0]
    ids, stored, _ = embeddings_of(cells)
    predicted = np.where(np.arange(len(ids)) % 2, "target cell", "normal")
    cells.features = cells.features.assign(predicted_class=predicted, note="lab's own")
    _, segment = viewer.window.add_plugin_dock_widget("napari-reddino", "Segment cells")
    segment.image.value = image

    def segment_again() -> None:
        with qtbot.waitSignal(segment.finished, timeout=RUN_TIMEOUT_MS):
            segment.run()

    segment_again()  # the same settings: the same cells
    assert [layer for layer in viewer.layers if isinstance(layer, Labels)] == [cells]
    assert cells.features["predicted_class"].tolist() == predicted.tolist() and set(cells.features["note"]) == {"lab's own"}
    assert embeddings_of(cells)[1] is stored
    widget.run()
    assert widget.status.value.endswith("are already up to date; nothing to do.")
    area = cells.features["area_um2"].to_numpy()
    segment.cell_diameter.value, segment.pixel_size.value = 37.5, 0.25  # the same cells, measured at another size:
    segment_again()  # a head may read their sizes, and the lab's columns may say them
    np.testing.assert_allclose(cells.features["area_um2"], area * 1.25 ** 2)
    assert "predicted_class" not in cells.features and "note" not in cells.features
    assert segment.status.value.endswith("; the head's predictions were cleared: the cells were measured at another "
                                         "pixel size (apply the head again)")
    assert embeddings_of(cells)[1] is stored  # cut from the same pixels: still theirs
    segment.pixel_size.value = 0  # unknown now: no size in µm is left from before
    segment_again()
    assert not any(column.endswith("_um") or column.endswith("_um2") for column in cells.features.columns)
    assert embeddings_of(cells)[1] is stored
    cells.features = cells.features.assign(predicted_class=predicted)
    # A cell erased, the cells embedded (and measured) so, the stroke taken back: the table is of other labels.
    centre = cells.features.set_index("label").loc[ids[5], ["centroid_y", "centroid_x"]].to_numpy()
    cells.brush_size = 60
    cells.paint(tuple(centre.round().astype(int)), 0)
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert "predicted_class" in cells.features
    cells.undo()
    segment_again()
    assert "predicted_class" not in cells.features
    cells.features = cells.features.assign(predicted_class=predicted)
    segment.cell_diameter.value = 30  # other cells: their measurements, and the head's predictions, go
    segment_again()
    assert "predicted_class" not in cells.features and "note" not in cells.features
    assert segment.status.value.endswith("; the head's predictions were cleared: the cells changed (embed them and "
                                         "apply the head again)")
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert_embedded_with_settings(widget, image.data, cells)


def test_a_smear_selected_while_another_is_embedded_is_chosen_when_the_run_ends(viewer, widget, qtbot):
    (image,) = viewer.open_sample("napari-reddino", "chula-smear")
    other = viewer.add_image(image.data[::2, ::2], rgb=True, name="next smear")
    viewer.layers.selection.active = image
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()  # segments first, then embeds
        viewer.layers.selection.active = other
        assert widget.image.value is image
    assert result.args[0].metadata["source_image"] == image.name
    assert widget.image.value is other and widget.cells.value == SEGMENT_FIRST  # the next smear has no cells yet


def corrupt_copy(folder: Path, tmp_path: Path) -> str:
    damaged = tmp_path / "damaged_model"
    damaged.mkdir()
    (damaged / "config.json").write_bytes((folder / "config.json").read_bytes())
    (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    return str(damaged)


@pytest.mark.parametrize(
    "model, says",
    [
        ("reddino-small", "Model 'reddino-small' (Hugging Face repo Snarcy/RedDino-small) is not in the local cache"),
        ("no-such-model", "No model 'no-such-model': it is neither a known model nor a model folder on this "
         "computer. Choose reddino-small, reddino-base, reddino-large in the list"),
        (corrupt_copy, "(damaged or not a weights file)"),
        (lambda folder, _: str(folder / "model.safetensors"), "widget takes a model folder with config.json"),
    ],
    ids=["offline-not-cached", "unknown-name", "corrupt-checkpoint", "bare-weights-file"],
)
def test_a_model_that_cannot_load_gives_a_clear_error_and_changes_nothing(
    viewer, widget, hub_cache, tiny_folder, tmp_path, model, says, qtbot
):
    image = imread(CHULA_1)[:96, :96]
    labels = np.zeros(image.shape[:2], np.int32)
    labels[10:30, 10:30], labels[50:70, 40:60] = 3, 8
    viewer.add_image(image, rgb=True, name="patch")
    cells = viewer.add_labels(labels, name="patch cells")
    record = store_embeddings(cells, [3, 8], np.ones((2, 4)), model_id="earlier", fingerprint="old")
    widget.reset_choices()
    widget.model_name = model if isinstance(model, str) else model(tiny_folder[1], tmp_path)

    with qtbot.assertNotEmitted(widget.embedded):
        run(widget, qtbot)

    assert widget.status.value.startswith("Could not load the model; nothing was changed. ")
    assert says in widget.status.value
    assert says in notification_manager.records[-1].message
    assert cells.metadata[METADATA_KEY] is record
    assert len(viewer.layers) == 2
    assert widget._run_button.enabled


def test_a_model_that_cannot_load_after_segment_first_says_the_cells_were_kept(viewer, widget, hub_cache, qtbot):
    viewer.add_image(imread(CHULA_1)[:160, :160], rgb=True, name="patch")
    widget.reset_choices()
    widget.model_name = "reddino-small"  # offline, not cached
    with qtbot.assertNotEmitted(widget.embedded):
        run(widget, qtbot)
    (cells,) = [layer for layer in viewer.layers if isinstance(layer, Labels)]
    assert widget.status.value.startswith("Could not load the model; the cells were segmented and kept in "
                                          "'patch cells'. ")
    assert cells.name == "patch cells" and len(cells.features) > 0 and embeddings_of(cells) is None


def test_a_reopened_panel_shows_the_model_and_crops_its_smear_was_embedded_with(viewer, widget, tiny_folder, qtbot):
    viewer.open(CHULA_1)
    widget.reset_choices()
    widget.crop_mode.value, widget.crop_scale.value, widget.margin.value = "context", "cell", 0.4
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()  # segments first
    viewer.window.remove_dock_widget("all")
    _, reopened = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    assert reopened.model_name == str(tiny_folder[1])
    assert (reopened.crop_mode.value, reopened.crop_scale.value, reopened.margin.value) == ("context", "cell", 0.4)
    reopened.device.value = "cpu"
    run(reopened, qtbot)
    assert reopened.status.value.endswith("are already up to date; nothing to do.")


def shown_crops(widget) -> dict:
    return {"mode": widget.crop_mode.value, "scale": widget.crop_scale.value, "margin": widget.margin.value}


def two_square_cells(viewer, widget) -> Labels:
    """A corner of a smear with two square cells, offered to the panel: quick to embed."""
    image = imread(CHULA_1)[:96, :96]
    labels = np.zeros(image.shape[:2], np.int32)
    labels[10:30, 10:30], labels[50:70, 40:60] = 3, 8
    viewer.add_image(image, rgb=True, name="patch")
    cells = viewer.add_labels(labels, name="patch cells")
    widget.reset_choices()
    return cells


def test_a_model_that_records_its_training_crops_sets_the_panel_s_crops_and_its_cells_are_cut_so(
        viewer, widget, tiny_folder, tmp_path, qtbot):
    crops = {"mode": "context", "scale": "cell", "margin": 2.125}  # wider than most, and finer than the box shows
    trained = record_crops(shutil.copytree(tiny_folder[1], tmp_path / "trained"), crops)
    box = widget.model.native
    box.setEditText(str(trained))  # typed: nothing is read at each keystroke (a folder on the way may record others)
    assert shown_crops(widget) == {"mode": "masked", "scale": "smear", "margin": 0.25}
    box.lineEdit().editingFinished.emit()  # Enter, or the focus leaves the box
    assert shown_crops(widget) == {**crops, "margin": 2.13}
    assert widget.status.value == f"{str(trained)!r} was trained on context crops at cell scale, margin 2.125: its " \
                                  "cells are cut so."
    widget.model_name = str(tiny_folder[1])  # records none: the defaults again
    assert shown_crops(widget) == {"mode": "masked", "scale": "smear", "margin": 0.25}
    assert widget.status.value == f"{str(tiny_folder[1])!r} records no training crops: back to the default masked " \
                                  "crops at smear scale, margin 0.25."
    widget.model_name = str(trained)
    widget.margin.value = 0.5  # changed by hand: kept when the model changes, and what was said of the other goes
    widget.model_name = str(tiny_folder[1])
    assert shown_crops(widget) == {**crops, "margin": 0.5} and widget.status.value == ""
    widget.crop_mode.value = "masked"  # and the next model without a record leaves them too
    widget.model_name = "reddino-small"
    assert shown_crops(widget) == {**crops, "mode": "masked", "margin": 0.5}
    damaged = record_crops(shutil.copytree(tiny_folder[1], tmp_path / "damaged"), "context")
    widget.model_name = str(damaged)  # Run says what is wrong with it
    assert shown_crops(widget) == {**crops, "mode": "masked", "margin": 0.5}
    widget.model_name = str(trained)
    viewer.open(CHULA_1)
    widget.reset_choices()
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as embedded:
        widget.run()  # segments first
    cells = embedded.args[0]
    assert crop_settings(cells) == crops  # the record's margin, not the box's rounding of it
    run(widget, qtbot)
    assert widget.status.value.endswith("are already up to date; nothing to do.")
    # a panel opened again on cells embedded otherwise than the model's record shows how they were
    widget.crop_scale.value = "smear"  # the margin still the record's, as the box has not changed
    run(widget, qtbot)
    assert crop_settings(cells) == {**crops, "scale": "smear"}
    viewer.window.remove_dock_widget("all")
    _, reopened = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    assert shown_crops(reopened) == {**crops, "scale": "smear", "margin": 2.13} and reopened.status.value == ""
    # the model exported again into its folder, from a run on other cuts: Run reads its record again
    reopened.model_name, reopened.model_name, reopened.device.value = "reddino-small", str(trained), "cpu"
    record_crops(trained, {"mode": "masked", "scale": "cell", "margin": 1.0})
    with qtbot.waitSignal(reopened.embedded, timeout=RUN_TIMEOUT_MS):
        reopened.run()
    assert crop_settings(cells) == {"mode": "masked", "scale": "cell", "margin": 1.0} == shown_crops(reopened)


def test_a_hub_model_downloaded_on_first_use_cuts_cells_as_its_record_says_unless_other_crops_were_chosen(
        viewer, widget, serving_hub, tiny_folder, tmp_path, qtbot):  # noqa: F811
    crops = {"mode": "context", "scale": "cell", "margin": 0.5}
    serving_hub("lab/trained", record_crops(shutil.copytree(tiny_folder[1], tmp_path / "trained"), crops))
    cells = two_square_cells(viewer, widget)
    widget.model_name = "hf_hub:lab/trained"  # not downloaded: its record is not known yet
    assert shown_crops(widget) == {"mode": "masked", "scale": "smear", "margin": 0.25}
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert crop_settings(cells) == crops == shown_crops(widget)
    assert "with hf_hub:lab/trained on cpu; cut as it was trained: context crops at cell scale, margin 0.5" \
        in widget.status.value
    widget.model_name = "reddino-small"  # records none: the defaults again
    assert shown_crops(widget) == {"mode": "masked", "scale": "smear", "margin": 0.25}
    widget.model_name = "hf_hub:lab/trained"  # downloaded now: its record is read when it is chosen
    assert shown_crops(widget) == crops
    run(widget, qtbot)
    assert widget.status.value.endswith("are already up to date; nothing to do.")
    serving_hub("lab/other", tmp_path / "trained")
    widget.model_name = "hf_hub:lab/other"
    widget.margin.value = 0.3  # chosen over whatever the model may record
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert crop_settings(cells) == {"mode": "masked", "scale": "smear", "margin": 0.3} == shown_crops(widget)


def test_a_model_downloaded_on_first_use_shows_how_far_the_download_has_come(viewer, widget, serving_hub, tiny_folder,
                                                                            qtbot, monkeypatch):  # noqa: F811
    serving_hub("lab/tiny-rbc", tiny_folder[1])
    cells = two_square_cells(viewer, widget)
    widget.model_name = "hf_hub:lab/tiny-rbc"
    received, said, bars, show = [], [], [], widget._show_download

    def shown(download):  # what the panel was told, and showed
        received.append(download.filename)
        show(download)
        said.append(widget.status.value)
        bars.append(widget._progress and widget._progress.desc)

    monkeypatch.setattr(widget, "_show_download", shown)
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    size = (tiny_folder[1] / "model.safetensors").stat().st_size / 2**20
    assert received == ["config.json", "model.safetensors"]
    assert f"Downloading hf_hub:lab/tiny-rbc: model.safetensors, {size:,.2f} of {size:,.2f} MB…" in said
    assert {"Downloading config.json", "Downloading model.safetensors"} & set(bars)
    assert widget.status.value.startswith("2 cells embedded in ") and widget.status.value.endswith(
        " with hf_hub:lab/tiny-rbc on cpu")
    assert embeddings_of(cells)[2].startswith("hf_hub:lab/tiny-rbc@sha256:")


def test_a_slide_pyramid_is_embedded_from_its_full_resolution(viewer, widget, chula_pixels_and_cells, qtbot):
    image, labels = chula_pixels_and_cells
    embedded = []
    for name, data in (("slide", [image, image[::2, ::2]]), ("plain", image)):
        smear = viewer.add_image(data, multiscale=name == "slide", rgb=True, name=name)
        cells = viewer.add_labels(labels.copy(), name=f"{name} cells", metadata={"source_image": name})
        widget.reset_choices()
        widget.image.value, widget.cells.value = smear, cells
        run(widget, qtbot)
        assert DONE.match(widget.status.value)
        embedded.append(embeddings_of(cells))
    (pyramid_ids, from_pyramid, _), (ids, from_plain, _) = embedded
    np.testing.assert_array_equal(pyramid_ids, ids)
    np.testing.assert_array_equal(from_pyramid, from_plain)


def test_a_lazy_pyramid_segmented_first_is_read_once_off_napari_s_thread_to_segment_and_embed(viewer, widget, qtbot):
    full = LazyLevel(imread(CHULA_1))
    pyramid = viewer.add_image([full, full.array[::2, ::2]], multiscale=True, rgb=True, name="slide")
    widget.reset_choices()
    widget.image.value, widget.cells.value = pyramid, SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
        assert widget.status.value == "Reading 'slide'…"
    assert len(full.read_in) == 1 and full.read_in[0] is not threading.main_thread()  # napari went on drawing
    assert embeddings_of(viewer.layers[result.args[0].name]) is not None


def test_cells_removed_or_a_failed_read_while_a_lazy_pyramid_is_read_end_the_run(viewer, widget, qtbot):
    gate = threading.Event()
    level = LazyLevel(imread(CHULA_1), gate=gate)
    gate.set()
    pyramid = viewer.add_image([level, level.array[::2, ::2]], multiscale=True, rgb=True, name="slide")
    widget.reset_choices()
    widget.image.value, widget.cells.value = pyramid, SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    cells = viewer.layers[result.args[0].name]
    gate.clear()
    level.read_in.clear()
    widget.reset_choices()
    widget.image.value, widget.cells.value = pyramid, cells
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
        qtbot.waitUntil(lambda: len(level.read_in) == 1)
        viewer.layers.remove(cells)  # no model loaded and embedded for minutes in vain
        gate.set()
    assert widget.status.value == f"{cells.name!r} was removed while 'slide' was read; nothing was changed."
    level.error = OSError("the share went away")
    widget.reset_choices()
    widget.image.value, widget.cells.value = pyramid, SEGMENT_FIRST
    run(widget, qtbot)
    assert widget.status.value == "Embedding failed: OSError: the share went away" and widget._run_button.enabled
    assert all(setting.enabled for setting in (widget.model, widget.crop_mode, widget.every_smear))


def test_a_multiscale_cells_layer_is_refused_with_what_to_do(viewer, widget, qtbot):
    viewer.add_image(imread(CHULA_1)[:64, :64], rgb=True, name="patch")
    labels = np.zeros((64, 64), np.int32)
    labels[10:30, 10:30] = 1
    cells = viewer.add_labels([labels, labels[::2, ::2]], multiscale=True, name="pyramid cells")
    widget.reset_choices()
    widget.cells.value = cells

    run(widget, qtbot)

    assert widget.status.value.startswith("'pyramid cells' is a multiscale (pyramid) labels layer; open its")
    assert embeddings_of(cells) is None and widget._run_button.enabled


def test_a_pixel_size_that_cannot_be_is_refused_before_the_model_loads(viewer, widget, chula_pixels_and_cells, qtbot):
    """Cells from another tool are measured after embedding: at the camera's pixel pitch, say so first."""
    image, labels = chula_pixels_and_cells
    smear = viewer.add_image(image, rgb=True, name="smear", metadata={"pixel_size_um": 3.45})
    cells = viewer.add_labels(labels.copy(), name="masks from another tool")
    widget.reset_choices()
    widget.cells.value = cells
    with qtbot.waitSignal(widget.finished, timeout=5_000):
        widget.run()
    assert widget.status.value.startswith("At 3.45 µm per pixel a red cell would be 2.2 px across")
    assert widget._worker is None and embeddings_of(cells) is None and "area_um2" not in cells.features
    smear.metadata["pixel_size_um"] = 0.1
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert "area_um2" in cells.features


def test_no_cells_gives_a_notice_and_nothing_else(viewer, widget, qtbot):
    viewer.add_image(imread(CHULA_1)[:64, :64], rgb=True, name="patch")
    cells = viewer.add_labels(np.zeros((64, 64), np.int32), name="patch cells")
    widget.reset_choices()

    run(widget, qtbot)

    assert widget.status.value == "No cells in 'patch cells' to embed."
    assert notification_manager.records[-1].message == widget.status.value
    assert embeddings_of(cells) is None


def test_unavailable_devices_are_listed_disabled_with_the_reason(widget):
    combo = widget.device.native
    options = list_devices()
    assert [combo.itemText(index) for index in range(combo.count())] == ["auto", *(o.name for o in options)]
    for option in options:
        index = combo.findText(option.name)
        assert combo.model().item(index).isEnabled() == option.available
        assert combo.itemData(index, Qt.ItemDataRole.ToolTipRole) == option.detail
    assert any(option.name.startswith("cuda") for option in options)  # listed, usable or not


def test_the_fingerprint_follows_image_labels_model_and_crop_settings(tiny_folder, tmp_path):
    image = imread(CHULA_1)[:64, :80]
    labels = np.zeros(image.shape[:2], np.int32)
    labels[5:20, 5:20] = 4
    model = str(tiny_folder[1])
    digest = labels_digest(labels)
    base = fingerprint(image, digest, model, mode="context", scale="cell", margin=0.25)
    assert fingerprint(image.copy(), labels_digest(labels.copy()), model, mode="context", scale="cell", margin=0.25) == base
    brighter = image.copy()
    brighter[40, 70, 1] += 1
    relabelled = labels.copy()
    relabelled[5, 5] = 0
    other = tmp_path / "other"
    other.mkdir()
    assert len({
        base,
        fingerprint(brighter, digest, model, mode="context", scale="cell", margin=0.25),
        fingerprint(image, labels_digest(relabelled), model, mode="context", scale="cell", margin=0.25),
        fingerprint(image, digest, str(other), mode="context", scale="cell", margin=0.25),
        fingerprint(image, digest, "reddino-small", mode="context", scale="cell", margin=0.25),
        fingerprint(image, digest, model, mode="masked", scale="cell", margin=0.25),
        fingerprint(image, digest, model, mode="context", scale="cell", margin=0.5),
        fingerprint(image, digest, model, mode="context", scale="smear", margin=0.25),
    }) == 8


def test_one_pixel_changed_anywhere_in_a_large_smear_changes_its_digest():
    smear = np.zeros((3000, 4000, 3), np.uint8)  # 36 M values
    digests = {image_digest(smear)}
    for row, col in [(1, 1), (2999, 3999), (1501, 2001)]:
        edited = smear.copy()
        edited[row, col, 2] = 1
        digests.add(image_digest(edited))
    assert len(digests) == 4
    assert image_digest(smear.astype(np.uint16)) != image_digest(smear)
    assert image_digest(smear.reshape(4000, 3000, 3)) != image_digest(smear)


def test_cells_from_another_tool_are_measured_and_tied_to_their_smear_when_embedded(viewer, widget,
                                                                                   chula_pixels_and_cells, qtbot):
    image, labels = chula_pixels_and_cells
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="masks from another tool")
    ids = label_ids(cells)
    cells.features = pd.DataFrame({"label": ids[:3], "note": ["mine", "", "ok"]})  # a table of its own, partial
    widget.reset_choices()
    widget.cells.value = cells
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    features = cells.features
    expected = measure_cells(labels, image)
    pd.testing.assert_frame_equal(features[expected.columns], expected)
    np.testing.assert_array_equal(np.sort(features["label"]), embeddings_of(cells)[0])
    assert list(features["note"].iloc[:3]) == ["mine", "", "ok"] and features["note"].iloc[3:].isna().all()
    # Now the smear's cells: exported, mapped and found by "every open smear" as those of 'smear', also renamed.
    assert own_cells(viewer.layers, "smear") is cells and image_name(cells) == "smear"
    viewer.layers["smear"].name = "patient 3"
    assert image_name(cells) == "patient 3"
    # Segmenting the smear again never replaces a lab's own masks: the new cells go beside them.
    widget.cells.value = SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as result:
        widget.run()
    assert result.args[0].name == "patient 3 cells" and own_cells(viewer.layers, "patient 3").name == "patient 3 cells"
    np.testing.assert_array_equal(cells.data, labels)
    # Embedded from another smear (one camera's smears are all of a size), they belong to that one: the
    # tie is the last embedding's, and can be mended so.
    other = viewer.add_image(image[::-1].copy(), rgb=True, name="other")
    widget.image.value, widget.cells.value = other, cells
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert widget.status.value.endswith("; 'masks from another tool' belongs to 'other' now, no longer to 'patient 3'")
    assert image_name(cells) == "other" and cells.metadata[SOURCE_DIGEST] == image_digest(other.data)


def test_a_run_whose_storing_failed_midway_is_not_taken_for_up_to_date(viewer, widget, chula_pixels_and_cells, qtbot,
                                                                        monkeypatch):
    image, labels = chula_pixels_and_cells
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="masks from another tool")
    widget.reset_choices()
    widget.cells.value = cells
    merge = embed_widget.with_own_columns

    def out_of_memory(*args, **kwargs):  # as an unforeseen error would, after the embeddings are stored
        raise MemoryError("out of memory")

    monkeypatch.setattr(embed_widget, "with_own_columns", out_of_memory)
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert "Storing the embeddings failed" in widget.status.value and "area_px" not in cells.features
    monkeypatch.setattr(embed_widget, "with_own_columns", merge)
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()  # measured and stored this time, not "already up to date"
    pd.testing.assert_frame_equal(cells.features[["label", "area_px"]], measure_cells(labels, image)[["label", "area_px"]])


@pytest.mark.parametrize("key", ["index", "label as text"])
def test_a_table_keyed_by_napari_index_or_by_label_ids_as_text_keeps_its_own_columns(
        viewer, widget, chula_pixels_and_cells, qtbot, key):
    image, labels = chula_pixels_and_cells
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="masks from another tool")
    ids = label_ids(cells)
    keys = ids[[4, 1]] if key == "index" else [str(ids[4]), str(ids[1])]  # as a CSV read without dtypes gives
    cells.features = pd.DataFrame({key.split()[0]: keys, "note": ["fifth", "second"]})
    widget.reset_choices()
    widget.cells.value = cells
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    notes = cells.features.set_index("label")["note"]
    assert notes[ids[4]] == "fifth" and notes[ids[1]] == "second" and notes.drop(ids[[4, 1]]).isna().all()


def test_cells_erased_or_painted_after_segmenting_are_measured_again(viewer, widget, qtbot):
    image = imread(CHULA_1)
    viewer.add_image(image, rgb=True, name="1", metadata={"pixel_size_um": 0.2})
    widget.reset_choices()
    assert widget.cells.value == SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    cells = viewer.layers["1 cells"]
    assert cells.metadata["measured_labels"] == labels_digest(cells.data)
    erased, shrunk, split, last = (int(i) for i in label_ids(cells)[[3, 10, 20, -1]])
    labelled = {erased: "schistocyte", shrunk: "spherocyte", last: "target cell"}
    cells.features = cells.features.assign(manual_label=cells.features["label"].map(labelled).fillna(""))
    data = cells.data.copy()
    data[data == last] = 0  # the last cell erased, and a cell painted where the erased one was ...
    data[data == erased] = last  # ... under the id napari gives a new cell: the largest plus one
    rows, cols = np.nonzero(data == shrunk)
    data[rows[rows < np.median(rows)], cols[rows < np.median(rows)]] = 0  # half of it erased
    rows, cols = np.nonzero(data == split)
    middle = int(np.median(rows))
    data[middle - 1:middle + 2][data[middle - 1:middle + 2] == split] = 0  # erased across: two pieces, one id
    cells.data = data
    widget.cells.value = cells
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    table = cells.features
    assert erased not in set(table["label"])  # no row for a cell that is gone (it was counted in the summary)
    # The half-erased cell keeps its label; the new cell does not take the label of the cell whose id it took.
    assert table.set_index("label")["manual_label"].fillna("").to_dict() == {
        **{label: "" for label in table["label"]}, shrunk: "spherocyte"}
    assert widget.status.value.endswith(f"; 2 manual labels went with their cells (erased, merged, or their ids given "
                                        f"to cells painted elsewhere); 1 cell ({split}) is in pieces apart, measured "
                                        "and cut as one (erased across?): give each piece a label of its own")
    np.testing.assert_array_equal(np.sort(table["label"]), embeddings_of(cells)[0])
    area = table.set_index("label").loc[shrunk, "area_px"]
    assert area == (data == shrunk).sum()
    # in µm too, at the smear's pixel size: not the cell's size before the stroke
    row = table.set_index("label").loc[shrunk]
    assert row["area_um2"] == pytest.approx(area * 0.2**2)
    assert row["equivalent_diameter_um"] == pytest.approx(row["equivalent_diameter_px"] * 0.2)


def embedded_smear(viewer, widget, qtbot, image, labels) -> Labels:
    """The smear and its cells opened as "smear" and "smear cells", and the cells embedded."""
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="smear cells", metadata={"source_image": "smear"})
    widget.reset_choices()
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    return cells


def test_a_brush_stroke_re_embeds_only_the_cells_whose_crops_it_changed(viewer, widget, chula_pixels_and_cells, qtbot):
    image, labels = chula_pixels_and_cells
    cells = embedded_smear(viewer, widget, qtbot, image, labels)
    ids, before, _ = embeddings_of(cells)
    # a head's predictions, as the Cell map writes them
    predicted = np.where(np.arange(len(ids)) % 2, "normal", "spherocyte")
    cells.features = cells.features.assign(predicted_class=predicted, prediction_probability=0.9, p_normal=0.5,
                                           p_spherocyte=0.5, p_value=0.01)  # p_value: a column of the lab's own
    cells.metadata["predicted_classes"] = ["normal", "spherocyte"]
    painted = int(ids[len(ids) // 2])
    data = cells.data.copy()
    rows, cols = np.nonzero(data == painted)
    data[rows[rows < np.median(rows)], cols[rows < np.median(rows)]] = 0  # half of one cell erased
    cells.data = data

    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    after_ids, after, _ = embeddings_of(cells)
    np.testing.assert_array_equal(after_ids, ids)
    kept = (after == before).all(axis=1)
    embedded, unchanged, cleared = DONE.match(widget.status.value).groups()
    assert int(embedded) == (~kept).sum() == int(cleared) and int(unchanged) == kept.sum()
    # What the head said of the cells embedded again no longer holds; of the others it does.
    table = cells.features.set_index("label").loc[ids]
    np.testing.assert_array_equal(table["predicted_class"], np.where(kept, predicted, ""))
    for column in ("prediction_probability", "p_normal", "p_spherocyte"):
        np.testing.assert_array_equal(table[column].isna(), ~kept)
    assert (table["p_value"] == 0.01).all()
    assert painted in ids[~kept] and 1 <= (~kept).sum() <= 6  # the cell, and the neighbours its window shows
    embedder = load_embedder(widget.model_name, device="cpu")
    fresh_ids, fresh = embedder.embed(image, data)  # what embedding the painted smear from scratch gives
    np.testing.assert_allclose(after, fresh, rtol=1e-4, atol=1e-5)
    # An unchanged crop embeds to the same vector (0 apart here); one changed by a few pixels at its
    # window's edge moves the tiny model's vector by as little as 5e-5.
    moved = np.abs(fresh - before).max(axis=1) > 1e-6
    np.testing.assert_array_equal(moved, ~kept)  # exactly the cells whose crop changed were embedded again


def test_a_cell_reshaped_inside_its_crop_keeps_its_embedding_but_not_the_head_s_prediction(
        viewer, widget, chula_pixels_and_cells, qtbot):
    image, labels = chula_pixels_and_cells
    cells = embedded_smear(viewer, widget, qtbot, image, labels)
    ids, before, _ = embeddings_of(cells)
    cells.features = cells.features.assign(predicted_class="normal", prediction_probability=0.9, p_normal=0.9)
    cells.metadata["predicted_classes"] = ["normal"]
    # A hole punched inside one cell (its pallor taken for background, say): the same box and, as
    # the hole shows the smear's own pixels, the same crop and embedding; but its area, solidity and
    # circularity, which the head reads, changed. (Neighbours whose windows show the hole, where
    # the cell was masked before, are embedded again.)
    table = cells.features.set_index("label")
    holed = next(label for label in ids if np.all(labels[(y := round(table.loc[label, "centroid_y"])) - 3:y + 4,
                                                         (x := round(table.loc[label, "centroid_x"])) - 3:x + 4] == label))
    y, x = round(table.loc[holed, "centroid_y"]), round(table.loc[holed, "centroid_x"])
    data = cells.data.copy()
    data[y - 1:y + 2, x - 1:x + 2] = 0
    cells.data = data
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    after_ids, after_vectors, _ = embeddings_of(cells)
    np.testing.assert_array_equal(after_ids, ids)
    moved = (after_vectors != before).any(axis=1)
    assert not moved[ids == holed].any()
    embedded, unchanged, cleared = DONE.match(widget.status.value).groups()
    assert (int(embedded), int(unchanged), int(cleared)) == (moved.sum(), len(ids) - moved.sum(), moved.sum() + 1)
    after = cells.features.set_index("label").loc[ids]
    assert after.loc[holed, "area_px"] == table.loc[holed, "area_px"] - 9
    stale = moved | (ids == holed)
    np.testing.assert_array_equal(after["predicted_class"], np.where(stale, "", "normal"))
    np.testing.assert_array_equal(after["p_normal"].isna(), stale)


def test_the_cells_whose_embeddings_changed_are_those_a_new_run_gives_another_vector():
    layer = Labels(np.zeros((1, 1), np.int32), name="cells", features=pd.DataFrame({"label": [2, 5, 9]}))
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    run = EmbeddedCells(np.array([2, 5, 9, 11]), np.vstack([vectors, np.ones((1, 4), np.float32)]), None, "m")
    np.testing.assert_array_equal(changed_embeddings(layer, run), [2, 5, 9, 11])  # nothing stored yet
    store_embeddings(layer, [2, 5, 9], vectors, model_id="m", fingerprint="f")
    run.embeddings[1, 0] += 1
    np.testing.assert_array_equal(changed_embeddings(layer, run), [5, 11])  # another vector; a new cell
    store_embeddings(layer, [2, 5, 9], vectors, model_id="the same weights by another name", fingerprint="f")
    np.testing.assert_array_equal(changed_embeddings(layer, run), [5, 11])  # the vectors decide
    store_embeddings(layer, [2, 5, 9], vectors[:, :2], model_id="m", fingerprint="f")  # of another size
    np.testing.assert_array_equal(changed_embeddings(layer, run), [2, 5, 9, 11])
    store_embeddings(layer, [], np.zeros((0, 4)), model_id="m", fingerprint="f")
    np.testing.assert_array_equal(changed_embeddings(layer, run), [2, 5, 9, 11])


def test_labels_changed_during_the_run_keep_the_embeddings_of_the_cells_as_they_were(
    viewer, widget, chula_pixels_and_cells, qtbot, monkeypatch
):
    image, labels = chula_pixels_and_cells
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels.copy(), name="smear cells", metadata={"source_image": "smear"})
    widget.reset_choices()
    widget.cells.value = cells
    resegmented = pd.DataFrame({"label": [1], "note": ["the new segmentation's"]})

    on_progress = widget._on_progress

    def segment_again(item) -> None:  # what Segment cells does to the layer while the embedding runs
        if not isinstance(item, tuple):  # the model is loaded: the embedding starts
            cells.data = np.where(labels == 1, 1, 0).astype(labels.dtype)
            cells.features = resegmented
        on_progress(item)

    widget._on_progress = segment_again  # the worker's reports reach it from the start
    run(widget, qtbot)
    assert list(cells.features["note"]) == ["the new segmentation's"]  # not given the old table
    np.testing.assert_array_equal(embeddings_of(cells)[0], label_ids(Labels(labels)))
    assert repainted_since_embedded(cells)  # the Cell map refuses them until they are embedded again
    assert widget.status.value == ("The cells of 'smear cells' changed while they were embedded. The embeddings of "
                                   "the cells as they were are kept: Run again embeds only the changed ones.")
    widget._on_progress = on_progress
    cells.data = labels.copy()  # undone: the labels are those embedded, but their table was never measured
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    ids = label_ids(cells)
    assert DONE.match(widget.status.value).groups() == ("0", f"{len(ids):,}", None)  # every embedding kept
    np.testing.assert_array_equal(np.sort(cells.features["label"]), ids)  # and the cells were measured
    assert not repainted_since_embedded(cells)
    cells.data = np.where(labels == 1, 1, 0).astype(labels.dtype)
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert embeddings_of(cells)[0].tolist() == [1] and not repainted_since_embedded(cells)

    # A brush stroke in the layer itself (painted in place, not replaced) while the run goes on.
    cells.data = labels.copy()
    erased = 2
    row, col = np.argwhere(labels == erased).mean(axis=0).round().astype(int)
    cells.brush_size = 200  # the whole cell

    painted, embed_steps = threading.Event(), Embedder.embed_steps

    def after_the_stroke(embedder, *args, **kwargs):  # the worker embeds only once the stroke is made
        painted.wait(10)
        return (yield from embed_steps(embedder, *args, **kwargs))

    def erase_a_cell(item) -> None:
        if not isinstance(item, tuple):  # the model is loaded: the worker has the labels it embeds
            cells.paint((row, col), 0)
            painted.set()
        on_progress(item)

    monkeypatch.setattr(Embedder, "embed_steps", after_the_stroke)
    widget._on_progress = erase_a_cell
    run(widget, qtbot)
    widget._on_progress = on_progress
    assert erased not in label_ids(cells) and erased in embeddings_of(cells)[0]  # the cells as they were
    assert repainted_since_embedded(cells) and widget.status.value.startswith("The cells of 'smear cells' changed")


def test_every_open_smear_is_embedded_in_turn_and_summed_up(viewer, widget, qtbot):
    first = viewer.open(CHULA_1)[0]
    second = viewer.open(CHULA_26)[0]
    own = viewer.add_labels(segment_cells(first.data), name="1 cells", metadata={"source_image": first.name})
    assert widget.image.value is second  # the smear just opened
    viewer.layers.selection.active = first  # the panel follows the layer list
    assert widget.image.value is first
    widget.every_smear.value = True
    assert not widget.image.enabled and not widget.cells.enabled

    with qtbot.waitSignal(widget.every_smear_done, timeout=2 * RUN_TIMEOUT_MS):
        widget.run()

    made = viewer.layers["26 cells"]  # segmented first: it had no cells layer
    assert [layer.name for layer in viewer.layers] == ["1", "26", "26 cells", "1 cells"]  # made: above its smear
    counts = []
    for cells in (own, made):
        ids, embeddings, _ = embeddings_of(cells)
        np.testing.assert_array_equal(ids, label_ids(cells))
        counts.append(len(ids))
    assert widget.status.value == f"Every open smear: 2 of 2 smears embedded now ({sum(counts):,} cells)."
    assert widget.model.enabled and widget.margin.enabled  # frozen for the run only

    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()  # nothing changed: each is up to date
    assert widget.status.value == "Every open smear was already up to date: '1', '26'."
    erased = own.data[own.data.shape[0] // 2, own.data.shape[1] // 2] or counts[0]
    own.data[own.data == erased] = 0  # one cell erased: only the cells whose crops it reached are embedded
    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()
    summary = re.fullmatch(r"Every open smear: 1 of 2 smears embedded now \((\d+) cells?, and ([\d,]+) kept unchanged\); "
                           r"already up to date: '26'\.", widget.status.value)
    fresh, kept = int(summary[1]), int(summary[2].replace(",", ""))
    assert 0 < fresh < counts[0] - 1 and fresh + kept == counts[0] - 1

    assert widget.image.value is first and widget.cells.value is own  # its own cells layer, not the last one made
    widget.every_smear.value = False  # back to one smear
    assert widget.cells.value is own
    widget.cells.value = made  # the other smear's cells, of the same size: refused, not embedded
    fingerprints = stored_fingerprint(made)
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert widget.status.value == ("The cells layer '26 cells' was segmented from '26', not from '1'; "
                                   "choose its own cells layer, or 'segment first'.")
    assert stored_fingerprint(made) == fingerprints

    # Ticked and unticked again without a run: the cells layer chosen by hand stays chosen.
    mine = viewer.add_labels(own.data.copy(), name="1 cells (mine)", metadata={"source_image": first.name})
    widget.cells.value = mine
    widget.every_smear.value = True
    widget.every_smear.value = False
    assert widget.cells.value is mine


def test_a_smear_whose_embeddings_cannot_be_stored_is_named_and_the_next_is_embedded(
        viewer, widget, qtbot, monkeypatch):
    for path in (CHULA_1, CHULA_26):
        viewer.open(path)
    failing, store = {"1 cells"}, embed_widget.store_run

    def fails_once(layer, *args, **kwargs):  # as an unforeseen error would
        if layer.name in failing:
            failing.clear()
            raise OSError("No space left on device")
        return store(layer, *args, **kwargs)

    monkeypatch.setattr(embed_widget, "store_run", fails_once)
    widget.every_smear.value = True
    with qtbot.waitSignal(widget.every_smear_done, timeout=2 * RUN_TIMEOUT_MS):
        widget.run()
    assert widget.status.value.startswith("Every open smear: 1 of 2 smears embedded now (")
    assert widget.status.value.endswith(
        "Not embedded: '1': Storing the embeddings failed: OSError: No space left on device.")
    assert widget._run_button.enabled and widget.model.enabled  # the run ended: a new one can start
    with qtbot.waitSignal(widget.every_smear_done, timeout=2 * RUN_TIMEOUT_MS):
        widget.run()
    assert widget.status.value.startswith("Every open smear: 1 of 2 smears embedded now (")  # '1' now
    assert widget.status.value.endswith("; already up to date: '26'.")


def test_a_cancel_stops_every_open_smear_before_the_next(viewer, widget, qtbot):
    for path in (CHULA_1, CHULA_26):
        viewer.open(path)
    widget.reset_choices()
    widget.every_smear.value = True

    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()
        widget.cancel()

    assert widget.status.value == ("Every open smear: 0 of 2 smears embedded now (0 cells). Not embedded: '1': Cancelled; the "
                                   "embeddings were not changed. Stopped (cancelled) before '26'.")
    assert not [layer for layer in viewer.layers if isinstance(layer, Labels)]
    assert widget._run_button.enabled


def test_a_cancel_after_segment_first_says_the_cells_were_kept_not_embedded(viewer, widget, qtbot):
    viewer.open(CHULA_1)
    widget.reset_choices()

    def cancel_once_the_cells_are_added(event):
        if isinstance(event.value, Labels):  # as a user would, while the cells are embedded
            QTimer.singleShot(0, widget.cancel)

    viewer.layers.events.inserted.connect(cancel_once_the_cells_are_added)
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()
    (cells,) = [layer for layer in viewer.layers if isinstance(layer, Labels)]
    assert widget.status.value == f"Cancelled; the cells were segmented and kept in {cells.name!r}, not embedded."
    assert embeddings_of(cells) is None


def test_a_smear_segmented_again_beside_its_labelled_cells_embeds_the_new_ones(viewer, widget, chula_pixels_and_cells):
    image, labels = chula_pixels_and_cells
    smear = viewer.add_image(image, rgb=True, name="smear")
    labelled = viewer.add_labels(labels.copy(), name="smear cells", metadata={"source_image": "smear"})
    again = viewer.add_labels(labels.copy(), name="smear cells [1]", metadata={"source_image": "smear"})
    other = viewer.add_image(image[::2, ::2], rgb=True, name="other")
    widget.reset_choices()
    widget.image.value = other
    widget.image.value = smear  # chosen: its cells layer is chosen with it
    assert widget.cells.value is again and labelled in widget.cells.choices


def test_the_settings_hold_for_the_whole_run_and_an_error_before_it_starts_ends_it(viewer, widget, qtbot,
                                                                                  monkeypatch):
    for path in (CHULA_1, CHULA_26):
        viewer.open(path)
    widget.reset_choices()
    settings = (widget.model, widget._browse_button, widget.device, widget.crop_mode, widget.crop_scale, widget.margin,
                widget.every_smear)
    with qtbot.waitSignal(widget.finished, timeout=RUN_TIMEOUT_MS):
        widget.run()  # segments first, then embeds with the settings of when Run was pressed
        assert not any(setting.enabled for setting in settings)
    assert all(setting.enabled for setting in settings)

    def out_of_memory(image):
        raise MemoryError()

    monkeypatch.setattr(embed_widget, "image_digest", out_of_memory)  # before the worker starts
    widget.every_smear.value = True
    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()
    # '1' is segmented first and fails on to embed; '26' (embedded above) fails as its run begins
    assert widget.status.value == ("Every open smear: 0 of 2 smears embedded now (0 cells). Not embedded: '1': Adding "
                                   "the cells layer failed: MemoryError; '26': Embedding failed: MemoryError.")
    assert widget._batch is None and all(setting.enabled for setting in settings)
    assert widget._run_button.enabled

    def unreadable(pixels):  # a memory-mapped smear whose read fails
        raise OSError("the network drive is gone")

    monkeypatch.setattr(job_widget, "check_smear", unreadable)
    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()
    assert widget.status.value == ("Every open smear: 0 of 2 smears embedded now (0 cells). Not embedded: '1': Embedding "
                                   "failed: OSError: the network drive is gone. Stopped (an error) before '26'.")
    assert widget._batch is None and all(setting.enabled for setting in settings) and widget._run_button.enabled


def test_cells_of_a_closed_image_are_not_taken_for_those_of_another_image_of_its_name(viewer, widget, qtbot):
    (first,) = viewer.open(CHULA_1)
    widget.reset_choices()
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as done:
        widget.run()  # segments first
    old = done.args[0]
    old.features = old.features.assign(manual_label="normal")
    stored = old.metadata[METADATA_KEY]
    viewer.layers.remove(first)
    other = viewer.add_image(imread(CHULA_26), rgb=True, name="1")  # another smear, its name and size
    assert other.data.shape == first.data.shape
    widget.reset_choices()
    widget.image.value, widget.cells.value = other, old
    run(widget, qtbot)
    assert widget.status.value == ("'1 cells' was segmented from another image called '1' (its pixels differ from "
                                   "those of '1': closed, and another opened under its name?); choose 'segment first' "
                                   "under Cells.")
    assert old.metadata[METADATA_KEY] is stored

    widget.every_smear.value = True  # takes it for a smear without cells: segmented first, beside
    with qtbot.waitSignal(widget.every_smear_done, timeout=RUN_TIMEOUT_MS):
        widget.run()
    new = viewer.layers["1 cells [1]"]
    np.testing.assert_array_equal(new.data, segment_cells(imread(CHULA_26)))
    assert embeddings_of(new) is not None and "manual_label" not in new.features  # no labels of the other smear
    assert old.visible and old.metadata[METADATA_KEY] is stored and (old.features["manual_label"] == "normal").all()

    # The same layer with its pixels edited in place (a background correction) stays that smear:
    # segmented again, the labels of its cells come across.
    new.features = new.features.assign(manual_label="spherocyte")
    other.data = np.clip(other.data.astype(np.int16) + 3, 0, 255).astype(np.uint8)
    widget.every_smear.value = False
    widget.reset_choices()
    widget.image.value, widget.cells.value = other, SEGMENT_FIRST
    with qtbot.waitSignal(widget.embedded, timeout=RUN_TIMEOUT_MS) as done:
        widget.run()
    newest = done.args[0]
    assert newest.name == "1 cells [2]" and (newest.features["manual_label"] == "spherocyte").mean() > 0.9
    assert not new.visible  # its labels went to the newest layer


def test_own_columns_of_a_table_edited_in_a_spreadsheet_stay_with_their_cells(chula_pixels_and_cells):
    # Ids as text and centroids left empty (a CSV edited and read back): the labels stay by id.
    image, labels = chula_pixels_and_cells
    fresh = measure_cells(labels, image)
    ids = fresh["label"].to_numpy()[:3]
    old = pd.DataFrame({"label": [str(i) for i in ids], "centroid_y": np.nan, "centroid_x": [np.nan, 5.0, np.nan],
                        "manual_label": ["normal", "spherocyte", "target cell"]})
    table, lost = embed_widget.with_own_columns(fresh, old)
    given = table.set_index("label")["manual_label"]
    assert given[ids[0]] == "normal" and given[ids[2]] == "target cell" and lost == 1  # the one placed elsewhere goes
    assert given.drop(ids[[0, 2]]).isna().all()
