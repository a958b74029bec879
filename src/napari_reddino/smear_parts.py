"""Each smear's results of a ``reddino-analyse`` run, saved as the smear finishes, so that a run
cut short (a power cut, an out-of-memory kill, a scheduler's time limit, a full disk at the
end) goes on where it stopped: the same command reads back the smears already analysed instead
of analysing them again.

A part is keyed by the run's settings and by the smear's file (its path, size and modification
time) and name, so a smear that changed, or a run with another model, head, pixel size or code,
analyses it afresh. A part is an ``.npz`` without pickle: the cell table's columns and the
metadata's arrays as arrays, the rest of the metadata as JSON. Read back, it equals what was
saved, dtypes included, so a resumed run writes the files an uninterrupted one would.

A run that wrote its files before it was cut short also notes them (:data:`WRITTEN`): the same
command may replace them without ``--overwrite``, for they hold nothing its parts do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic_files import write_files_atomically
from .batch_analysis import SmearCells, file_identity

# in the parts folder (batch_analysis.PARTS): the files the unfinished run wrote, as it wrote them, and its settings
WRITTEN = "written.json"
PART_FORMAT = 1  # in every key: a part of another layout is no part of this run
_PART = re.compile(r"[0-9a-f]{40}\.npz")
# a part, the note of files written, and what a write of either killed before its rename left
_OURS = re.compile(rf"{_PART.pattern}|{re.escape(WRITTEN)}|\.({_PART.pattern}|{re.escape(WRITTEN)})\.[a-z0-9_]{{8}}\.tmp")
_ARRAY, _SCALAR = "\0array", "\0scalar"  # JSON stand-ins for the metadata's numpy arrays and scalars


class SmearParts:
    """The folder of one output folder's parts, for runs with ``settings`` (JSON-able: what the
    results follow from besides each smear's file)."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = settings

    def key(self, path: Path, name: str) -> str:
        """The key of the smear ``path`` named ``name`` in this run, as JSON text (ASCII: a file
        name that is not UTF-8 is escaped). Take it before reading the smear: a file replaced while
        it is analysed then keys the part to the older file, and is analysed again."""
        return json.dumps({"format": PART_FORMAT, "settings": self.settings, "file": os.path.abspath(path),
                           "identity": file_identity(path), "name": name}, sort_keys=True)

    def has(self, key: str) -> bool:
        try:
            return self._file(key).is_file()
        except OSError:  # a folder this user cannot read: as good as none
            return False

    def count(self) -> int:
        """How many parts the folder holds, of any smear or settings."""
        try:
            return sum(1 for file in self.folder.iterdir() if _PART.fullmatch(file.name))
        except OSError:  # none there, or none this user can read
            return 0

    def load(self, key: str) -> SmearCells | None:
        """The cells saved under ``key``, or None where there are none. Raises ValueError for a
        part that cannot be read."""
        file = self._file(key)
        try:
            with np.load(file, allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
        except (FileNotFoundError, NotADirectoryError):  # the latter: a file where the folder would be
            return None
        except Exception as error:  # a damaged disk, a file cut short: zipfile and numpy raise all kinds
            raise ValueError(f"{file} cannot be read ({error})") from error
        try:
            if str(arrays.pop("key")) != key:
                raise ValueError("it was saved for another smear")
            about = json.loads(str(arrays.pop("about")))
            features = _table(about["columns"], about["index"], arrays)
            metadata = _from_json(about["metadata"], arrays)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{file} is not a part of this run ({error})") from error
        return SmearCells(about["name"], features, metadata)

    def save(self, key: str, cells: SmearCells) -> None:
        """Save ``cells`` under ``key``, atomically. Raises OSError where it cannot be written, TypeError or
        ValueError for a value it cannot keep exactly."""
        arrays: dict[str, np.ndarray] = {}
        columns = [_column(f"column{number}", series, arrays) for number, (_, series) in
                   enumerate(cells.features.items())]
        index = cells.features.index
        about = {"name": cells.name, "columns": columns, "metadata": _to_json(cells.metadata, arrays),
                 "index": None if index.equals(pd.RangeIndex(len(index))) else _array(index.to_numpy(), arrays)}
        arrays["key"] = np.array(key)
        arrays["about"] = np.array(json.dumps(about))
        self.folder.mkdir(parents=True, exist_ok=True)
        write_files_atomically({self._file(key): lambda handle: np.savez(handle, **arrays)})

    def note_written(self, files: list[Path], smears: list[Path]) -> None:
        """Note that this run, unfinished, wrote ``files`` (each as it is now) of ``smears`` with its settings."""
        about = {"settings": self.settings, "files": {os.path.abspath(file): file_identity(file) for file in files},
                 "smears": [os.path.abspath(smear) for smear in smears]}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_files_atomically({self.folder / WRITTEN: lambda handle: handle.write(json.dumps(about).encode())})

    def same_settings(self, note: dict) -> bool:
        """Whether the run that wrote ``note`` (:func:`read_note`) had these settings."""
        return note.get("settings") == json.loads(json.dumps(self.settings))

    def keep_only(self, keys: list[str]) -> None:
        """Remove the parts of other smears or settings than ``keys``' (and what killed writes
        left); the note stays."""
        self._remove({self._file(key).name for key in keys} | {WRITTEN})

    def remove(self, keys: list[str]) -> None:
        """Remove the parts of ``keys`` alone (another run's parts and note stay), then the folder
        if that left it empty."""
        for key in keys:
            self._file(key).unlink(missing_ok=True)
        self._remove_folder()

    def clear(self) -> None:
        """Remove the parts, the note (and what killed writes left), then the folder if that left it empty."""
        if not self.folder.is_dir():
            return
        self._remove(set())
        self._remove_folder()

    def _remove_folder(self) -> None:
        try:
            self.folder.rmdir()
        except OSError:  # not empty (another run's parts, someone's own files), or gone
            pass

    def _remove(self, kept: set[str]) -> None:
        for file in self.folder.iterdir():
            if _OURS.fullmatch(file.name) and file.name not in kept:
                file.unlink(missing_ok=True)

    def _file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.npz"


def read_note(folder: str | os.PathLike) -> dict | None:
    """The note of the files an unfinished run wrote (:meth:`SmearParts.note_written`) in the
    parts folder ``folder``, or None where there is none that can be read."""
    try:
        note = json.loads((Path(folder) / WRITTEN).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and isinstance(note.get("files"), dict) else None


def newest_part_settings(folder: str | os.PathLike) -> dict | None:
    """The settings of the part saved last in the parts folder ``folder`` (of the run cut short,
    mostly), or None where none can be read: a resume on a busy CPU keeps that run's precision
    rather than time it again."""
    try:
        newest = max((file for file in Path(folder).iterdir() if _PART.fullmatch(file.name)),
                     key=lambda file: file.stat().st_mtime_ns, default=None)
        if newest is None:
            return None
        with np.load(newest, allow_pickle=False) as saved:  # the key alone is read
            return json.loads(str(saved["key"]))["settings"]
    except Exception:  # noqa: BLE001  (a part cut short or of another layout: none to follow)
        return None


def note_covers(note: dict, files: list[Path], smears: list[Path] | None = None) -> bool:
    """Whether ``note`` lists each of ``files`` as it is now (none changed since it was written)
    and, given ``smears``, only smears among them: another day's smears in the same folder are
    another run's files."""
    try:
        if smears is not None and not set(note.get("smears", [None])) <= {os.path.abspath(s) for s in smears}:
            return False
        return all(note["files"].get(os.path.abspath(file)) == file_identity(file) for file in files)
    except (OSError, TypeError):
        return False


def _column(key: str, series: pd.Series, arrays: dict[str, np.ndarray]) -> dict:
    """Put a table column into ``arrays``: numbers and booleans as they are, text as text with a
    mask of its missing values."""
    about = {"name": series.name, "dtype": str(series.dtype), "key": key}
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "biuf":
        arrays[key] = series.to_numpy()
        return about
    missing = series.isna().to_numpy()
    values = series.to_numpy(dtype=object)
    if not all(isinstance(value, str) for value in values[~missing]):
        raise TypeError(f"the column {series.name!r} holds {series.dtype} values that are not text")
    arrays[key] = np.array(["" if gone else value for value, gone in zip(values, missing)], dtype=str)
    arrays[f"{key}_missing"] = missing
    return about


def _table(columns: list[dict], index, arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    series = {}
    for about in columns:
        values = arrays[about["key"]]
        if f"{about['key']}_missing" in arrays:  # text
            values = np.where(arrays[f"{about['key']}_missing"], None, values.astype(object))
        series[about["name"]] = pd.Series(values, dtype=about["dtype"])
    table = pd.DataFrame(series, columns=[about["name"] for about in columns])
    if index is not None:
        table.index = pd.Index(_from_json(index, arrays))
    return table


def _array(value, arrays: dict[str, np.ndarray]) -> dict:
    key = f"meta{len(arrays)}"
    arrays[key] = np.asarray(value)
    return {_SCALAR if isinstance(value, np.generic) else _ARRAY: key}


def _to_json(value, arrays: dict[str, np.ndarray]):
    """``value`` as JSON, its numpy arrays and scalars moved into ``arrays``."""
    if isinstance(value, np.ndarray | np.generic):
        return _array(value, arrays)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("metadata keys must be text")
        return {key: _to_json(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_json(item, arrays) for item in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} exactly")  # a tuple would come back a list


def _from_json(value, arrays: dict[str, np.ndarray]):
    if isinstance(value, dict):
        if value.keys() == {_ARRAY}:
            return arrays[value[_ARRAY]]
        if value.keys() == {_SCALAR}:
            return arrays[value[_SCALAR]][()]
        return {key: _from_json(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item, arrays) for item in value]
    return value
