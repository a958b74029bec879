"""One training run per output folder at a time.

Two ``reddino-train fit`` runs on one ``--out`` would overwrite each other's checkpoint, log
and config, and each would delete the other's checkpoint in the middle of its save. Rank 0
holds an exclusive lock on ``OUT/.reddino-train.lock`` for the whole run; a second run is
refused on every one of its ranks before it touches the folder.

The lock is a POSIX record lock (``lockf``), not ``flock``: an ``flock`` is shared with forked
children, so the data loader's workers would keep the folder locked after a killed run; a
record lock belongs to the process alone and the kernel drops it when that process ends,
however it ends. Across nodes it guards only where the shared file system passes locks on
(NFS with its lock manager); an NFS mount with ``nolock`` or Lustre's ``localflock`` lock
each node apart, and a second run started on another node is not stopped there.

A fresh run (no checkpoint in the folder) replaces ``config.yaml`` and ``log.csv`` and removes
``config-until-step-*.yaml`` (an earlier run's, its checkpoint moved away to start afresh): a
folder that holds anything else (but hidden files and a job's ``*.out``, ``*.err`` and
``*.log``), or a ``config.yaml`` or ``log.csv`` that is no run's, is refused, as ``prepare``
and ``export`` refuse theirs.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .checkpoint import CHECKPOINT_NAME, KEPT_FOLDER, kept_checkpoints
from .config import CONFIG_NAME, is_training_config, run_settings_files
from .distributed import all_gather_objects, raise_rank0_failure, rank, world_size
from .monitor import LOG_NAME, is_training_log

try:
    import fcntl
except ImportError:  # Windows: no record locks; runs there are not guarded
    fcntl = None

LOCK_NAME = ".reddino-train.lock"
PREPARE_LOCK_NAME = ".reddino-prepare.lock"
JOB_LOG_SUFFIXES = (".out", ".err", ".log")  # a job script's own logs (slurm-123.out, tee'd output) may come first


class RunFolderError(RuntimeError):
    """The output folder cannot be used by this run."""


class RunFolderBusyError(RunFolderError):
    """Another run (of fit, or of prepare for its folder) is writing to the output folder."""


@contextmanager
def hold_run_folder(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out`` for this run, or raise :class:`RunFolderBusyError` (another run holds it) or
    :class:`RunFolderError` (it cannot be made or written) on every rank. Under torchrun every
    rank enters; only rank 0 locks."""
    out = Path(out)
    handle, refusal = None, None
    if rank() == 0:
        try:  # the folder's files first: a refused folder gets no lock file
            refusal = _not_a_run_folder(out)
            if refusal is None and fcntl is not None:
                handle, refusal = _lock(out)
        except OSError as error:  # a read-only folder, --out naming a file
            refusal = (RunFolderError, f"cannot use {out} as the output folder: {error}")
    refusal = all_gather_objects(refusal)[0]  # rank 0's answer, on every rank
    if refusal is not None:
        if handle is not None:
            handle.close()
        kind, message = refusal
        raise kind(message)
    try:
        _check_shared(out)
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock


def _not_a_run_folder(out: Path) -> tuple[type, str] | None:
    """Why a fresh run must not write into ``out`` (see the module docstring), or None."""
    if not out.is_dir() or (out / CHECKPOINT_NAME).exists():
        return None
    if earlier := kept_checkpoints(out):  # a run's, its checkpoint.pt moved or lost
        names = ", ".join(f"{KEPT_FOLDER}/{path.name}" for path in earlier)
        return RunFolderError, (f"{out} holds earlier checkpoints of a run ({names}) but no {CHECKPOINT_NAME}: copy "
                                f"the one to go on from to {CHECKPOINT_NAME} to resume there, or give --out a new folder")
    own = {CONFIG_NAME, LOG_NAME, KEPT_FOLDER, *(path.name for path in run_settings_files(out))}
    foreign = sorted(path.name for path in out.iterdir() if not path.name.startswith(".")
                     and path.name not in own and not path.name.endswith(JOB_LOG_SUFFIXES))
    if (out / CONFIG_NAME).is_file() and not is_training_config(out / CONFIG_NAME):
        foreign.append(f"{CONFIG_NAME}, which is no training config")
    if (out / LOG_NAME).is_file() and not is_training_log(out / LOG_NAME):
        foreign.append(f"{LOG_NAME}, which is no training log")
    if not foreign:
        return None
    return RunFolderError, (f"{out} holds files that no training run wrote ({'; '.join(foreign[:5])}"
                            f"{'; ...' if len(foreign) > 5 else ''}): give --out a new or empty folder "
                            "(or the folder of a run to resume it)")


def _check_shared(out: Path) -> None:
    """Raise :class:`RunFolderError` on every rank unless every rank sees the file rank 0 writes
    into ``out``: a folder on each node's own disk would pass every other check on a fresh run
    and keep the checkpoint on rank 0's node alone, found out only at the resume. The file's
    name is new each run, so a network file system has no stale answer for it cached."""
    if world_size() == 1:
        return
    path = out / all_gather_objects(f".reddino-train.shared-{secrets.token_hex(6)}")[0]
    failure = None
    if rank() == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text("every rank of a reddino-train fit reads this at its start\n")
        except OSError as error:
            failure = RunFolderError(f"cannot use {out} as the output folder: {error}")
    raise_rank0_failure(failure)  # also: rank 0 has written it
    seen = all_gather_objects(path.is_file())
    if rank() == 0:
        path.unlink()
    blind = [str(index) for index, sees in enumerate(seen) if not sees]
    if blind:
        raise RunFolderError(f"{out} is not one folder shared by every rank: rank {', '.join(blind)} does not see "
                             "what rank 0 writes there; give --out a folder on a file system that every node mounts")


@contextmanager
def hold_prepare_folder(out: Path) -> Iterator[None]:
    """Hold ``out`` for one ``prepare``, or raise :class:`RunFolderBusyError`. Two given one
    ``--out`` (a SLURM array's jobs, one per slide folder) would each read the journal, then
    replace each other's smears of the same name and each other's journal lines."""
    handle, refusal = _lock(out, PREPARE_LOCK_NAME, "reddino-train prepare") if fcntl is not None else (None, None)
    if refusal is not None:
        kind, message = refusal
        raise kind(message)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _lock(out: Path, name: str = LOCK_NAME, program: str = "reddino-train fit",
          ) -> tuple[IO[str] | None, tuple[type, str] | None]:
    """The open, locked lock file, or None and why the run must not go on (None: it may, unguarded)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / name, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not yet said which"
        handle.close()
        if error.errno in (errno.EACCES, errno.EAGAIN):
            # NFSv3 keeps a dead node's lock until that node boots again: the run can go on elsewhere
            moved = (f"; if that process is gone with its node, copy {CHECKPOINT_NAME}, {CONFIG_NAME} and {LOG_NAME} "
                     "into a new --out to resume there") if name == LOCK_NAME else ""
            return None, (RunFolderBusyError, f"{out} is in use by another {program} ({holder}); "
                                              f"wait for it to end, or give this run another --out{moved}")
        # a file system without locks (Lustre mounted without them)
        warnings.warn(f"cannot lock {out} ({error.strerror}); nothing stops a second run from writing to this "
                      "folder at the same time", RuntimeWarning, stacklevel=4)
        return None, None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None
