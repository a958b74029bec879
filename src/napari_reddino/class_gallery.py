"""One picture per smear of the cells in each class, to check a run (a headless one above all) by eye.

A cell's class is the one the smear summary counts it in: its manual label, else the head's
prediction. A row per class (in the order given; classes no whole cell has are left out): its
name, how many of the smear's whole cells it holds (and their share with its 95 % interval,
once every whole cell has a class), and up to :data:`ROW_CELLS` of them picked at random, the labelled ones and then the
most certain first, cut and outlined as the Cell map's gallery shows them, in their
smear-scale windows so that sizes compare across the row. Cells cut by the image border are
left out, as the smear summary leaves them out.

No Qt, no napari.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .atomic_files import write_files_atomically
from .cell_table import class_names, whole_cells
from .cell_thumbnails import THUMBNAIL_PX, cell_thumbnail
from .crop_windows import chosen_crops, square_windows
from .smear_summary import class_of_each_cell, share_interval
from .wording import counted

ROW_CELLS = 10
MIN_CAPTION_PX = 160  # the class name and counts, left of each row: wider when they need it
GAP_PX = 4
FONT_PX = 15
BACKGROUND = (38, 41, 48)  # napari's dark theme
TEXT = (230, 230, 230)
NO_COLOUR = (255, 255, 255)


def class_gallery(
    image: np.ndarray,
    labels: np.ndarray,
    table: pd.DataFrame,
    classes: Sequence[str],
    colours: Mapping[str, str] | None = None,
    *,
    contrast_limits: Sequence[float] = (0, 255),
    crops: Mapping | None = None,
    seed: int = 0,
) -> np.ndarray | None:
    """(height, width, 3) uint8, or None when no whole cell has a class. ``table`` is the
    smear's cell table (with ``manual_label`` and/or ``predicted_class`` and
    ``prediction_probability``); ``colours`` maps a class to its ``#rrggbb`` outline; ``crops``
    (the scale and margin the cells were embedded with; the defaults where None) sizes each
    cell's window as the model's."""
    if table.empty:
        return None
    crops = chosen_crops(trained=crops)
    windows = square_windows(table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float),
                             crops["margin"], crops["scale"])
    whole = whole_cells(table)
    names = class_of_each_cell(table)
    labelled = class_names(table, "manual_label") != ""
    probability = pd.to_numeric(table.get("prediction_probability", pd.Series(np.nan, index=table.index)),
                                errors="coerce").to_numpy(float)
    certainty = np.where(labelled, np.inf, np.nan_to_num(probability, nan=0.0))
    every_cell_has_one = bool((names[whole] != "").all())
    rng = np.random.default_rng(seed)
    captions, thumbnails = [], []
    for name in classes:
        members = np.flatnonzero(whole & (names == name))
        if not len(members):
            continue
        shown = rng.choice(members, min(ROW_CELLS, len(members)), replace=False)
        shown = shown[np.argsort(-certainty[shown], kind="stable")]
        outline = _rgb((colours or {}).get(name))
        thumbnails.append([cell_thumbnail(image, labels, int(table["label"].iloc[row]), windows[row],
                                          contrast_limits=contrast_limits, outline=outline) for row in shown])
        captions.append(row_caption(name, len(members), int(whole.sum()), with_share=every_cell_has_one))
    if not captions:
        return None
    font = ImageFont.load_default(size=FONT_PX)
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)[2]
                 for text in captions)
    caption_px = max(MIN_CAPTION_PX, int(widest) + 4 * GAP_PX)
    return np.concatenate([_row(text, row, caption_px, font) for text, row in zip(captions, thumbnails)])


def row_caption(name: str, count: int, whole: int, *, with_share: bool) -> str:
    """A row's caption: the class, its count among the smear's whole cells and, ``with_share``,
    their share with its 95 % interval from counting alone (:func:`share_interval`)."""
    caption = f"{name}\n{count:,} of {whole:,} whole cells"
    if not with_share:
        return caption
    low, high = share_interval(count, whole)
    return f"{caption}\n{count / whole:.1%} (95% CI {low:.1%}-{high:.1%})"


class GalleryError(Exception):
    """A gallery that could not be drawn or written; the message says why, in words."""


def save_class_gallery(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, table: pd.DataFrame,
                       classes: Sequence[str], colours: Mapping[str, str] | None = None, *,
                       contrast_limits: Sequence[float] = (0, 255), crops: Mapping | None = None) -> bool:
    """Draw :func:`class_gallery` into the PNG ``path`` (its folder made, the file written to a
    temporary one and renamed into place); False when no whole cell has a class. Any failure
    raises :class:`GalleryError`, so that a caller keeping a smear's results whatever becomes of
    its picture catches that alone."""
    try:
        picture = class_gallery(image, labels, table, classes, colours, contrast_limits=contrast_limits, crops=crops)
        if picture is None:
            return False
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # zlib level 1: 108 ms for 13 classes, against 320 ms at PIL's default 6 for a file 13 % smaller
        write_files_atomically({path: lambda file: Image.fromarray(picture).save(file, format="PNG", compress_level=1)})
        return True
    except Exception as error:  # noqa: BLE001 (the caller decides what a missing picture costs)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
        raise GalleryError(reason) from error


class GalleryFiles:
    """A file in ``folder`` per smear: :func:`gallery_file_name`, with `` (2)``, `` (3)`` ... for a
    smear whose name flattens to a file name another smear has (``a/b`` and ``a_b``, or ``A`` and
    ``a`` on a Mac or Windows disk), so that no picture replaces another."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._files: dict[str, str] = {}
        self._taken: set[str] = set()

    def path(self, smear: str) -> Path:
        if smear not in self._files:
            name = stem = gallery_file_name(smear).removesuffix(".png")
            number = 2
            while name.casefold() in self._taken:
                name, number = f"{stem} ({number})", number + 1
            self._taken.add(name.casefold())
            self._files[smear] = f"{name}.png"
        return self.folder / self._files[smear]


def gallery_file_name(smear: str) -> str:
    """``<smear>.png`` with anything but letters, digits, spaces, ``.``, ``-`` and ``_`` made ``_``: a
    smear named with its folders (``day2/26``, ``../a``) stays one file inside the folder."""
    return re.sub(r"[^\w .-]", "_", smear).lstrip(". ") + ".png"


def pictures_in(folder: str | os.PathLike) -> list[Path]:
    """The PNG files in ``folder`` (none if it does not exist; subfolders are not ours)."""
    folder = Path(folder)
    return sorted(path for path in folder.glob("*.png") if path.is_file()) if folder.is_dir() else []


def remove_pictures(pictures: Sequence[Path], whose: str) -> str:
    """Remove ``pictures`` (``whose``: "the earlier run's"), and their folder if that leaves it
    empty, and say so, for a status line after "; "."""
    kept = []
    for picture in pictures:
        try:
            picture.unlink()
        except OSError:
            kept.append(picture)
    for folder in {picture.parent for picture in pictures}:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    removed = len(pictures) - len(kept)
    said = f"; removed {whose} {counted(removed, 'picture')}" if removed else ""
    return said + (f"; could not remove {', '.join(map(str, kept))}" if kept else "")


def _row(caption: str, thumbnails: list[np.ndarray], caption_px: int, font) -> np.ndarray:
    row = Image.new("RGB", (caption_px + ROW_CELLS * (THUMBNAIL_PX + GAP_PX) + GAP_PX, THUMBNAIL_PX + 2 * GAP_PX),
                    BACKGROUND)
    ImageDraw.Draw(row).multiline_text((2 * GAP_PX, 2 * GAP_PX), caption, fill=TEXT, font=font, spacing=6)
    for place, thumbnail in enumerate(thumbnails):
        row.paste(Image.fromarray(thumbnail), (caption_px + place * (THUMBNAIL_PX + GAP_PX), GAP_PX))
    return np.asarray(row)


def _rgb(colour: str | None) -> tuple[int, int, int]:
    """``#rrggbb`` as RGB; white for no colour, or one that is not of that form (a hand-edited head)."""
    digits = (colour or "").lstrip("#")[:6]
    try:
        return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4)) if len(digits) == 6 else NO_COLOUR
    except ValueError:
        return NO_COLOUR
