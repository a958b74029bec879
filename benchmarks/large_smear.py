"""Time and peak memory of segment_cells, then of measure_cells, against image size, up to an
8000x6000 smear.

Each size is a mosaic of real Chula smears (mirrored copies, so cells continue across the
joins), segmented in a fresh subprocess so its peak resident memory is its own.

    python benchmarks/large_smear.py [--sizes 640x480 2000x1500 4000x3000 8000x6000] [--zoom 4]

``--zoom`` enlarges the smear first (bilinear), as a higher magnification would show it: at 4,
Chula's 36 px cells are 144 px across, as under a 100x objective.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chula_rbc12" / "Dataset"

CHILD = """
import json, resource, sys, time
import numpy as np
from skimage.io import imread
from napari_reddino import measure_cells, segment_cells
width, height, path, zoom = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
tile = imread(path)
if zoom != 1:
    from skimage.transform import rescale
    tile = np.round(rescale(tile, zoom, order=1, channel_axis=-1, preserve_range=True)).astype(np.uint8)
row = np.concatenate([tile, tile[:, ::-1]], axis=1)
block = np.concatenate([row, row[::-1]], axis=0)
reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
image = np.ascontiguousarray(np.tile(block, reps)[:height, :width])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
labels = segment_cells(image)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
measure_cells(labels, image)
measure_seconds = time.perf_counter() - start
measured_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "cells": int(labels.max()), "peak_mib": peak / 1024,
                  "before_mib": before / 1024, "image_mib": image.nbytes / 2**20,
                  "measure_seconds": measure_seconds, "measured_peak_mib": measured_peak / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["640x480", "2000x1500", "4000x3000", "8000x6000"])
    parser.add_argument("--smear", type=Path, default=DATA / "1.jpg")
    parser.add_argument("--zoom", type=float, default=1.0, help="enlarge the smear first (a higher magnification)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_version()}, smear {args.smear.name}, zoom {args.zoom:g}")
    print("\n| size | megapixels | cells | seconds | s per megapixel | peak RSS (MiB) | of which the image "
          "| measure_cells (s) | peak RSS with it (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height), str(args.smear), str(args.zoom)],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mp = width * height / 1e6
        print(f"| {size} | {mp:.1f} | {r['cells']} | {r['seconds']:.2f} | {r['seconds'] / mp:.3f} | "
              f"{r['peak_mib']:.0f} | {r['image_mib']:.0f} | {r['measure_seconds']:.2f} | {r['measured_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
