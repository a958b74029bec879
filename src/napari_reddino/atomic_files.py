"""Atomic file writes: temporary files beside the targets, then renames, so a reader (or a
resumed run) sees either the old file or the whole new one, never half of it.

Shared by the plugin and ``reddino_train``. Files get the permissions any new file gets here:
``mkstemp`` alone makes them 0600, unreadable to the rest of a lab's group.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it
os.umask(UMASK)


class PartlyWrittenError(OSError):
    """Some files of one atomic write were replaced before another could not be."""

    def __init__(self, written: list[Path], failed: Path, error: OSError, unchanged: list[Path]):
        names = ", ".join(path.name for path in written)
        kept = " and ".join(path.name for path in unchanged)
        super().__init__(f"{names} {'was' if len(written) == 1 else 'were'} written, but {failed.name} could not "
                         f"be replaced ({error.strerror or error}); {kept} {'is' if len(unchanged) == 1 else 'are'} "
                         "as before")
        self.written, self.failed, self.error, self.unchanged = written, failed, error, unchanged


class NotReplacedError(OSError):
    """A target could not be replaced (held open by another program, say): nothing changed (the
    targets replaced before it, ``put_back``, were put back as they were)."""

    def __init__(self, target: Path, error: OSError, put_back: list[Path] = ()):
        super().__init__(error.errno, error.strerror, str(target))
        back = f" and {' and '.join(path.name for path in put_back)}, put back," if put_back else ""
        self.message = (f"{target.name} could not be replaced ({error.strerror or error}); it{back} "
                        f"{'are' if put_back else 'is'} as before")

    def __str__(self) -> str:
        return self.message


def write_files_atomically(writers: Mapping[str | os.PathLike, Callable[[IO[bytes]], object]], *,
                           all_or_none: bool = False, replace: bool = True) -> None:
    """Write each file with its ``writer(binary_handle)`` beside its target, then rename them all.

    A failing writer leaves every target as it was (and no temporary file behind). A first rename
    that fails raises :class:`NotReplacedError`; should a rename fail after others succeeded,
    :class:`PartlyWrittenError` names the files replaced, or, ``all_or_none``, those are put back
    as they were (from hard links to the old files; where the file system has none, they stay
    replaced) and :class:`NotReplacedError` says so: files that belong together (a table and its
    summary, one of them open in a spreadsheet) never mix two writes. Without ``replace``, a target
    that another process made while these were written is not replaced: FileExistsError (after the
    others were put back, ``all_or_none``), where a check beforehand would have let them overwrite
    each other.
    The folders are synced once all are renamed.
    """
    staged: list[tuple[str, Path]] = []
    renamed: list[Path] = []
    olds: dict[Path, Path | None | bool] = {}  # all_or_none: each target renamed, a link to its old file (None: new)
    try:
        for target, write in writers.items():
            target = Path(target)
            if not target.parent.is_dir():  # else mkstemp names its own temporary file in the error
                raise FileNotFoundError(f"No folder {target.parent} to write {target.name} in")
            fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=_prefix(target), suffix=".tmp")
            staged.append((temporary, target))
            with os.fdopen(fd, "wb") as handle:  # closed whatever happens next
                if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where mkstemp's mode is moot
                    os.fchmod(handle.fileno(), 0o666 & ~UMASK)
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the rename: a power cut leaves old or new
        while staged:
            temporary, target = staged[0]
            try:
                if all_or_none and len(staged) > 1:  # not the last: a later one may fail
                    olds[target] = _linked_aside(target)
                if replace:
                    os.replace(temporary, target)
                else:
                    _publish_new(temporary, target)
            except BaseException as error:  # Ctrl-C too: what was replaced is put back all the same
                try:
                    new = _put_back(renamed, olds) if all_or_none else renamed
                except BaseException:  # a second Ctrl-C meanwhile: the old files not yet back stay, as .old
                    olds.clear()
                    raise
                if not isinstance(error, OSError):
                    raise
                if new:
                    back = [path for path in renamed if path not in new]
                    raise PartlyWrittenError(new, target, error, [*back, *(path for _, path in staged)]) from error
                if isinstance(error, FileExistsError):
                    raise
                # named by its target, not the temporary file
                raise NotReplacedError(target, error, renamed if all_or_none else []) from error
            staged.pop(0)
            renamed.append(target)
    finally:  # leftovers that cannot go (held open on Windows) must not hide what happened
        for leftover in [*(temporary for temporary, _ in staged), *(old for old in olds.values()
                                                                      if isinstance(old, Path))]:
            with contextlib.suppress(OSError):
                Path(leftover).unlink(missing_ok=True)
    for folder in dict.fromkeys(target.parent for target in renamed):
        _sync_folder(folder)


def _publish_new(temporary: str, target: Path) -> None:
    """Give ``temporary`` the name ``target`` unless that is taken (FileExistsError): a hard link
    fails there, where a rename would replace. Without hard links, a check just before."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not target.exists():
            os.replace(temporary, target)
            return
    else:
        os.unlink(temporary)
        return
    raise FileExistsError(errno.EEXIST, "File exists (written meanwhile by another process)", str(target))


def _linked_aside(target: Path) -> Path | None | bool:
    """A hard link to ``target``'s file under a temporary name, which keeps the old file whole
    once ``target`` is replaced; None where there is no file, False where the file system makes
    no hard links (then it could not be put back)."""
    if not target.exists():
        return None
    try:
        # ".old", not ".tmp": a hard link keeps the old file's times, and remove_leftovers judges
        # a .tmp file by its age
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=_prefix(target), suffix=".old")
        os.close(fd)
        os.unlink(name)
        os.link(target, name)
    except OSError:
        return False
    return Path(name)


def _put_back(renamed: list[Path], olds: dict[Path, Path | None | bool]) -> list[Path]:
    """Put the targets ``renamed`` back as they were before this write; return those still new
    (all of them where one has no old file kept: the files must not mix two writes either way)."""
    if any(olds[target] is False for target in renamed):
        return list(renamed)
    new = []
    for target in reversed(renamed):
        old = olds[target]
        try:
            if old is None:
                target.unlink()
            else:
                os.replace(old, target)
        except OSError:
            new.append(target)
            continue
        olds[target] = None  # put back: no link left to remove
    return [target for target in renamed if target in new]


def remove_leftovers(target: str | os.PathLike, *, older_than_s: float = 0.0) -> list[tuple[Path, int]]:
    """Delete the files of writes of ``target`` that a killed process left behind: the new
    file it wrote (``.tmp``) and the old one it kept to put back (``.old``, with all_or_none).

    Returns each removed file with its size. Only for a writer that knows no other process
    writes ``target`` now (a training run's rank 0 for its own checkpoint), or with
    ``older_than_s``: only files untouched for longer than any write of ``target`` takes. An
    ``.old`` file is a hard link, which keeps the old file's modification time: its age is that
    of the link (its inode's change time), and where that is not known (Windows) it stays.
    """
    target = Path(target)
    # exactly mkstemp's names for this target: its prefix, 8 random characters, the suffix
    ours = re.compile(re.escape(_prefix(target)) + r"[a-z0-9_]{8}\.(tmp|old)")
    removed = []
    for leftover in target.parent.glob(f"{glob.escape(_prefix(target))}*"):
        try:
            if not (match := ours.fullmatch(leftover.name)) or not leftover.is_file() or leftover.is_symlink():
                continue
            stat = leftover.stat()
            if match[1] == "old" and older_than_s and os.name == "nt":  # st_ctime: the file's creation there
                continue
            changed = stat.st_ctime if match[1] == "old" else stat.st_mtime
            if older_than_s and time.time() - changed <= older_than_s:  # perhaps being written
                continue
            size = stat.st_size
            leftover.unlink()
        except FileNotFoundError:  # gone since the listing
            continue
        removed.append((leftover, size))
    return removed


def _prefix(target: Path) -> str:
    return f".{target.name}."


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable where the system can (POSIX; not Windows, nor
    file systems that refuse to sync a folder). Best effort: the files are in place already, so a
    refusal here must not be reported as a failed write."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
