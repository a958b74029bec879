"""How long ``reddino-analyse`` takes for a day's smears: end to end, through its ``main``.

Two runs on the same Chula RBC-12 smears: ``--measure-only`` (segment and measure), then with
a ViT-S of RedDino's size and a saved head (segment, measure, embed, classify, write). The
difference between them is the model's share. Weights cannot be downloaded here, so the ViT-S
is randomly initialised (the speed is RedDino-small's), saved in the Hub layout, and the head
is fitted to arbitrary labels of its embeddings: a head's prediction takes the same time
whatever it learnt. Then what keeping each smear's results as a part costs (written as the
smear finishes, so a run cut short goes on), and reading it back costs, on the first smears.

    python benchmarks/batch_analysis.py                  # 20 smears, CPU
    python benchmarks/batch_analysis.py --smears 200 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from skimage.io import imread
from timm.models import save_for_hf

from napari_reddino import CellClassifier, load_embedder, measure_cells, segment_cells
from napari_reddino.analyse_cli import main
from napari_reddino.batch_analysis import SmearAnalysis
from napari_reddino.image_input import read_smear
from napari_reddino.smear_parts import SmearParts

SMEARS = "/work/shared/data/chula_rbc12/Dataset/*.jpg"


def timed_run(argv: list[str]) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0, argv
    return time.perf_counter() - started


def saved_vit_small(folder: Path) -> Path:
    network = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, init_values=1.0).eval()
    save_for_hf(network, folder, safe_serialization=True)
    return folder


def saved_head(model: Path, device: str, smear: Path, path: Path) -> Path:
    embedder = load_embedder(str(model), device=device)
    image = imread(smear)
    labels = segment_cells(image)
    table = measure_cells(labels, image)
    _, vectors = embedder.embed(image, labels)
    classes = np.array(["normal", "spherocyte", "target cell"])[np.arange(len(table)) % 3]
    CellClassifier(model_id=embedder.model_id).fit(vectors, classes, measurements=table).save(path)
    return path


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smears", type=int, default=20, help="how many Chula smears (default 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pattern", default=SMEARS, help="glob of the smears")
    parser.add_argument("--part-smears", type=int, default=5, help="smears whose parts are timed (default 5)")
    args = parser.parse_args()
    paths = sorted(glob.glob(args.pattern))[: args.smears]
    if not paths:
        raise SystemExit(f"no smear matches {args.pattern}")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        smears = work / "smears"
        smears.mkdir()
        for path in paths:
            shutil.copy(path, smears)
        model = saved_vit_small(work / "vit_small")
        head = saved_head(model, args.device, Path(paths[0]), work / "head")
        measure = timed_run([str(smears), "--out", str(work / "measured"), "--measure-only"])
        full = timed_run([str(smears), "--out", str(work / "classified"), "--model", str(model),
                          "--head", str(head), "--device", args.device])
        cells = len(pd.read_csv(work / "classified" / "cells.csv"))
        embedder = load_embedder(str(model), device=args.device)
        analyses = {"--measure-only": SmearAnalysis(),
                    "ViT-S + head + embeddings": SmearAnalysis(embedder=embedder, model=str(model),
                                                               head=CellClassifier.load(head))}
        parts = {name: part_costs(analysis, paths[: args.part_smears], work / "parts" / str(number))
                 for number, (name, analysis) in enumerate(analyses.items())}

    n = len(paths)
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}; "
          f"{n} Chula smears (640x480), {cells:,} cells")
    print("| run | seconds | s per smear | smears per minute |")
    print("|---|---:|---:|---:|")
    for name, seconds in (("--measure-only", measure), ("ViT-S + head", full)):
        print(f"| {name} | {seconds:.1f} | {seconds / n:.2f} | {60 * n / seconds:.1f} |")
    print(f"model share of the classified run: {100 * (full - measure) / full:.0f} % "
          f"({cells / max(full - measure, 1e-9):.0f} cells/s through the model and head)")
    print()
    print(f"parts of the first {min(args.part_smears, n)} smears (mean per smear)")
    print("| run | part KiB | save ms | read back ms |")
    print("|---|---:|---:|---:|")
    for name, (size, save, load) in parts.items():
        print(f"| {name} | {size / 1024:.0f} | {1000 * save:.1f} | {1000 * load:.1f} |")


def part_costs(analysis: SmearAnalysis, paths: list[str], folder: Path) -> tuple[float, float, float]:
    """Mean bytes, seconds to save and seconds to read back of one smear's part."""
    parts = SmearParts(folder, analysis.settings())
    sizes, saves, loads = [], [], []
    for path in map(Path, paths):
        key = parts.key(path, path.stem)
        cells = analysis(read_smear(path), path.stem)
        started = time.perf_counter()
        parts.save(key, cells)
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        parts.load(key)
        loads.append(time.perf_counter() - started)
        sizes.append(parts._file(key).stat().st_size)
    return float(np.mean(sizes)), float(np.mean(saves)), float(np.mean(loads))


if __name__ == "__main__":
    main_benchmark()
