"""How well the cell size is estimated at low magnification: every Chula smear (or every Nth),
mirrored into a 3x3 mosaic (a lower-power objective sees more cells, not only smaller ones) and
shrunk as that objective would image it (``skimage.transform.rescale``, anti-aliased), its
estimate compared with the smear's own estimate at full size times the scale.

    python benchmarks/cell_size.py [--data ../shared/data] [--every N]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
from skimage.io import imread
from skimage.transform import rescale

from napari_reddino import estimate_cell_diameter

SCALES = (0.5, 0.3, 0.2)
WITHIN = 0.25  # an estimate within 25 % of the expected diameter counts as right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--every", type=int, default=1, help="every Nth smear only")
    args = parser.parse_args()
    smears = sorted((args.data / "chula_rbc12" / "Dataset").glob("*.jpg"), key=lambda p: int(p.stem))[::args.every]
    ratios: dict[float, list[float]] = {scale: [] for scale in SCALES}
    native = []
    for path in smears:
        image = imread(path)
        diameter = estimate_cell_diameter(image)
        native.append(diameter)
        row = np.concatenate([image, image[:, ::-1], image], axis=1)
        mosaic = np.concatenate([row, row[::-1], row], axis=0)  # mirrored: no seam between the copies
        for scale in SCALES:
            small = (rescale(mosaic, scale, channel_axis=-1, anti_aliasing=True) * 255).astype(np.uint8)
            ratios[scale].append(estimate_cell_diameter(small) / (diameter * scale))
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; "
          f"{len(smears)} Chula smears, {np.median(native):.0f} px cells at full size")
    print("| scale | cells | within 25 % | median ratio | worst ratio |\n|---|---:|---:|---:|---:|")
    for scale, found in ratios.items():
        found = np.asarray(found)
        within = np.mean(np.abs(found - 1) <= WITHIN)
        print(f"| {scale} | {np.median(native) * scale:.0f} px | {within:.0%} | {np.median(found):.2f} | "
              f"{found[np.argmax(np.abs(np.log(found)))]:.2f} |")


if __name__ == "__main__":
    main()
