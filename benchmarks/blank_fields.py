"""Where stained red cells end and a blank field's noise begins: the floors of segmenting.

Segmenting splits a smear's smoothed density into slide and cells (Otsu) and asks that the cells
stand out from the slide by at least ``MIN_CELL_CONTRAST`` (optical density), and by
``MIN_GRAIN_LIKE_CONTRAST`` where the split keeps no more of the variance between its two levels
than camera grain does (``GRAIN_SEPARATION``), and that the split runs along edges at least
``MIN_EDGE_STEEPNESS`` steep (not along light falling off towards the corners). This prints the
three over every real smear in ``../shared/data`` (Chula RBC-12 and Aslan's BCD), over two smears
blurred and grained, and over bare-slide fields with camera grain and vignetting, with the cells
each gives. Every smear must pass, no field.

    python benchmarks/blank_fields.py [--data ../shared/data]
"""

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.io import imread

from napari_reddino import segment_cells
from napari_reddino.cell_separation import (
    GRAIN_SEPARATION,
    MIN_CELL_CONTRAST,
    MIN_EDGE_STEEPNESS,
    MIN_GRAIN_LIKE_CONTRAST,
    cell_contrast,
    edge_steepness,
    shows_cells,
    split_separation,
)
from napari_reddino.image_input import check_smear, fit_stain_model
from napari_reddino.segmentation import (
    WORKING_DIAMETER_PX,
    _calibration_window,
    _estimate_diameter,
    _working_density,
)

DATASETS = {"Chula RBC-12": "chula_rbc12/Dataset/*.jpg", "Aslan BCD": "aslan_bcd/images/*.png"}
# slide level, grain (std, 8-bit levels), vignetting (how much darker the corners are)
FIELDS = [(230, 1.0, 0.0), (230, 2.0, 0.0), (180, 5.0, 0.0), (128, 10.0, 0.0), (128, 20.0, 0.0), (60, 3.0, 0.0),
          (60, 20.0, 0.0), (200, 2.0, 0.04), (230, 1.0, 0.1), (200, 2.0, 0.15), (60, 1.0, 0.1), (128, 5.0, 0.2),
          (230, 10.0, 0.35), (128, 10.0, 0.15), (200, 20.0, 0.15), (60, 5.0, 0.2)]
DEGRADED = [("chula_rbc12/Dataset/1.jpg", 4.0, 5.0), ("chula_rbc12/Dataset/1.jpg", 6.0, 10.0),
            ("chula_rbc12/Dataset/38.jpg", 6.0, 5.0), ("chula_rbc12/Dataset/481.jpg", 6.0, 5.0)]


def working_density(image: np.ndarray) -> np.ndarray:
    """The smoothed density segmenting splits: that of its calibration window, at working scale."""
    array = check_smear(image)
    density, half = _calibration_window(array, fit_stain_model(array))
    diameter = _estimate_diameter(half)
    scale = min(1.0, WORKING_DIAMETER_PX / diameter)
    return _working_density(density, scale, diameter * scale)


def field(level: float, grain: float, vignetting: float, rng: np.random.Generator) -> np.ndarray:
    """A 640x480 field of bare slide, darker towards its corners by ``vignetting``."""
    rows, cols = np.mgrid[:480, :640]
    reach = ((rows - 240) / 240) ** 2 + ((cols - 320) / 320) ** 2  # 2 in the corners
    light = level * (1 - vignetting * reach / 2) + rng.normal(0, grain, reach.shape)
    return np.repeat(np.clip(np.round(light), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def degraded(image: np.ndarray, blur: float, grain: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` out of focus (a Gaussian of ``blur`` px) under a noisier camera."""
    soft = ndi.gaussian_filter(image.astype(float), (blur, blur, 0))
    return np.clip(np.round(soft + rng.normal(0, grain, soft.shape)), 0, 255).astype(np.uint8)


def measures(density: np.ndarray) -> str:
    return f"{cell_contrast(density):.4f} | {split_separation(density):.3f} | {edge_steepness(density):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    print(f"floors: contrast {MIN_CELL_CONTRAST}; {MIN_GRAIN_LIKE_CONTRAST} where the share between the levels "
          f"is under {GRAIN_SEPARATION}; edge steepness {MIN_EDGE_STEEPNESS}\n")
    print("| smears | n | contrast: min | 1st pct | median | share: min | 1st pct | median "
          "| least contrast where the share is under the floor | edge steepness: min | 1st pct | median "
          "| taken for a blank field |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, pattern in DATASETS.items():
        densities = [working_density(imread(path)) for path in sorted(args.data.glob(pattern))]
        contrast = np.array([cell_contrast(density) for density in densities])
        share = np.array([split_separation(density) for density in densities])
        steepness = np.array([edge_steepness(density) for density in densities])
        grain_like = contrast[share < GRAIN_SEPARATION]
        blank = [not shows_cells(density) or edge < MIN_EDGE_STEEPNESS for density, edge in zip(densities, steepness)]
        print(f"| {name} | {len(densities)} | {contrast.min():.4f} | {np.percentile(contrast, 1):.4f} | "
              f"{np.median(contrast):.4f} | {share.min():.3f} | {np.percentile(share, 1):.3f} | "
              f"{np.median(share):.3f} | "
              f"{f'{grain_like.min():.4f}' if len(grain_like) else '-'} | "
              f"{steepness.min():.3f} | {np.percentile(steepness, 1):.3f} | {np.median(steepness):.3f} | "
              f"{sum(blank)} |")
    rng = np.random.default_rng(0)
    print("\n| smear out of focus, noisier camera | contrast | share between levels | edge steepness | cells found "
          "| as it is |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, blur, grain in DEGRADED:
        image = imread(args.data / path)
        worse = degraded(image, blur, grain, rng)
        print(f"| {Path(path).name}, blur {blur:g} px, grain {grain:g} | {measures(working_density(worse))} | "
              f"{int(segment_cells(worse).max())} | {int(segment_cells(image).max())} |")
    print("\n| bare slide field (640x480) | contrast | share between levels | edge steepness | cells found |")
    print("|---|---:|---:|---:|---:|")
    for level, grain, vignetting in FIELDS:
        image = field(level, grain, vignetting, rng)
        name = f"level {level}, grain {grain:g}, corners {vignetting:.0%} darker"
        print(f"| {name} | {measures(working_density(image))} | {int(segment_cells(image).max())} |")


if __name__ == "__main__":
    main()
