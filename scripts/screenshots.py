"""Regenerate the README screenshots: napari with sample smears, through the widgets.

    xvfb-run -a .venv/bin/python scripts/screenshots.py [--model MODEL]   # writes docs/*.png

With ``--model`` (anything load_embedder takes; a Hub name needs the Hub), the Cell map is shown
too: both samples embedded, mapped, a lasso drawn and the head trained on it.
"""

import argparse
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QEventLoop

DOCS = Path(__file__).resolve().parents[1] / "docs"


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


def cell_map_view(model: str, path: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 900)
    _, embed = viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    embed.model_name, embed.device.value = model, "cpu"
    for sample in ("aslan-smear", "chula-smear"):
        (image,) = viewer.open_sample("napari-reddino", sample)
        embed.reset_choices()
        embed.image.value = image
        embed.reset_choices()
        run_and_wait(embed, embed.embedded)
    _, cell_map = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map", tabify=True)
    run_and_wait(cell_map)
    points = cell_map.canvas.points.data
    low, high = np.percentile(points, [5, 50], axis=0)
    cell_map.canvas.select_polygon(np.array([low, [low[0], high[1]], high, [high[0], low[1]]]))
    cell_map.assign("spherocyte")
    cell_map.select(~cell_map.selected & (np.arange(len(points)) % 3 == 0))
    cell_map.assign("normal")
    cell_map.train()
    cell_map.canvas.select_polygon(np.array([low, [low[0], high[1]], high, [high[0], low[1]]]))
    for layer in viewer.layers:  # the Chula smear with its map colours
        layer.visible = "chula" in layer.name and not layer.name.endswith(" cells")
    viewer.reset_view()
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="embed with this model and also show the Cell map")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    segmented_view("chula-smear", DOCS / "segment_chula.png")
    segmented_view("aslan-smear", DOCS / "segment_aslan.png")
    if args.model:
        cell_map_view(args.model, DOCS / "cell_map.png")
