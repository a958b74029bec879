"""Memory a forked data-loader worker copies from its parent by reading the data set's paths.

``reddino-train fit`` lists every training image once, in the main process; the DataLoader's
workers are forked from it and share its memory until they write to a page. Reading a Python
object writes to it (its reference count; a Path also caches its string and hash), so a worker
that has read every path of a list of Path objects holds its own copy of the list. This script
forks one worker per layout, lets it read every path as ``ImageFolder`` does (the path, its
string, its hash), and reports the private memory the worker gained (Linux's
``/proc/self/smaps_rollup``: Private_Dirty), beside the layout's size in the parent.

    python benchmarks/path_memory.py                  # 1,250,000 paths: RedDino's pretraining set
    python benchmarks/path_memory.py --paths 200000
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import tracemalloc
from pathlib import Path

from reddino_train.data import PackedPaths


def private_dirty_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup (Linux only)")


def read_every_path(paths, report) -> None:
    """In the forked worker: read each path as ImageFolder does, then say what was copied."""
    before = private_dirty_kib()
    for index in range(len(paths)):
        path = paths[index]
        hash(path)
        str(path)
    report.put(private_dirty_kib() - before)


def copied_by_a_worker(paths) -> int:
    """KiB of private memory one forked worker gains by reading every path."""
    report = multiprocessing.get_context("fork").Queue()
    worker = multiprocessing.get_context("fork").Process(target=read_every_path, args=(paths, report))
    worker.start()
    copied = report.get()
    worker.join()
    return copied


def listed(count: int) -> list[Path]:
    """Paths shaped like a prepared RedDino set: a folder per slide, a file per cell."""
    return [Path(f"/data/reddino/cells/slide_{index // 1000:05d}/cell_{index:07d}.png") for index in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=1_250_000)
    args = parser.parse_args()
    rows = []
    for name in ("list of Path", "PackedPaths"):
        source = None if name == "list of Path" else listed(args.paths)  # what find_images returns
        gc.collect()
        tracemalloc.start()  # what the layout itself holds (with pathlib's interned names for the list)
        paths = listed(args.paths) if source is None else PackedPaths(source)
        del source  # with the strings that packing cached on its Paths
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        copied = copied_by_a_worker(paths)
        rows.append((name, held / args.paths, held / 2**20, copied / 1024))
        del paths
    print(f"{args.paths:,} paths of {len(str(listed(1)[0]))} characters\n")
    print("| layout | bytes a path in the parent | MiB in the parent | MiB copied by each worker that reads them all |")
    print("| --- | ---: | ---: | ---: |")
    for name, per_path, parent, copied in rows:
        print(f"| {name} | {per_path:.0f} | {parent:,.0f} | {copied:,.0f} |")


if __name__ == "__main__":
    main()
