"""What putting each crop on disk before its smear's journal line costs ``reddino-train prepare``.

Prepares the first ``--smears`` Chula smears with the defaults (224 px masked crops) into a
fresh folder, alternately as shipped and with ``os.fsync`` made a no-op (which also skips the
few syncs of its atomic index and journal writes), and prints the wall time of each run.

    python benchmarks/prepare_sync.py              # 60 smears, 2 runs each way
    python benchmarks/prepare_sync.py --smears 20 --runs 1
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import tempfile
import time
from pathlib import Path

from reddino_train.prepare import PrepareSettings, prepare

SMEARS = "/work/shared/data/chula_rbc12/Dataset/*.jpg"


def timed_prepare(smears: list[str], synced: bool) -> tuple[float, int]:
    """Seconds and crops of one prepare of ``smears`` into a temporary folder."""
    real = os.fsync
    if not synced:
        os.fsync = lambda fd: None
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
            start = time.perf_counter()
            report = prepare(smears, Path(folder) / "cells", PrepareSettings(), progress=False)
            return time.perf_counter() - start, report.samples_written
    finally:
        os.fsync = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smears", type=int, default=60)
    parser.add_argument("--runs", type=int, default=2, help="runs each way, taking turns")
    args = parser.parse_args()
    smears = sorted(glob.glob(SMEARS))[: args.smears]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {len(smears)} smears")
    print("| run | crops on disk before the journal | seconds | ms a crop |")
    print("| ---: | --- | ---: | ---: |")
    for run in range(args.runs):
        for synced in (True, False):
            seconds, crops = timed_prepare(smears, synced)
            print(f"| {run + 1} | {'yes (shipped)' if synced else 'no (os.fsync a no-op)'} | {seconds:.1f} | "
                  f"{seconds / crops * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
