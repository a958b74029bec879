"""Run ``fit`` on the tiny recipe and write this rank's model checksums; for the tests that
need a separate process (torchrun, signals).

usage: fit_and_checksum.py DATA_DIR OUT_DIR MAX_STEPS [KEY=VALUE ...]

``{rank}`` in DATA_DIR or OUT_DIR becomes the rank, as when each node has its own disk.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
from torch.distributed.tensor import DTensor

from reddino_train.config import load_config
from reddino_train.train import fit


def checksum(module: torch.nn.Module) -> str:
    """Of this rank's copy: the whole model with DDP, its own shards with FSDP."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        digest.update(name.encode())
        digest.update(local.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_all_gathers() -> list[int]:
    """A counter of the all-gathers FSDP issues from now on (one per group of weights gathered)."""
    count = [0]
    gather = param_group.foreach_all_gather

    def counting(*args, **kwargs):
        count[0] += 1
        return gather(*args, **kwargs)

    param_group.foreach_all_gather = counting
    return count


if __name__ == "__main__":
    data_dir, out_dir, max_steps, *overrides = sys.argv[1:]
    rank = os.environ.get("RANK", "0")
    data_dir, out_dir = data_dir.format(rank=rank), out_dir.format(rank=rank)
    torch.set_num_threads(1)
    gathers = count_all_gathers()
    result = fit(load_config("tiny", overrides), data_dir, out_dir, max_steps=int(max_steps))
    summary = {
        "iterations_done": result.iterations_done,
        "iterations_this_run": result.iterations_this_run,
        "fsdp_all_gathers": gathers[0],
        "stopped_by_signal": result.stopped_by_signal,
        "student": checksum(result.student),
        "teacher": checksum(result.teacher),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(summary, handle)
