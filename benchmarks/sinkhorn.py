"""Seconds and peak extra memory of the teacher's Sinkhorn-Knopp targets at iBOT's sizes.

iBOT's teacher logits are masked patches x prototypes (RedDino's ViT-S recipe: about 21,000 x
131,072 per GPU), so the targets are a few passes over gigabytes: memory traffic, not
arithmetic. This times ``sinkhorn_knopp`` (3 iterations, as training runs it) on bf16 logits of
``--rows`` x ``--prototypes``, best of ``--repeats``, on the CPU or a GPU. On a CPU each call's
fresh gigabytes cost page faults that a GPU's caching allocator does not pay.

    python benchmarks/sinkhorn.py [--rows 2048] [--prototypes 131072] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from reddino_train.losses.teacher_targets import sinkhorn_knopp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--prototypes", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    # the heads' last layer is weight-normed over normalised features: logits are cosines, in [-1, 1]
    logits = (torch.rand(args.rows, args.prototypes, generator=generator, device=device) * 2 - 1).to(torch.bfloat16)
    best = float("inf")
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        targets = sinkhorn_knopp(logits, temp=0.07)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
        del targets
    size_gib = args.rows * args.prototypes * 4 / 2**30
    if device.type == "cuda":
        peak = f"{(torch.cuda.max_memory_allocated() - logits.nbytes) / 2**30:.2f} GiB above the logits"
    else:
        peak = f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"{args.rows} x {args.prototypes} bf16 logits ({size_gib:.2f} GiB as float32) on {device} ({name}), "
          f"{torch.get_num_threads()} threads")
    print("| seconds (best of {}) | GB/s of float32 targets | memory |".format(args.repeats))
    print("| ---: | ---: | --- |")
    print(f"| {best:.3f} | {size_gib * 2**30 / 1e9 / best:.2f} | {peak} |")


if __name__ == "__main__":
    main()
