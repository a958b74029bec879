"""How often FSDP gathers the weights in one training step, on two gloo ranks of this CPU.

Runs ``fit`` with ``train.parallel=fsdp`` under torchrun (2 processes, 1 thread each) on 64 px
crops of the test smears, counts every all-gather FSDP issues (and the bytes of the shards it
sends), and prints them per step with the run's wall time. The count is the same on GPUs;
the time it costs is the network's.

    python benchmarks/fsdp_gathers.py [--recipe tiny] [--steps 6] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from training import test_smear_crops  # noqa: E402


def count_in_this_rank(recipe: str, data: str, out: str, steps: int, overrides: list[str]) -> None:
    import torch
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    from reddino_train.config import load_config
    from reddino_train.train import fit

    counted = {"gathers": 0, "bytes": 0}
    gather = param_group.foreach_all_gather

    def counting(fsdp_params, *args, **kwargs):
        counted["gathers"] += 1
        counted["bytes"] += sum(p.sharded_param.to_local().nbytes for p in fsdp_params)  # this rank's shards
        return gather(fsdp_params, *args, **kwargs)

    param_group.foreach_all_gather = counting
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = fit(load_config(recipe, ["train.parallel=fsdp", *overrides]), data, out, max_steps=steps)
    if os.environ["RANK"] == "0":
        print(json.dumps({"steps": result.iterations_done, "seconds": time.perf_counter() - started, **counted}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = test_smear_crops(Path(folder) / "smears")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--rank-run", args.recipe, str(data), str(Path(folder) / "out"), str(args.steps),
                   *args.overrides]
        finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                  text=True, check=True)
    row = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"recipe {args.recipe} {' '.join(args.overrides)}, FSDP on 2 gloo ranks, {row['steps']} steps\n")
    print("| all-gathers per step | MB of shards gathered per step, per rank | wall seconds |")
    print("| ---: | ---: | ---: |")
    print(f"| {row['gathers'] / row['steps']:g} | {row['bytes'] / row['steps'] / 1e6:.1f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-run"]:
        recipe, data, out, steps, *overrides = sys.argv[2:]
        count_in_this_rank(recipe, data, out, int(steps), overrides)
    else:
        main()
