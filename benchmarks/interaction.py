"""How fast the Cell map answers: lasso -> recoloured smear, click -> highlighted point, UMAP, head.

Smears of 1k / 10k / 50k cells are made by tiling the real Chula image 1 with its segmentation
(label ids and the per-cell table shifted per tile), with random 384-d embeddings (ViT-S
size). The timings go through the real widget in a real napari viewer:

- lasso: ``MapCanvas.select_polygon`` (points inside, new selection, every point and every
  cell of the smear recoloured) until napari has taken the new colours ("update"), and until
  the Qt event queue is empty ("+ repaint", which under Xvfb is Mesa's software OpenGL);
- click: a cell selected from the smear, its point highlighted and the map centred on it;
- map click: a point clicked on the map, its cell shown and centred in the smear;
- lasso with the gallery open: the same, and the gallery showing the new selection (at most 120
  thumbnails, each cut and outlined anew);
- UMAP: ``fit_umap`` after the warm-up; head: ``CellClassifier.fit`` on 13 classes.

Run: ``xvfb-run -a python benchmarks/interaction.py`` (``--sizes 1000 10000`` for a quick run).
"""

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

CHULA_1 = Path(__file__).parents[1] / "tests" / "data" / "chula_rbc12" / "1.jpg"
EMBEDDING_DIM = 384


def tiled_smear(cells_wanted: int):
    """(image, labels, table) of Chula image 1 tiled until it holds at least ``cells_wanted`` cells."""
    from skimage.io import imread

    from napari_reddino import measure_cells, segment_cells

    image = imread(CHULA_1)
    labels = segment_cells(image, pixel_size_um=0.2)
    table = measure_cells(labels, image, pixel_size_um=0.2)
    per_tile = int(labels.max())
    side = int(np.ceil(np.sqrt(cells_wanted / per_tile)))
    height, width = labels.shape
    tiled = np.zeros((side * height, side * width), dtype=np.int32)
    tables = []
    for tile in range(side * side):
        row, col = divmod(tile, side)
        offset = tile * per_tile
        tiled[row * height:(row + 1) * height, col * width:(col + 1) * width] = np.where(labels > 0, labels + offset, 0)
        part = table.copy()
        part["label"] += offset
        part["index"] += offset
        part["centroid_y"] += row * height
        part["centroid_x"] += col * width
        tables.append(part)
    return np.tile(image, (side, side, 1)), tiled, pd.concat(tables, ignore_index=True)


def settle(app) -> float:
    started = time.perf_counter()
    app.processEvents()
    return time.perf_counter() - started


def interaction_times(viewer, widget, cells_wanted: int, rng) -> dict:
    from qtpy.QtWidgets import QApplication

    from napari_reddino.cell_embeddings import store_embeddings

    app = QApplication.instance()
    for layer in list(viewer.layers):
        if layer in viewer.layers:  # removing the cells removes their map colours too
            viewer.layers.remove(layer)
    image, labels, table = tiled_smear(cells_wanted)
    viewer.add_image(image, rgb=True, name="smear")
    cells = viewer.add_labels(labels, name="smear cells", features=table)
    ids = table["label"].to_numpy(np.int64)
    store_embeddings(cells, ids, rng.normal(size=(len(ids), EMBEDDING_DIM)).astype(np.float32),
                     model_id="random", fingerprint="benchmark")
    from napari_reddino.cell_map import PooledCells

    xy = rng.normal(size=(len(ids), 2)).astype(np.float32)
    widget.show_map(PooledCells.from_layers([cells]), xy)
    settle(app)

    lasso = lasso_times(widget, app, rng)
    clicks = []
    for label in rng.choice(ids, 5, replace=False):
        started = time.perf_counter()
        widget.select_cell(cells, int(label), add=True)
        update = time.perf_counter() - started
        clicks.append((update, update + settle(app)))
    map_clicks = []
    for point in rng.choice(len(ids), 5, replace=False):
        started = time.perf_counter()
        widget.canvas.point_clicked.emit(int(point), False)
        update = time.perf_counter() - started
        map_clicks.append((update, update + settle(app)))
    widget.show_gallery()
    settle(app)
    with_gallery = lasso_times(widget, app, rng)
    viewer.window.remove_dock_widget(widget.gallery)
    return {
        "cells": len(ids),
        "smear_px": labels.size,
        "lasso": np.median(lasso, axis=0),
        "click": np.median(clicks, axis=0),
        "map_click": np.median(map_clicks, axis=0),
        "lasso_gallery": np.median(with_gallery, axis=0),
    }


def lasso_times(widget, app, rng) -> list[tuple[float, float]]:
    """(update, update + repaint) of 5 lassos of random size around random centres."""
    times = []
    for _ in range(5):
        angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        centre = rng.normal(size=2) * 0.5
        polygon = np.column_stack([np.sin(angles), np.cos(angles)]) * rng.uniform(0.5, 1.5) + centre
        started = time.perf_counter()
        widget.canvas.select_polygon(polygon)
        update = time.perf_counter() - started
        times.append((update, update + settle(app)))
    return times


def umap_seconds(n: int, rng) -> float:
    from napari_reddino.umap_layout import fit_umap

    centres = rng.normal(size=(12, EMBEDDING_DIM)) * 3
    embeddings = (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, EMBEDDING_DIM))).astype(np.float32)
    started = time.perf_counter()
    fit_umap(embeddings)
    return time.perf_counter() - started


def head_seconds(n: int, rng) -> float:
    from napari_reddino.cell_classifier import CellClassifier
    from napari_reddino.widgets.class_list import DEFAULT_CLASSES

    classes = list(DEFAULT_CLASSES)
    labels = np.array(classes)[rng.integers(0, len(classes), n)]
    embeddings = rng.normal(size=(n, EMBEDDING_DIM)).astype(np.float32)
    started = time.perf_counter()
    CellClassifier(classes).fit(embeddings, labels)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    args = parser.parse_args()

    import napari

    from napari_reddino.umap_layout import warm_up_umap

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    warm_up_umap().join()
    print(f"# {platform.processor() or platform.machine()}, napari {napari.__version__}; "
          f"UMAP warm-up {time.perf_counter() - started:.1f} s")
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-reddino", "Cell map")
    print("| cells | smear px | lasso update | lasso + repaint | click update | click + repaint "
          "| map click update | + repaint | lasso update, gallery open | + repaint |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        row = interaction_times(viewer, widget, size, rng)
        times = [row[kind][part] * 1e3 for kind in ("lasso", "click", "map_click", "lasso_gallery") for part in (0, 1)]
        print(f"| {row['cells']:,} | {row['smear_px'] / 1e6:.0f} M | " + " | ".join(f"{t:.0f} ms" for t in times) + " |")
    print("\n| cells | UMAP (after warm-up) | head fit (13 classes) |\n|---:|---:|---:|")
    for size in args.sizes:
        head = f"{head_seconds(size, rng):.2f} s" if size <= 10_000 else "-"
        print(f"| {size:,} | {umap_seconds(size, rng):.1f} s | {head} |")
    viewer.close()


if __name__ == "__main__":
    main()
