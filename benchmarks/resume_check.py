"""Does a run resumed from its checkpoint repeat the uninterrupted one on this machine's device?

``reddino-train fit`` of the tiny recipe on the test smears: 4 steps straight, then 2 steps and
a resume to 4, and each step's losses side by side. On a GPU this is the path the CPU tests
cannot take: the CUDA device and random state saved and restored, and the teacher's fp16
logits under bf16. Bit-equal losses are the aim; the GPU's attention kernels may differ in the
last digits from run to run, which the table shows.

    python benchmarks/resume_check.py [--precision bf16] [--data tests/data/chula_rbc12]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from reddino_train.config import load_config
from reddino_train.monitor import read_log
from reddino_train.train import fit

LOSSES = ("loss", "dino", "ibot", "koleo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--data", default="tests/data/chula_rbc12")
    args = parser.parse_args()
    overrides = ["model.layerscale=1.0", "train.log_every=1", "train.num_workers=2", f"train.precision={args.precision}"]
    cfg = load_config("tiny", overrides)
    with tempfile.TemporaryDirectory() as scratch:
        straight, resumed = Path(scratch) / "straight", Path(scratch) / "resumed"
        fit(cfg, args.data, straight, max_steps=4)
        fit(cfg, args.data, resumed, max_steps=2)
        fit(cfg, args.data, resumed, max_steps=4)
        rows = zip(read_log(straight / "log.csv"), read_log(resumed / "log.csv"), strict=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"| step ({device}, {args.precision}) | " + " | ".join(f"{name} straight | resumed" for name in LOSSES) + " |")
        identical = True
        for before, after in rows:
            identical &= all(before[name] == after[name] for name in LOSSES)
            print(f"| {before['step']:.0f} | " + " | ".join(f"{before[name]:.6f} | {after[name]:.6f}" for name in LOSSES) + " |")
        print(f"identical: {identical}")


if __name__ == "__main__":
    main()
