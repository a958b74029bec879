"""Atomic file writes for training runs, through the plugin's writer
(:mod:`napari_reddino.atomic_files`): a reader (or a resumed run) sees either the old file or
the whole new one, never half of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) in one rename."""
    payload = data.encode() if isinstance(data, str) else data
    write_atomic_with(path, lambda handle: handle.write(payload))


def write_atomic_with(path: str | os.PathLike, write: Callable[[IO[bytes]], object], *,
                      texts: Mapping[str | os.PathLike, str] | None = None) -> None:
    """Replace ``path`` with what ``write(binary_handle)`` writes, in one rename; each of ``texts``
    (path: text) is written alongside and renamed right after it, not a whole write later."""
    # Imported on first write: the plugin's package takes a second or two to import, which
    # `reddino-train config` (no writes) should not pay.
    from napari_reddino.atomic_files import write_files_atomically

    writers = {path: write}
    for other, text in (texts or {}).items():
        writers[other] = lambda handle, payload=text.encode(): handle.write(payload)
    write_files_atomically(writers)


def remove_leftovers(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """Delete what writes of ``path`` by a killed process left behind; each removed file and its size."""
    from napari_reddino.atomic_files import remove_leftovers as remove

    return remove(path)
