"""Regenerate the README screenshots: napari with a sample smear, segmented through the widget.

    xvfb-run -a .venv/bin/python scripts/screenshots.py   # writes docs/*.png
"""

from pathlib import Path

import napari
from qtpy.QtCore import QEventLoop

DOCS = Path(__file__).resolve().parents[1] / "docs"


def segmented_view(sample: str, path: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 800)
    viewer.open_sample("napari-reddino", sample)
    viewer.window.add_plugin_dock_widget("napari-reddino", "Embed cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Segment cells")
    waiting = QEventLoop()  # an idle event loop, not a busy one that starves the worker thread
    widget.finished.connect(waiting.quit)
    widget.run()
    waiting.exec()
    cells = viewer.layers[-1]
    viewer.layers.selection.active = cells
    cells.selected_label = int(cells.features["label"].iloc[len(cells.features) // 2])
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    DOCS.mkdir(exist_ok=True)
    segmented_view("chula-smear", DOCS / "segment_chula.png")
    segmented_view("aslan-smear", DOCS / "segment_aslan.png")
