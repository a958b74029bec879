"""One training run per output folder at a time.

Two ``reddino-train fit`` runs on one ``--out`` would overwrite each other's checkpoint, log
and config, and each would delete the other's checkpoint in the middle of its save. Rank 0
holds an exclusive ``flock`` on ``OUT/.reddino-train.lock`` for the whole run; a second run
is refused on every one of its ranks before it touches the folder. The kernel releases the
lock when the process ends, however it ends, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .distributed import all_gather_objects, rank

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded
    fcntl = None

LOCK_NAME = ".reddino-train.lock"


class RunFolderBusyError(RuntimeError):
    """Another training run is writing to the output folder."""


@contextmanager
def hold_run_folder(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out`` for this run, or raise :class:`RunFolderBusyError` on every rank when
    another run holds it. Under torchrun every rank enters; only rank 0 locks."""
    out = Path(out)
    handle, refusal = None, None
    if rank() == 0 and fcntl is not None:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not yet said which"
            handle.close()
            handle = None
            if isinstance(error, BlockingIOError):
                refusal = (f"{out} is in use by another reddino-train fit ({holder}); wait for it to end, "
                           "or give this run another --out")
            else:  # a file system without locks (Lustre mounted without flock)
                warnings.warn(f"cannot lock {out} ({error.strerror}); nothing stops a second run from "
                              "writing to this folder at the same time", RuntimeWarning, stacklevel=3)
        else:
            handle.truncate(0)
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
            handle.flush()
    refusal = all_gather_objects(refusal)[0]  # rank 0's answer, on every rank
    if refusal is not None:
        raise RunFolderBusyError(refusal)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock
