"""Many smears without the GUI: each is segmented, measured, embedded and classified with a
saved head exactly as the widgets do it, and comes out shaped like a cells layer, so the
export writes the same cells CSV and smear summary as the Cell map widget
(``reddino-analyse`` is the command line of it).

No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cell_classifier import prediction_table
from .cell_table import PREDICTED_CLASSES
from .cell_embeddings import METADATA_KEY, EmbeddedCells, fingerprint, image_digest, labels_digest, store_run
from .class_gallery import GalleryError, GalleryFiles, save_class_gallery
from .measurements import measure_cells
from .segmentation import RBC_DIAMETER_UM, WORKING_DIAMETER_PX, estimate_cell_diameter, segment_cells
from .steps import Progress, run_steps
from .wording import shown

SMEAR_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
GALLERIES = "galleries"  # reddino-analyse's folder of class galleries, beside its cells.csv
PARTS = ".reddino-analyse-parts"  # its smears' results as they finish (smear_parts), hidden from the search for smears
# Cells that look this many times larger or smaller than a given pixel size makes 7.5 µm cells
# (estimates lie within 15 % on real smears): the pixel size is another microscope's or objective's.
PIXEL_SIZE_DOUBT = 1.5


@dataclass
class SmearCells:
    """The cells of one smear, as export and summary read a cells layer."""

    name: str  # "<smear> cells", as Segment cells names its layer
    features: pd.DataFrame
    metadata: dict = field(default_factory=dict)


def list_smears(sources: Sequence[str | os.PathLike], *, leave_out: str | os.PathLike | None = None,
                unreadable: list[Path] | None = None) -> list[Path]:
    """Every smear named: files as given, folders searched for images (any depth, through linked
    folders, sorted), but not in a folder below them that is hidden (``.Trash-1000``,
    ``.snapshot``) or a NAS's own (``@eaDir``), is ``leave_out`` (this run's output folder) or
    holds the class galleries an earlier export or run drew beside its table
    (:func:`is_gallery_folder`): those pictures are no smears. Folders that cannot be read are
    appended to ``unreadable``, where given."""
    skipped = Path(leave_out).resolve() if leave_out is not None else None

    def is_smear(path: Path, source: Path) -> bool:
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in SMEAR_SUFFIXES:
            return False
        between = [source / folder for folder in path.relative_to(source).parents[:-1]]
        return not any(folder.resolve() == skipped or is_gallery_folder(folder) for folder in between)

    found = []
    for source in map(Path, sources):
        if source.is_dir():
            found.extend(sorted(path for path in _files_under(source, unreadable) if is_smear(path, source)))
        else:
            found.append(source)
    unique, seen = [], set()
    for path in found:  # a file named twice (a/1.jpg and a/../a/1.jpg) once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


# Folders of copies and system files (any letter case): snapshots, recycle bins, a NAS's
# thumbnails, and those an ordinary user cannot read, which would fail every run. Hidden folders too.
_NOT_SMEAR_FOLDERS = {"@eadir", "@recycle", "@recently-snapshot", "#recycle", "#snapshot", "~snapshot",
                      "$recycle.bin", "system volume information", "lost+found"}


def _files_under(folder: Path, unreadable: list[Path] | None) -> Iterator[Path]:
    """The files at any depth under ``folder`` (sorted within each folder), through linked
    folders: each real folder once, and by its own path where it lies under ``folder`` too (links
    are followed after the folders themselves). Not in hidden folders or those of
    :data:`_NOT_SMEAR_FOLDERS`."""
    seen, links = set(), []

    def cannot_read(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append(Path(error.filename))

    def walk(top: str | Path) -> Iterator[Path]:
        for here, folders, files in os.walk(top, onerror=cannot_read):
            real = os.path.realpath(here)
            if real in seen:
                folders[:] = []
                continue
            seen.add(real)
            folders[:] = sorted(name for name in folders
                                if not name.startswith(".") and name.casefold() not in _NOT_SMEAR_FOLDERS)
            links.extend(os.path.join(here, name) for name in folders if os.path.islink(os.path.join(here, name)))
            yield from (Path(here) / name for name in sorted(files))

    yield from walk(folder)
    while links:  # os.walk lists a linked folder but does not enter it
        yield from walk(links.pop(0))


def is_gallery_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the class galleries of a table beside it: ``galleries/`` beside a
    ``reddino-analyse`` run's ``cells.csv`` (or its parts, of a run killed before it wrote one),
    or ``<name>_galleries/`` beside an export's ``<name>.csv``."""
    table = "cells" if folder.name == GALLERIES else folder.name.removesuffix("_galleries")
    if table == folder.name:
        return False
    return (folder.parent / f"{table}.csv").is_file() or (folder.name == GALLERIES
                                                          and (folder.parent / PARTS).is_dir())


def smear_names(paths: Sequence[Path]) -> list[str]:
    """A name per smear: its file name without suffix, as napari names the image layer; where
    two smears would share it, their file names with as many of their folders as tell them apart
    (each :func:`shown`)."""
    def name(path: Path, depth: int) -> str:
        return shown(path.stem if depth == 0 else "/".join(path.parts[-depth - 1:]))

    names: list[str | None] = [None] * len(paths)
    depth = 0
    while None in names:  # one count per depth: a folder of 10,000 smears takes a moment, not minutes
        seen = Counter(name(path, depth) for path in paths)
        for index, path in enumerate(paths):
            # the whole path (depth 1 at least: depth 0 drops the suffix) tells any two apart
            if names[index] is None and (seen[name(path, depth)] == 1 or depth >= max(len(path.parts) - 1, 1)):
                names[index] = name(path, depth)
        depth += 1
    # One smear's file name can be another's stem (1.jpg beside 1.jpg.png): the later gets " [1]", as
    # napari numbers a layer whose name is taken.
    unique: list[str] = []
    taken: set[str] = set()
    for given in names:
        candidate, number = given, 1
        while candidate in taken:
            candidate, number = f"{given} [{number}]", number + 1
        unique.append(candidate)
        taken.add(candidate)
    return unique


class SmearAnalysis:
    """One set of settings for every smear: the pixel size, and optionally a model (an
    :class:`~napari_reddino.embedding.Embedder` loaded from ``model``) and a head for it. Cells
    are cropped as the head's were; without a head (or with one saved before heads recorded
    their crops), as the model's training cells were, where its config says (``reddino-train
    export``), else with the Embed widget's defaults.

    ``keep_embeddings=False`` keeps of each smear's embeddings only their ids and model (the
    vectors become zero-wide): a long batch that writes no embeddings file then holds a few
    kilobytes per smear, not megabytes. With a head and ``galleries`` (a folder), each smear's
    :func:`~napari_reddino.class_gallery.class_gallery` is written there (see :class:`GalleryFiles`)."""

    def __init__(self, *, embedder=None, model: str | os.PathLike | None = None, head=None,
                 pixel_size_um: float | None = None, keep_embeddings: bool = True,
                 galleries: str | os.PathLike | None = None):
        if head is not None and embedder is None:
            raise ValueError("A head classifies embeddings; give the model it was trained on too.")
        if galleries is not None and head is None:
            raise ValueError("A gallery shows each class the head predicts; give a head too.")
        self.embedder, self.model, self.head, self.pixel_size_um = embedder, model, head, pixel_size_um
        self.keep_embeddings = keep_embeddings
        self.galleries = None if galleries is None else GalleryFiles(galleries)

    def __call__(self, image, name: str, *, progress: Progress | None = None) -> SmearCells:
        """Segment, measure and (with a model) embed and classify the cells of ``image``."""
        labels = segment_cells(image, pixel_size_um=self.pixel_size_um)
        table = measure_cells(labels, image, pixel_size_um=self.pixel_size_um)
        cells = SmearCells(f"{name} cells", table, {"source_image": name, "pixel_size_um": self.pixel_size_um})
        if self.pixel_size_um is not None and len(table):  # a wrong size may have merged them into a few
            seen, expected = estimate_cell_diameter(image), RBC_DIAMETER_UM / self.pixel_size_um
            # (the estimator's own default says it found nothing to size)
            if seen != WORKING_DIAMETER_PX and not 1 / PIXEL_SIZE_DOUBT <= seen / expected <= PIXEL_SIZE_DOUBT:
                cells.metadata["cells_look_px"] = seen  # said by the caller: a wrong size cuts cells into pieces
        if self.embedder is None:
            return cells
        embedder, model, crops = self.embedder, self.model or self.embedder.model_id, self.crops()
        if table.empty:  # no cells: none to embed, and an empty record so the export can pool it
            run = EmbeddedCells(np.zeros(0, np.int64), np.zeros((0, embedder.dim), np.float32), None, embedder.model_id)
        else:
            run = run_steps(embedder.embed_steps(image, labels, **crops), progress)
        ids, vectors, digest, image_hash = run.ids, run.embeddings, labels_digest(labels), image_digest(image)
        store_run(cells, run, model=model, device=embedder.device, crops=crops,
                  fingerprint=fingerprint(image_hash, digest, model, **crops), labels_digest=digest,
                  image_hash=image_hash)
        if self.head is not None and not table.empty:
            rows = np.searchsorted(ids, table["label"].to_numpy())  # both ascending, the same cells
            proba = self.head.predict_proba(vectors[rows], measurements=table)
            predictions = prediction_table(self.head.classes, proba).set_axis(table.index)
            cells.features = pd.concat([table, predictions], axis=1)
            cells.metadata[PREDICTED_CLASSES] = list(self.head.classes)
            cells.metadata["unlike_head"] = float(self.head.beyond_reach(vectors[rows], measurements=table).mean())
            if self.galleries is not None:
                self._write_gallery(image, labels, cells)
        if not self.keep_embeddings:  # and no crop checks: they serve only to reuse the vectors
            cells.metadata[METADATA_KEY].update(embeddings=np.zeros((len(ids), 0), np.float32), crop_checks=None)
        return cells

    def crops(self) -> dict:
        """How the cells are cut for the model: as the head's were cut (the cells it learnt
        from), else as the model's training cells were, where its config says, else by default."""
        if self.head is not None and self.head.crops is not None:
            return dict(self.head.crops)
        return self.embedder.crops

    def settings(self) -> dict:
        """What every smear's results follow from besides its pixels (JSON-able): an earlier run's
        results for a smear stand for this run's only under equal settings."""
        model = None
        if self.embedder is not None:
            embedder = self.embedder
            model = {"named": str(self.model or embedder.model_id), "id": embedder.model_id,
                     "device": str(embedder.device), "dtype": str(embedder.dtype), "compiled": embedder.compiled,
                     "crops": self.crops()}  # a config's record edited leaves the weights' id as it was
        return {"code": code_digest(), "pixel_size_um": self.pixel_size_um, "model": model,
                "head": None if self.head is None else self.head.digest(), "keep_embeddings": self.keep_embeddings,
                "galleries": None if self.galleries is None else os.path.abspath(self.galleries.folder)}

    def reusable(self, cells: SmearCells) -> bool:
        """Whether ``cells``, analysed under equal :meth:`settings` by an earlier run, stand for
        this run's analysis of their smear: the class gallery drawn then (where galleries are drawn)
        is still there under the name this run gives it. Call it in the smears' order, as the
        analysis itself: it takes the gallery's name, so that no later smear's picture takes it."""
        if self.galleries is None or cells.features.empty:  # an empty smear draws none
            return True
        path = self.galleries.path(cells.metadata["source_image"])
        if "gallery_failed" in cells.metadata:  # a full disk, say: drawn again
            return False
        if "gallery" not in cells.metadata:  # no whole cell to show
            return True
        try:  # not replaced since (by another run's picture of this smear)
            drawn = cells.metadata["gallery"], cells.metadata.get("gallery_identity")
            return drawn == (str(path), file_identity(path))
        except OSError:
            return False

    def _write_gallery(self, image, labels: np.ndarray, cells: SmearCells) -> None:
        """Write the smear's class gallery; any failure costs the smear its picture only, said in
        ``metadata["gallery_failed"]``."""
        from .crops import black_and_white, colour_view

        path = self.galleries.path(cells.metadata["source_image"])
        try:
            if save_class_gallery(path, image, labels, cells.features, self.head.classes, self.head.colours,
                                  contrast_limits=black_and_white(colour_view(np.asarray(image))), crops=self.crops()):
                cells.metadata["gallery"] = str(path)
                cells.metadata["gallery_identity"] = file_identity(path)
        except GalleryError as error:
            cells.metadata["gallery_failed"] = f"{path}: {error}"


def file_identity(path: Path) -> list[int]:
    """A file's size and modification time: what a copy over it or an edit changes."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


@functools.cache
def code_digest() -> str:
    """A hash of this package's code and the versions of the libraries its results follow from:
    results of other code (an update between two runs) are not those of this code."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):  # not the widgets, which no batch runs
        inside = path.relative_to(package)
        if inside.parts[0] != "widgets" and not path.name.startswith(".") and path.is_file():  # no editor's lock
            digest.update(inside.as_posix().encode() + b"\0" + path.read_bytes())
    for library in ("numpy", "pandas", "scipy", "scikit-image", "edt", "imageio", "pillow", "tifffile", "torch",
                    "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    return digest.hexdigest()
