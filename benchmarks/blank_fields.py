"""Where stained red cells end and a blank field's noise begins: the contrast floor of segmenting.

Segmenting splits a smear's smoothed density into slide and cells (Otsu) and asks that the cells
stand out from the slide by at least ``MIN_CELL_CONTRAST`` (optical density). This prints that
contrast over every real smear in ``../shared/data`` (Chula RBC-12 and Aslan's BCD), and over
bare-slide fields with camera grain, with the cells each gives. The floor must lie well below the
first and well above the second.

    python benchmarks/blank_fields.py [--data ../shared/data]
"""

import argparse
from pathlib import Path

import numpy as np
from skimage.io import imread

from napari_reddino import segment_cells
from napari_reddino.cell_separation import MIN_CELL_CONTRAST, cell_contrast
from napari_reddino.image_input import check_smear, fit_stain_model
from napari_reddino.segmentation import (
    WORKING_DIAMETER_PX,
    _calibration_window,
    _estimate_diameter,
    _working_density,
)

DATASETS = {"Chula RBC-12": "chula_rbc12/Dataset/*.jpg", "Aslan BCD": "aslan_bcd/images/*.png"}
FIELDS = [(230, 1.0), (230, 2.0), (180, 5.0), (128, 10.0), (60, 3.0)]  # slide level, grain (std, 8-bit levels)


def contrast(image: np.ndarray) -> float:
    """The contrast segmenting compares with the floor: that of its working-scale density."""
    array = check_smear(image)
    density, half = _calibration_window(array, fit_stain_model(array))
    diameter = _estimate_diameter(half)
    scale = min(1.0, WORKING_DIAMETER_PX / diameter)
    return cell_contrast(_working_density(density, scale, diameter * scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    print(f"floor (MIN_CELL_CONTRAST): {MIN_CELL_CONTRAST}\n")
    print("| smears | n | min | 1st pct | 5th pct | median | below the floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, pattern in DATASETS.items():
        values = np.array([contrast(imread(path)) for path in sorted(args.data.glob(pattern))])
        low, p1, p5, median = values.min(), *np.percentile(values, [1, 5, 50])
        print(f"| {name} | {len(values)} | {low:.4f} | {p1:.4f} | {p5:.4f} | {median:.4f} | "
              f"{int((values < MIN_CELL_CONTRAST).sum())} |")
    print("\n| bare slide field (640x480) | contrast | cells found |")
    print("|---|---:|---:|")
    rng = np.random.default_rng(0)
    for level, grain in FIELDS:
        field = np.clip(np.round(level + rng.normal(0, grain, (480, 640))), 0, 255).astype(np.uint8)
        field = np.repeat(field[..., None], 3, axis=-1)
        print(f"| level {level}, grain {grain:g} | {contrast(field):.4f} | {int(segment_cells(field).max())} |")


if __name__ == "__main__":
    main()
