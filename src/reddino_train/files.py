"""Atomic file writes: a temporary file beside the target, then a rename, so a reader (or a
resumed run) sees either the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# Files are created with the permissions any new file gets here (mkstemp alone makes them 0600,
# unreadable to the rest of a lab's group). Read once: os.umask can only be read by setting it.
UMASK = os.umask(0o022)
os.umask(UMASK)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) in one rename."""
    payload = data.encode() if isinstance(data, str) else data
    write_atomic_with(path, lambda handle: handle.write(payload))


def write_atomic_with(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with what ``write(binary_handle)`` writes, in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o666 & ~UMASK)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
