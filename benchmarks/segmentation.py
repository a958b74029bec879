"""Segmentation accuracy and speed on the real smears in ../shared/data.

Chula RBC-12: recall of annotated cell centres (a centre counts when it falls inside a
segmented cell no other centre has claimed), overall and per class, and per class the share
found in a segment at least 0.7 x a normal cell's median diameter (a target cell cut into its
spot and its rim is found, but not whole); precision on images with >= 60 annotations (close
to exhaustive). Aslan BCD: RBC box precision / recall / F1 at
IoU 0.5 and 0.3 (one-to-one matching), count error per image. "Aslan x2" upsamples every
Aslan smear twice (cells ~110 px across) to check that the default settings follow the
magnification. Seconds per image are wall-clock for ``segment_cells`` alone.

    python benchmarks/segmentation.py [--data ../shared/data] [--limit N] [--skip-chula | --skip-aslan]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from skimage.io import imread
from skimage.measure import regionprops
from skimage.transform import rescale

from napari_reddino import cells_at_points, segment_cells
from reddino_train.eval_data import CHULA_CLASSES, read_point_labels

WHOLE_RATIO = 0.7  # a found cell this share of a normal cell's median diameter, or more, is taken as whole


def timed_segment(image) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    labels = segment_cells(image)
    return labels, time.perf_counter() - start


def chula(root: Path, limit: int | None) -> dict:
    images = sorted((root / "Dataset").glob("*.jpg"), key=lambda p: int(p.stem))[:limit]
    found, total = defaultdict(int), defaultdict(int)
    diameters = defaultdict(list)  # per class: equivalent diameter of the cell found at each point
    seconds, count_errors = [], []
    hits, segments, interior_hits, interior_segments = 0, 0, 0, 0
    for path in images:
        points, classes = read_point_labels(root / "Label" / f"{path.stem}.txt")
        labels, dt = timed_segment(imread(path))
        seconds.append(dt)
        if len(points) == 0:
            continue
        cell_of_point = cells_at_points(labels, points)
        diameter = np.sqrt(np.bincount(labels.ravel()) * 4 / np.pi)
        for cls, cell in zip(classes, cell_of_point):
            total[cls] += 1
            found[cls] += int(cell > 0)
            diameters[cls].append(diameter[cell] if cell > 0 else 0.0)
        if len(points) >= 60:
            n_segments = int(labels.max())
            hits += int((cell_of_point > 0).sum())
            segments += n_segments
            # Annotators skipped many cells cut by the image border: count precision without them too.
            interior = np.setdiff1d(np.arange(1, n_segments + 1), np.unique(np.concatenate(
                [labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
            interior_segments += interior.size
            interior_hits += int(np.isin(cell_of_point, interior).sum())
            count_errors.append(abs(n_segments - len(points)) / len(points))
    normal = np.array(diameters[0])
    typical = np.median(normal[normal > 0]) if (normal > 0).any() else np.nan  # Chula smears share one magnification
    per_class = {
        CHULA_CLASSES[c]: (found[c] / total[c], np.mean(np.array(diameters[c]) >= WHOLE_RATIO * typical), total[c])
        for c in sorted(total)
    }
    return {
        "images": len(images),
        "recall": sum(found.values()) / sum(total.values()),
        "per_class": per_class,
        "precision_dense": hits / max(segments, 1),
        "precision_dense_interior": interior_hits / max(interior_segments, 1),
        "count_error_dense": float(np.mean(count_errors)) if count_errors else float("nan"),
        "seconds": float(np.mean(seconds)),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes given as (ymin, xmin, ymax, xmax)."""
    top = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom - top, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matched_pairs(pred: np.ndarray, truth: np.ndarray, threshold: float) -> int:
    if len(pred) == 0 or len(truth) == 0:
        return 0
    iou = box_iou(pred, truth)
    rows, cols = linear_sum_assignment(-iou)
    return int((iou[rows, cols] >= threshold).sum())


def aslan(root: Path, limit: int | None, zoom: float = 1.0) -> dict:
    table = pd.read_csv(root / "annotations.csv")
    table = table.drop_duplicates(subset=["image", "xmin", "ymin", "xmax", "ymax"], keep="first")
    names = sorted(table["image"].unique())[:limit]
    tp = {0.5: 0, 0.3: 0}
    n_pred = n_true = 0
    seconds, count_errors = [], []
    for name in names:
        image = imread(root / "images" / name)[..., :3]
        if zoom != 1.0:
            image = (rescale(image, zoom, order=1, channel_axis=-1) * 255).astype(np.uint8)
        rows = table[(table["image"] == name) & (table["label"] == "rbc")]
        h, w = image.shape[:2]
        truth = np.stack([rows.ymin * h, rows.xmin * w, rows.ymax * h, rows.xmax * w], axis=1)
        labels, dt = timed_segment(image)
        seconds.append(dt)
        pred = np.array([r.bbox for r in regionprops(labels)], float).reshape(-1, 4)
        for threshold in tp:
            tp[threshold] += matched_pairs(pred, truth, threshold)
        n_pred += len(pred)
        n_true += len(truth)
        count_errors.append(abs(len(pred) - len(truth)) / len(truth))
    result = {"images": len(names), "seconds": float(np.mean(seconds)), "count_error": float(np.mean(count_errors))}
    for threshold, hits in tp.items():
        precision, recall = hits / max(n_pred, 1), hits / max(n_true, 1)
        result[f"P@{threshold}"] = precision
        result[f"R@{threshold}"] = recall
        result[f"F1@{threshold}"] = 2 * precision * recall / max(precision + recall, 1e-12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set")
    parser.add_argument("--skip-chula", action="store_true")
    parser.add_argument("--skip-aslan", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    if not args.skip_chula:
        c = chula(args.data / "chula_rbc12", args.limit)
        print(f"\nChula RBC-12 ({c['images']} images)")
        print("| metric | value |\n|---|---|")
        print(f"| recall of annotated centres | {c['recall']:.4f} |")
        print(f"| precision (images with >= 60 annotations) | {c['precision_dense']:.4f} |")
        print(f"| precision, cells cut by the border left out (same images) | {c['precision_dense_interior']:.4f} |")
        print(f"| relative count error (same images) | {c['count_error_dense']:.3f} |")
        print(f"| seconds per 640x480 image | {c['seconds']:.4f} |")
        print(f"\n| class | recall | found at >= {WHOLE_RATIO} x a normal cell's diameter | cells |\n|---|---|---|---|")
        for name, (recall, whole, n) in c["per_class"].items():
            print(f"| {name} | {recall:.4f} | {whole:.4f} | {n} |")
    if args.skip_aslan:
        return
    print("\n| Aslan BCD | images | P@0.5 | R@0.5 | F1@0.5 | P@0.3 | R@0.3 | F1@0.3 | count error | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for zoom in (1.0, 2.0):
        a = aslan(args.data / "aslan_bcd", args.limit, zoom)
        print(
            f"| x{zoom:g} | {a['images']} | {a['P@0.5']:.3f} | {a['R@0.5']:.3f} | {a['F1@0.5']:.3f} | "
            f"{a['P@0.3']:.3f} | {a['R@0.3']:.3f} | {a['F1@0.3']:.3f} | {a['count_error']:.3f} | {a['seconds']:.4f} |"
        )


if __name__ == "__main__":
    main()
