"""One picture per smear of the cells a head put in each class, to check a headless run by eye.

A row per class (the head's order; classes no whole cell got are left out): its name, how many
of the smear's whole cells it holds, and up to :data:`ROW_CELLS` of them picked at random
(the most certain first), cut and outlined as the Cell map's gallery shows them, in their
smear-scale windows so that sizes compare across the row. Cells cut by the image border are
left out, as the smear summary leaves them out.

No Qt, no napari.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .atomic_files import write_files_atomically
from .cell_thumbnails import THUMBNAIL_PX, cell_thumbnail
from .crop_windows import square_windows

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
    seed: int = 0,
) -> np.ndarray | None:
    """(height, width, 3) uint8, or None when no whole cell has a predicted class. ``table`` is
    the smear's cell table with ``predicted_class`` and ``prediction_probability``;
    ``colours`` maps a class to its ``#rrggbb`` outline."""
    if table.empty or "predicted_class" not in table:
        return None
    windows = square_windows(table[["bbox_min_x", "bbox_min_y", "bbox_max_x", "bbox_max_y"]].to_numpy(float))
    whole = ~table.get("touches_border", pd.Series(False, index=table.index)).to_numpy(bool)
    predicted = table["predicted_class"].astype(str).to_numpy()
    certainty = table["prediction_probability"].to_numpy(float)
    rng = np.random.default_rng(seed)
    captions, thumbnails = [], []
    for name in classes:
        members = np.flatnonzero(whole & (predicted == name))
        if not len(members):
            continue
        shown = rng.choice(members, min(ROW_CELLS, len(members)), replace=False)
        shown = shown[np.argsort(-certainty[shown], kind="stable")]
        outline = _rgb((colours or {}).get(name))
        thumbnails.append([cell_thumbnail(image, labels, int(table["label"].iloc[row]), windows[row],
                                          contrast_limits=contrast_limits, outline=outline) for row in shown])
        captions.append(f"{name}\n{len(members):,} of {int(whole.sum()):,} whole cells\n"
                        f"{len(members) / whole.sum():.1%}")
    if not captions:
        return None
    font = ImageFont.load_default(size=FONT_PX)
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)[2]
                 for text in captions)
    caption_px = max(MIN_CAPTION_PX, int(widest) + 4 * GAP_PX)
    return np.concatenate([_row(text, row, caption_px, font) for text, row in zip(captions, thumbnails)])


def write_class_gallery(path: str | os.PathLike, picture: np.ndarray) -> None:
    """``picture`` as a PNG at ``path``, written to a temporary file and renamed into place."""
    # zlib level 1: 108 ms for 13 classes, against 320 ms at PIL's default 6 for a file 13 % smaller
    write_files_atomically({path: lambda file: Image.fromarray(picture).save(file, format="PNG", compress_level=1)})


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
