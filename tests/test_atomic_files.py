"""write_files_atomically: files that belong together are replaced together, or not at all."""

import os
import time
from pathlib import Path

import pytest

from napari_reddino.atomic_files import NotReplacedError, PartlyWrittenError, remove_leftovers, write_files_atomically


def test_a_file_written_meanwhile_by_another_process_is_not_replaced_and_the_others_are_taken_back(tmp_path):
    # Two runs that checked the folder empty and finish at once: the second must not replace the
    # first's summary, nor leave its own table beside it.
    table, summary = tmp_path / "cells.csv", tmp_path / "cells_summary.csv"

    def table_while_another_run_writes_its_summary(handle):
        handle.write(b"this run's table")
        summary.write_bytes(b"the other run's summary")

    with pytest.raises(FileExistsError) as refused:
        write_files_atomically({table: table_while_another_run_writes_its_summary,
                                summary: lambda handle: handle.write(b"this run's summary")},
                               all_or_none=True, replace=False)
    assert Path(refused.value.filename) == summary
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cells_summary.csv"]  # no table, no temporary
    assert summary.read_bytes() == b"the other run's summary"
    write_files_atomically({table: lambda handle: handle.write(b"new")}, replace=False)  # a free name is taken
    assert table.read_bytes() == b"new"
    write_files_atomically({table: lambda handle: handle.write(b"newer")})  # replace: the default
    assert table.read_bytes() == b"newer"


def three_files(folder: Path) -> dict:
    """The writers of a table, its embeddings and its summary; each file exists with "old" in it."""
    names = ("cells.csv", "cells.npz", "cells_summary.csv")
    for name in names:
        (folder / name).write_bytes(b"old")
    return {folder / name: (lambda handle: handle.write(b"new")) for name in names}


def refusing(monkeypatch, *refused: tuple[str, str], error: BaseException = PermissionError(13, "Permission denied")):
    """``os.replace`` raising ``error`` for each (source's end, target's name) of ``refused``."""
    replace = os.replace

    def replace_unless_refused(source, target):
        if any(str(source).endswith(end) and Path(target).name == name for end, name in refused):
            raise error
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_unless_refused)


def test_a_put_back_that_fails_half_way_names_only_the_files_still_new(tmp_path, monkeypatch):
    writers = three_files(tmp_path)
    replace, refused = os.replace, []

    def summary_held_then_the_table_too(source, target):  # the table opened by the time it is put back
        if Path(target).name == "cells_summary.csv" or (Path(target).name == "cells.csv" and refused):
            refused.append(Path(target).name)
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", summary_held_then_the_table_too)
    with pytest.raises(PartlyWrittenError, match=r"^cells.csv was written, but cells_summary.csv could not be "
                                                 r"replaced \(Permission denied\); cells.npz and cells_summary.csv "
                                                 r"are as before$"):
        write_files_atomically(writers, all_or_none=True)
    assert [(tmp_path / name).read_bytes() for name in ("cells.csv", "cells.npz", "cells_summary.csv")] == [
        b"new", b"old", b"old"]


def test_ctrl_c_between_the_renames_puts_back_what_was_replaced(tmp_path, monkeypatch):
    writers = three_files(tmp_path)
    refusing(monkeypatch, (".tmp", "cells_summary.csv"), error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_files_atomically(writers, all_or_none=True)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == {
        "cells.csv": b"old", "cells.npz": b"old", "cells_summary.csv": b"old"}


def test_a_leftover_that_cannot_be_removed_does_not_hide_what_failed(tmp_path, monkeypatch):
    # On Windows the link to a file open in a spreadsheet cannot be deleted at once.
    writers = three_files(tmp_path)
    refusing(monkeypatch, (".tmp", "cells.npz"))
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        PermissionError(32, "in use")) if self.name.startswith(".cells.npz.") else unlink(self, missing_ok))
    with pytest.raises(NotReplacedError, match=r"^cells.npz could not be replaced \(Permission denied\); it and "
                                               r"cells.csv, put back, are as before$"):
        write_files_atomically(writers, all_or_none=True)
    assert (tmp_path / "cells.csv").read_bytes() == b"old"


def test_the_old_files_a_write_keeps_to_put_back_are_no_killed_runs_leftovers(tmp_path, monkeypatch):
    """Another run cleaning a killed run's temporary files while this one publishes: the hard
    links to the old files keep those files' times, so they were taken for a dead run's and
    deleted, and a failed write could not put the old files back (a new table beside an old summary)."""
    writers = three_files(tmp_path)
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in writers:
        os.utime(path, (two_days_ago, two_days_ago))
    replace, removed = os.replace, []

    def another_run_cleaning_meanwhile(source, target):
        if Path(target).name == "cells_summary.csv":  # the table and embeddings replaced by now
            removed.extend(leftover for path in writers for leftover in remove_leftovers(path, older_than_s=3600))
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", another_run_cleaning_meanwhile)
    with pytest.raises(NotReplacedError, match="put back, are as before"):
        write_files_atomically(writers, all_or_none=True)
    assert removed == [] and {path.name: path.read_bytes() for path in tmp_path.iterdir()} == {
        "cells.csv": b"old", "cells.npz": b"old", "cells_summary.csv": b"old"}


def test_a_second_ctrl_c_while_putting_back_keeps_the_old_files_not_yet_back(tmp_path, monkeypatch):
    """They stay beside their targets as hidden .old files to recover from (and are a killed
    run's leftovers to a later clean-up), rather than deleted with the folder left mixed."""
    writers = three_files(tmp_path)
    replace = os.replace

    def summary_held_then_ctrl_c(source, target):
        if str(source).endswith(".tmp") and Path(target).name == "cells_summary.csv":
            raise PermissionError(13, "Permission denied")
        if str(source).endswith(".old"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", summary_held_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_files_atomically(writers, all_or_none=True)
    kept = sorted(path.name.split(".")[1] + "." + path.name.split(".")[2] for path in tmp_path.glob(".*.old"))
    assert kept == ["cells.csv", "cells.npz"] and all(path.read_bytes() == b"old" for path in tmp_path.glob(".*.old"))
    monkeypatch.setattr(os, "replace", replace)
    swept = [leftover.name for target in writers for leftover, _ in remove_leftovers(target)]
    assert len(swept) == 2 and not list(tmp_path.glob(".*"))  # a killed run's, to a clean-up that knows no other
