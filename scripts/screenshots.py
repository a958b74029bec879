"""Regenerate the README screenshots: napari with sample smears, through the widgets.

    xvfb-run -a .venv/bin/python scripts/screenshots.py [--model MODEL]   # writes docs/*.png

With ``--model`` (anything load_embedder takes; a Hub name needs the Hub), the Cell map is shown
too: two Chula smears embedded and mapped, half of their annotated cells labelled with the
annotators' classes, the head trained, and its target cells selected with Select class;
``reddino-analyse --galleries`` on smear 26 with that head; and the gallery of the cells
labelled as target cells.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QEventLoop, QPoint, Qt
from qtpy.QtWidgets import QApplication, QScrollArea, QSplitter
from skimage.io import imread

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHULA = ROOT / "tests" / "data" / "chula_rbc12"
CHULA_PIXEL_SIZE_UM = 0.2


def run_and_wait(widget, signal=None) -> None:
    waiting = QEventLoop()  # an idle event loop, not a busy one that starves the worker thread
    (signal or widget.finished).connect(waiting.quit)
    widget.run()
    waiting.exec()


def segmented_view(sample: str, path: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 800)
    viewer.open_sample("napari-reddino", sample)
    viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Segment cells")
    run_and_wait(widget)
    cells = viewer.layers[-1]
    viewer.layers.selection.active = cells
    cells.selected_label = int(cells.features["label"].iloc[len(cells.features) // 2])
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()


def open_chula_smear(viewer, number: int):
    """A Chula RBC-12 smear from tests/data with its pixel size, as a lab would open it."""
    image = imread(CHULA / f"{number}.jpg")
    metadata = {"pixel_size_um": CHULA_PIXEL_SIZE_UM, "source": "Chula RBC-12 dataset (MIT licence)"}
    return viewer.add_image(image, name=f"smear {number} (chula)", rgb=True, metadata=metadata,
                            scale=(CHULA_PIXEL_SIZE_UM, CHULA_PIXEL_SIZE_UM))


def label_like_the_annotators(cell_map, share: int = 2) -> None:
    """Give every ``share``-th annotated cell its Chula class by hand, as a lab member would,
    leaving the rest for the head."""
    # Imported here, after the plugin's widgets: torch imported before them would load triton
    # next to Mesa's LLVM, which crashes (see napari_reddino.triton_guard).
    from reddino_train.eval_data import CHULA_CLASSES, read_point_labels

    pool = cell_map.pool
    for position, cells in enumerate(pool.layers):
        number = cells.metadata["source_image"].split()[1]
        points, classes = read_point_labels(CHULA / f"{number}.txt")
        rows, cols = np.round(points[::share]).astype(int).T
        label_ids = np.asarray(cells.data)[rows, cols]
        for name in np.unique(np.array(CHULA_CLASSES)[classes[::share]]):
            if name not in cell_map.class_list.classes:
                continue
            wanted = label_ids[(np.array(CHULA_CLASSES)[classes[::share]] == name) & (label_ids > 0)]
            mask = np.zeros(len(pool), dtype=bool)
            mask[pool.points_of(position, wanted)] = True
            cell_map.select(mask)
            cell_map.assign(name)


def labelled_map(model: str, window: tuple[int, int]):
    """napari with Chula smears 1 and 26 embedded ("Every open smear"), mapped, and half of their
    annotated cells labelled; returns the viewer and the Cell map widget."""
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*window)
    for number in (1, 26):
        open_chula_smear(viewer, number)
    _, embed = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    embed.model_name, embed.device.value = model, "cpu"
    embed.every_smear.value = True
    run_and_wait(embed, embed.every_smear_done)
    _, cell_map = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map", tabify=True)
    run_and_wait(cell_map)
    label_like_the_annotators(cell_map)
    return viewer, cell_map


def cell_map_view(model: str, path: Path, panel_path: Path, head_path: Path) -> None:
    """Two Chula smears embedded, mapped, half their annotated cells labelled, the head trained
    (and saved at ``head_path``), and its target cells selected (their label, else their
    prediction), as Select class does."""
    viewer, cell_map = labelled_map(model, (1800, 1100))
    cell_map.train()
    cell_map.select_class("target cell")
    if not cell_map.selected.any():
        raise SystemExit("No cell is a target cell, by hand or by the head: use a model that separates them "
                         "(RedDino, or a longer reddino-train run).")
    cell_map.class_list.table.clearSelection()  # a chosen row's highlight would hide its colour
    for layer in viewer.layers:  # smear 26 with its map colours
        layer.visible = "26" in layer.name and not layer.name.endswith(" cells")
    viewer.layers.selection.active = next(layer for layer in viewer.layers if layer.visible and "map" in layer.name)
    cell_map.findChild(QSplitter).setSizes([450, 550])  # dragged down, as a user would, to show the tables
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False)
    cell_map.findChild(QSplitter).setSizes([150, 850])  # the per-smear table from its header, then the buttons
    QApplication.processEvents()
    scroll = cell_map.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(cell_map.smear_table.mapTo(scroll.widget(), QPoint(0, 0)).y())
    QApplication.processEvents()
    scroll.grab().save(str(panel_path))
    cell_map.save_head(head_path)
    viewer.close()


def gallery_view(model: str, path: Path) -> None:
    """The gallery docked under the smear, showing the cells of smears 1 and 26 that were given
    "target cell" by hand (cells a model need not place well to be shown)."""
    viewer, cell_map = labelled_map(model, (1400, 900))
    cell_map.select(cell_map.pool.column("manual_label", "") == "target cell")
    cell_map.show_gallery()
    dock = cell_map.gallery.parent()
    dock.parent().resizeDocks([dock], [330], Qt.Orientation.Vertical)  # two rows, as a user would drag it
    QApplication.processEvents()
    dock.grab().save(str(path))
    viewer.close()


def class_gallery_view(model: str, head_path: Path, path: Path) -> None:
    """reddino-analyse --galleries on Chula smear 26 with the head of the Cell map picture."""
    from napari_reddino.analyse_cli import main as analyse

    with tempfile.TemporaryDirectory() as out:
        argv = [str(CHULA / "26.jpg"), "--out", out, "--model", model, "--head", str(head_path), "--device", "cpu",
                "--pixel-size-um", str(CHULA_PIXEL_SIZE_UM), "--galleries"]
        if analyse(argv) != 0:
            raise SystemExit("reddino-analyse failed; see above")
        shutil.copyfile(Path(out) / "galleries" / "26.png", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="embed with this model and also show the Cell map")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    segmented_view("chula-smear", DOCS / "segment_chula.png")
    segmented_view("aslan-smear", DOCS / "segment_aslan.png")
    if args.model:
        with tempfile.TemporaryDirectory() as heads:
            head = Path(heads) / "chula"
            cell_map_view(args.model, DOCS / "cell_map.png", DOCS / "cell_map_tables.png", head)
            class_gallery_view(args.model, head, DOCS / "class_gallery.png")
        gallery_view(args.model, DOCS / "cell_gallery.png")
