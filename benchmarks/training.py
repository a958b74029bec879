"""Pretraining throughput: steps/s and images/s of ``reddino-train fit``.

CPU (default): the ``tiny`` recipe on 64 px crops of the test smears, run through the real
command line in fresh processes: one process with 2 threads, one with 1 thread, and two
gloo DDP ranks of 1 thread under torchrun. Rates come from ``log.csv`` (one row per step,
images/s of all ranks), median over the steps after ``--warmup``.

GPU (``--device cuda --model vits14|vitb14|vitl14``): one training step of the model's
RedDino recipe (random init; 224 px global crops, no local crop; bf16 autocast) driven on
synthetic batches already on the GPU, so the number is the model's, not the data loader's.
FLOPs of one whole step (student forward + backward, teacher forward, heads, losses) are
counted with ``torch.utils.flop_counter.FlopCounterMode``; model FLOP utilisation = FLOPs
per step / seconds per step / the GPU's peak dense bf16 rate (989 TFLOP/s for H100 and H200
SXM; ``--peak-tflops`` for others).

    python benchmarks/training.py                          # CPU table
    python benchmarks/training.py --steps 40 --warmup 5
    python benchmarks/training.py --device cuda --model vits14 --batch-size 280
    python benchmarks/training.py --device cpu --model tiny --steps 3   # the GPU path, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

TEST_SMEARS = Path(__file__).parents[1] / "tests" / "data"
GPU_MODELS = ("vits14", "vitb14", "vitl14")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


# --- CPU: the command line, in fresh processes ----------------------------------------------


def test_smear_crops(folder: Path, size: int = 64) -> Path:
    """16 crops of the test smears (as the training tests use), in two sub-folders."""
    sources = sorted(TEST_SMEARS.glob("chula_rbc12/*.jpg")) + sorted(TEST_SMEARS.glob("aslan_bcd/*.png"))
    for index, source in enumerate(sources):
        target = folder / f"smear{index % 2}"
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            rgb = image.convert("RGB")
        for tile in range(4):
            left, top = tile * size, tile * size // 2
            rgb.crop((left, top, left + size, top + size)).save(target / f"{source.stem}_{tile}.png")
    return folder


def fit_command(data: Path, out: Path, steps: int, processes: int, recipe: str, overrides: list[str]) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [
        *launcher, "-m", "reddino_train", "fit", recipe, str(data), "--out", str(out), "--max-steps", str(steps),
        "train.log_every=1", "train.checkpoint_every=1000000", "optim.epochs=1000", *overrides,
    ]


def run_cpu(args: argparse.Namespace) -> list[dict]:
    from reddino_train.config import load_config
    from reddino_train.monitor import read_log

    batch = load_config(args.recipe, args.overrides).train.batch_size_per_gpu
    settings = [("1 process", 1, 2), ("1 process", 1, 1), ("DDP (gloo)", 2, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else test_smear_crops(Path(tmp) / "data")
        for name, processes, threads in settings:
            out = Path(tmp) / f"run{len(rows)}"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = fit_command(data, out, args.steps, processes, args.recipe, args.overrides)
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env, capture_output=True, timeout=args.timeout)
            wall = time.perf_counter() - started
            rates = [row["images_per_s"] for row in read_log(out / "log.csv")][args.warmup :]
            images_per_s = statistics.median(rates)
            rows.append({
                "setup": name, "processes": processes, "threads_per_process": threads,
                "global_batch": batch * processes, "steps": args.steps,
                "steps_per_s": images_per_s / (batch * processes), "images_per_s": images_per_s,
                "wall_s_incl_start": wall,
            })
            print(f"  {name}, {processes} x {threads} threads: {images_per_s:.1f} images/s", file=sys.stderr)
    return rows


def cpu_table(rows: list[dict]) -> str:
    lines = [
        "| setup | processes x threads | global batch | steps/s | images/s | wall s (incl. start) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setup']} | {row['processes']} x {row['threads_per_process']} | {row['global_batch']} | "
            f"{row['steps_per_s']:.2f} | {row['images_per_s']:.1f} | {row['wall_s_incl_start']:.0f} |"
        )
    return "\n".join(lines)


# --- GPU: the training step on synthetic batches --------------------------------------------


def synthetic_batch(cfg, device, generator) -> dict:
    import torch

    crops, batch = cfg.crops, cfg.train.batch_size_per_gpu

    def images(n: int, size: int):
        return torch.randn(n, 3, size, size, device=device, generator=generator)

    return {
        "global_crops": images(2 * batch, crops.global_size),
        "local_crops": images(crops.local_number * batch, crops.local_size),
    }


def peak_flops(device, override_tflops: float | None) -> float | None:
    import torch

    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def run_step_benchmark(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reddino_train.config import load_config
    from reddino_train.train import Trainer

    recipe = f"reddino-{args.model}" if args.model in GPU_MODELS else args.model
    overrides = ['model.pretrained=""', "train.num_workers=0", *args.overrides]
    if args.batch_size:
        overrides.append(f"train.batch_size_per_gpu={args.batch_size}")
    cfg = load_config(recipe, overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "blank.png")  # the loader is not used
        trainer = Trainer(cfg, data, Path(tmp) / "run", device)
        generator = torch.Generator(device=device).manual_seed(0)
        batch = synthetic_batch(cfg, device, generator)
        stop = threading.Event()

        def step(iteration: int) -> None:
            trainer.step(batch, trainer.schedules.at(iteration), stop)

        for iteration in range(args.warmup):
            step(iteration)
        with FlopCounterMode(display=False) as counter:
            step(args.warmup)
        flops = counter.get_total_flops()
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        started = time.perf_counter()
        for iteration in range(args.steps):
            step(args.warmup + 1 + iteration)
        synchronize()
        seconds = (time.perf_counter() - started) / args.steps
    peak = peak_flops(device, args.peak_tflops)
    per_gpu = cfg.train.batch_size_per_gpu
    return {
        "model": args.model, "recipe": recipe, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "precision": trainer.precision, "batch_per_gpu": per_gpu,  # what "auto" became
        "activation_checkpointing": "on" if cfg.train.activation_checkpointing else "off",
        "global_size": cfg.crops.global_size, "local_crops": f"{cfg.crops.local_number} x {cfg.crops.local_size}",
        "prototypes": cfg.heads.dino.n_prototypes, "steps": args.steps,
        "seconds_per_step": seconds, "steps_per_s": 1 / seconds, "images_per_s_per_gpu": per_gpu / seconds,
        "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def step_table(row: dict) -> str:
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    memory = "-" if row["max_memory_gib"] is None else f"{row['max_memory_gib']:.1f}"
    return "\n".join([
        "| model | device | precision | activation checkpointing | batch/GPU | steps/s | images/s/GPU | GFLOP/step "
        "| TFLOP/s | MFU | peak GiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        (f"| {row['model']} | {row['device_name']} | {row['precision']} | {row['activation_checkpointing']} | "
         f"{row['batch_per_gpu']} | {row['steps_per_s']:.3f} | {row['images_per_s_per_gpu']:.1f} | "
         f"{1000 * row['tflop_per_step']:.1f} | {row['achieved_tflops']:.3g} | {mfu} | {memory} |"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu table when omitted; cuda (or cpu) for the step benchmark")
    parser.add_argument("--model", default="vits14",
                        help=f"{', '.join(GPU_MODELS)} (RedDino's recipes), or any recipe name or file")
    parser.add_argument("--batch-size", type=int, help="per GPU (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 CPU table, 20 step)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--recipe", default="tiny", help="recipe of the CPU table")
    parser.add_argument("--data", help="image folder for the CPU table (default: crops of the test smears)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the device, for the MFU")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per CPU run")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    args = parser.parse_args()
    if args.device is None:
        args.steps = args.steps or 30
        rows = run_cpu(args)
        print(f"reddino-train fit, recipe {args.recipe}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs")
        print(cpu_table(rows))
        result = {"cpu": rows}
    else:
        args.steps = args.steps or 20
        row = run_step_benchmark(args)
        print(step_table(row))
        result = {"step": row}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
