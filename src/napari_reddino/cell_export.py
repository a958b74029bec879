"""One CSV row per cell of one or more cells layers, and optionally their embeddings.

Columns: those of :func:`napari_reddino.cell_table.cells_table`.

Floats are written in full (float32 values as their exact float64 value), booleans as
``True``/``False``. Read it back with ``pd.read_csv(path, dtype={"layer": str, "image": str,
"manual_label": str, "predicted_class": str}, keep_default_na=False, na_values=[""])``: plain
``read_csv`` reads an image or classes named like numbers ("1" from ``1.jpg``; classes coded
1, 2, 3) as numbers and a class named ``NA``, ``N/A`` or ``None`` as missing, like an
unlabelled cell's empty ``manual_label``.

The embeddings file is an ``.npz`` (no pickle; ``np.load(path)`` reads it) of ``layer``,
``image``, ``label``, ``model_id`` (one per cell) and ``embedding`` (float32, cells x dim), in the CSV's
row order, of the cells that have embeddings.

No Qt, no napari: a layer is anything with ``name``, ``features`` and ``metadata``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from .atomic_files import write_files_atomically
from .cell_embeddings import embeddings_of
from .cell_table import as_layers, cells_table, image_name
from .smear_summary import summarise_smears


def export_cells_csv(path, cells, *, embeddings_path=None, summary_path=None, classes=None,
                     overwrite: bool = False) -> Path:
    """Write the cells of ``cells`` (one cells layer or a list of them) to the CSV ``path``.

    With ``embeddings_path`` (``.npz``) their embeddings are written too, with ``summary_path``
    (``.csv``) one row per smear (:func:`~napari_reddino.smear_summary.summarise_smears`, its
    class columns in the order of ``classes``). All files are written atomically, and only
    after every check passed; without ``overwrite`` an existing file raises FileExistsError
    and nothing is written.
    """
    layers = as_layers(cells)
    if not layers:
        raise ValueError("No cells layers to export.")
    path = Path(path)
    writers: dict[Path, Callable[[IO[bytes]], object]] = {}
    table = cells_table(layers)
    # With the byte-order mark, Excel reads class names beyond ASCII (Stomatozyt, drépanocyte) as written.
    writers[path] = lambda handle: _float32_as_float64(table).to_csv(handle, index=False, encoding="utf-8-sig")
    if embeddings_path is not None:
        embeddings_path = Path(embeddings_path)
        if embeddings_path.suffix != ".npz":
            raise ValueError(f"The embeddings file must end in .npz; got {embeddings_path.name}.")
        if embeddings_path.resolve() == path.resolve():
            raise ValueError(f"The table and the embeddings would both be {path.name}; name the table .csv.")
        arrays = embedding_arrays(layers)
        writers[embeddings_path] = lambda handle: np.savez(handle, **arrays)
    if summary_path is not None:
        summary_path = Path(summary_path)
        if summary_path.resolve() in {target.resolve() for target in writers}:
            raise ValueError(f"The summary would overwrite the export's other file {summary_path.name}; name it apart.")
        summary = summarise_smears(layers, classes)
        writers[summary_path] = lambda handle: summary.to_csv(handle, index=False, encoding="utf-8-sig")
    for target in writers:  # refused before any file is written: a folder is never replaced
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; name a file to write.")
    if not overwrite:
        for target in writers:
            if target.exists():
                raise FileExistsError(errno.EEXIST, "File exists; pass overwrite=True to replace it", str(target))
    # a table never beside another write's summary; without overwrite, never over one written meanwhile
    write_files_atomically(writers, all_or_none=True, replace=overwrite)
    return path


def summary_path(path: str | Path) -> Path:
    """Where the smear summary of the export ``path`` goes: ``cells.csv`` -> ``cells_summary.csv``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_summary.csv")


def galleries_folder(path: str | Path) -> Path:
    """Where the class galleries of the export ``path`` go: ``cells.csv`` -> ``cells_galleries/``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_galleries")


def stale_beside(path: str | Path, *, with_embeddings: bool, with_summary: bool) -> list[Path]:
    """The embeddings file and smear summary that an earlier export left beside ``path`` and this
    one, written without them, would not replace: they would not match its table."""
    path = Path(path)
    earlier = ((path.with_suffix(".npz"), with_embeddings), (summary_path(path), with_summary))
    return [file for file, written in earlier if not written and file != path and file.exists()]


def embedding_arrays(layers: Sequence) -> dict[str, np.ndarray]:
    """``layer``, ``image``, ``label``, ``model_id`` and ``embedding`` of the embedded cells, in table order."""
    records = [(layer, embeddings_of(layer)) for layer in layers]
    missing = [layer.name for layer, record in records if record is None]
    if missing:
        raise ValueError(f"No embeddings on {', '.join(map(repr, missing))}: run Embed cells first, or export without embeddings.")
    dims = {record[1].shape[1] for _, record in records}
    if len(dims) > 1:
        raise ValueError(f"The layers' embeddings differ in size ({sorted(dims)}) and cannot share one file.")
    names, images, labels, models, embeddings = [], [], [], [], []
    for layer, (label_ids, vectors, model_id) in records:
        wanted = np.asarray(pd.DataFrame(layer.features)["label"], dtype=np.int64)
        rows = np.searchsorted(label_ids, wanted)
        embedded = rows < len(label_ids)
        embedded[embedded] = label_ids[rows[embedded]] == wanted[embedded]
        found, rows = wanted[embedded], rows[embedded]
        names.append(np.full(len(found), str(layer.name)))
        images.append(np.full(len(found), image_name(layer)))
        labels.append(found)
        models.append(np.full(len(found), model_id))
        embeddings.append(vectors[rows])
    return {
        "layer": np.concatenate(names).astype(str),
        "image": np.concatenate(images).astype(str),
        "label": np.concatenate(labels),
        "model_id": np.concatenate(models).astype(str),
        "embedding": np.concatenate(embeddings).astype(np.float32, copy=False),
    }


def _float32_as_float64(table: pd.DataFrame) -> pd.DataFrame:
    """float32 columns as float64, so the CSV holds their exact values, not a shortest float32 repr."""
    narrow = [c for c in table.columns if table[c].dtype == np.float32]
    return table.astype(dict.fromkeys(narrow, np.float64)) if narrow else table
