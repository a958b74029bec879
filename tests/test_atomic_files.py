"""write_files_atomically: files that belong together are replaced together, or not at all."""

from pathlib import Path

import pytest

from napari_reddino.atomic_files import write_files_atomically


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
