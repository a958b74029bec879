"""Embedding a smear again after one brush stroke: from scratch, and lending the earlier run.

A lab fixes the segmentation by hand (erases a platelet, trims a cell) and runs Embed cells
again. Without reuse every cell goes through the model again; with it (``embed_steps(reuse=)``,
what the widget does) only the cells whose crop the stroke changed do. Each stroke erases the
upper half of one cell, on a copy of the labels; the strokes are spread over the smear.

The smear is a mosaic of segmented Chula smears (``benchmarks/embedding.py``'s), the model a
randomly initialised ViT of RedDino's size, loaded through ``load_embedder``.

    python benchmarks/brush_stroke.py                       # CPU, ViT-S, 500 cells, 5 strokes
    python benchmarks/brush_stroke.py --device cuda --cells 4000 --sizes small large
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from embedding import ARCHITECTURES, SMEARS, mosaic_smear
from timm.models import save_for_hf

from napari_reddino.embedding import load_embedder
from napari_reddino.steps import run_steps


def stroke(labels: np.ndarray, cell: int) -> np.ndarray:
    """``labels`` with the upper half of ``cell`` erased."""
    painted = labels.copy()
    rows, cols = np.nonzero(painted == cell)
    upper = rows < np.median(rows)
    painted[rows[upper], cols[upper]] = 0
    return painted


def timed_run(embedder, image, labels, reuse=None):
    started = time.perf_counter()
    run = run_steps(embedder.embed_steps(image, labels, reuse=reuse))
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()
    return run, time.perf_counter() - started


def benchmark_size(size: str, image, labels, args, folder: Path) -> dict:
    torch.manual_seed(0)
    network = timm.create_model(ARCHITECTURES[size], img_size=224, num_classes=0, init_values=1.0).eval()
    save_for_hf(network, folder / size, safe_serialization=True)
    embedder = load_embedder(folder / size, device=args.device, dtype=args.dtype)
    timed_run(embedder, image, np.where(labels == labels.max(), labels, 0))  # warm up kernels and allocators
    first, full = timed_run(embedder, image, labels)
    cells = first.ids[np.linspace(0, len(first.ids) - 1, args.strokes + 2, dtype=int)[1:-1]]
    again, fresh = [], []
    for cell in cells:
        run, seconds = timed_run(embedder, image, stroke(labels, cell), reuse=first)
        again.append(seconds)
        fresh.append(len(run.ids) - run.reused)
    return {"model": f"ViT-{size[0].upper()}/14", "dtype": str(embedder.dtype).removeprefix("torch."),
            "cells": len(first.ids), "full": full, "again": float(np.median(again)),
            "fresh": f"{int(np.median(fresh))} (at most {max(fresh)})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    parser.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16")
    parser.add_argument("--sizes", nargs="+", default=["small"], choices=list(ARCHITECTURES))
    parser.add_argument("--cells", type=int, default=500, help="cells in the mosaic smear")
    parser.add_argument("--strokes", type=int, default=5, help="strokes, each on a fresh copy of the labels")
    parser.add_argument("--smears", default=SMEARS, help="glob of smear images")
    args = parser.parse_args()
    image, labels = mosaic_smear(args.smears, args.cells)
    with tempfile.TemporaryDirectory() as folder:
        rows = [benchmark_size(size, image, labels, args, Path(folder)) for size in args.sizes]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | dtype | cells | embed from scratch | again after one stroke (median) | speed-up "
          "| cells through the model again (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['dtype']} | {row['cells']:,} | {row['full']:.2f} s | {row['again']:.2f} s "
              f"| {row['full'] / row['again']:.0f}x | {row['fresh']} |")


if __name__ == "__main__":
    main()
