"""What a cell's thumbnail and a smear's class gallery cost as the smear's resolution grows.

The gallery under the Cell map cuts up to 120 thumbnails per lasso, and a class gallery (Export
CSV, ``reddino-analyse --galleries``) up to 10 per class. Where a thumbnail pixel spans two or
more smear pixels, the smear under the window is averaged in blocks first (no aliasing); this
prints what that costs. A Chula smear is enlarged 1x, 2x, 3x and 4x (each pixel repeated), as a
higher-resolution camera or scanner would show the same cells; its cells' windows grow alike.

    python benchmarks/thumbnails.py
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
from skimage.io import imread

from napari_reddino import measure_cells, segment_cells
from napari_reddino.cell_thumbnails import THUMBNAIL_PX, cell_thumbnail
from napari_reddino.class_gallery import class_gallery
from napari_reddino.crop_windows import cell_windows

SMEAR = Path(__file__).resolve().parents[1] / "tests" / "data" / "chula_rbc12" / "26.jpg"
CLASSES = [f"class {index}" for index in range(6)]


def enlarged(array: np.ndarray, times: int) -> np.ndarray:
    return np.repeat(np.repeat(array, times, axis=0), times, axis=1)


def main() -> None:
    smear = imread(SMEAR)
    labels = segment_cells(smear)
    windows = cell_windows(labels)
    table = measure_cells(labels, smear)
    table["predicted_class"] = np.asarray(CLASSES)[np.arange(len(table)) % len(CLASSES)]
    table["prediction_probability"] = np.linspace(0.4, 0.99, len(table))
    print(f"{platform.processor() or platform.machine()}, {SMEAR.name}: {len(windows)} cells, "
          f"{THUMBNAIL_PX} px thumbnails, {len(CLASSES)} classes in the class gallery\n")
    print("| enlarged | smear px | median window | smear px per thumbnail px | thumbnail | class gallery |")
    print("|---:|---:|---:|---:|---:|---:|")
    for times in (1, 2, 3, 4):
        image, cells = enlarged(smear, times), enlarged(labels, times)
        boxes = windows.boxes * times
        started = time.perf_counter()
        for label, window in zip(windows.ids, boxes):
            cell_thumbnail(image, cells, int(label), window)
        per_thumbnail = (time.perf_counter() - started) / len(windows)
        scaled = table.copy()
        for column in ("bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"):
            scaled[column] = scaled[column] * times
        started = time.perf_counter()
        class_gallery(image, cells, scaled, CLASSES)
        gallery = time.perf_counter() - started
        side = float(np.median(boxes[:, 2] - boxes[:, 0]))
        print(f"| {times}x | {image.shape[0] * image.shape[1] / 1e6:.1f} M | {side:.0f} px | "
              f"{side / THUMBNAIL_PX:.1f} | {per_thumbnail * 1e3:.2f} ms | {gallery * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
