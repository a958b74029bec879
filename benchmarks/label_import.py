"""How many labels come back when a labelled smear is segmented again with other settings.

Each Chula smear is segmented with its estimated cell size, every cell is labelled (its own id,
as text) and exported, then the smear is segmented at ``--diameter`` px and the CSV imported
(``import_manual_labels``). The truth comes from the masks: an old cell and the new cell that
overlaps it most are "the same cell" at IoU >= 0.8. The table counts the same cells, those
given their label back, and labels given to a cell that is not the old one (mask IoU < 0.5 or
another cell), once by the centroid rule alone and once by both rules.

    python benchmarks/label_import.py                 # 20 Chula smears, 32 px
    python benchmarks/label_import.py --smears 53 --diameter 40
"""

from __future__ import annotations

import argparse
import glob
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from skimage.io import imread

from napari_reddino import label_import, measure_cells, segment_cells
from napari_reddino.cell_export import export_cells_csv

SMEARS = "/work/shared/data/chula_rbc12/Dataset/*.jpg"


def best_overlaps(before: np.ndarray, after: np.ndarray) -> dict[int, tuple[int, float]]:
    """For each old label, the new label that overlaps it most and their mask IoU."""
    both = (before > 0) & (after > 0)
    pairs, shared = np.unique(np.stack([before[both], after[both]]), axis=1, return_counts=True)
    iou = shared / (np.bincount(before.ravel())[pairs[0]] + np.bincount(after.ravel())[pairs[1]] - shared)
    best: dict[int, tuple[int, float]] = {}
    for (old, new), value in zip(pairs.T, iou):
        if value > best.get(int(old), (0, 0.0))[1]:
            best[int(old)] = (int(new), float(value))
    return best


def count(image: np.ndarray, diameter: float, folder: Path) -> dict[str, int]:
    before = segment_cells(image)
    yesterday = measure_cells(before, image)
    layer = SimpleNamespace(name="s cells", metadata={}, features=yesterday.assign(manual_label=yesterday["label"].astype(str)))
    export_cells_csv(folder / "cells.csv", layer, overwrite=True)
    after = segment_cells(image, cell_diameter=diameter)
    truth = best_overlaps(before, after)
    counts = {"cells": len(yesterday), "same cells": sum(iou >= 0.8 for _, iou in truth.values())}
    for rule, box_iou in (("centroid", np.inf), ("both", label_import.BOX_IOU)):
        saved, label_import.BOX_IOU = label_import.BOX_IOU, box_iou  # inf: no box overlaps that much
        try:
            today = SimpleNamespace(name="s cells", metadata={}, features=measure_cells(after, image))
            label_import.import_manual_labels(folder / "cells.csv", today)
        finally:
            label_import.BOX_IOU = saved
        given = today.features.set_index("label")["manual_label"]
        given = given[given != ""]
        right = [truth.get(int(old), (0, 0.0)) for old in given]
        counts[f"back ({rule})"] = sum(new == cell and iou >= 0.8 for (new, iou), cell in zip(right, given.index))
        counts[f"wrong cell ({rule})"] = sum(new != cell or iou < 0.5 for (new, iou), cell in zip(right, given.index))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smears", type=int, default=20, help="the first N Chula smears")
    parser.add_argument("--diameter", type=float, default=32, help="cell diameter of the second segmentation (px)")
    parser.add_argument("--pattern", default=SMEARS, help="glob of smear images")
    args = parser.parse_args()
    paths = sorted(glob.glob(args.pattern))[: args.smears]
    if not paths:
        raise SystemExit(f"no smear matches {args.pattern}")
    totals: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        for path in paths:
            for key, value in count(imread(path), args.diameter, Path(folder)).items():
                totals[key] = totals.get(key, 0) + int(value)
    print(f"{len(paths)} smears, segmented again at {args.diameter:g} px\n")
    print("| " + " | ".join(totals) + " |")
    print("|" + " ---: |" * len(totals))
    print("| " + " | ".join(f"{value:,}" for value in totals.values()) + " |")


if __name__ == "__main__":
    main()
