"""The values that some options of ``reddino-train`` take, here without torch or the plugin's
segmentation, so that the command line (and its ``--help``) is built at once."""

from typing import Literal

Mode = Literal["cells", "patches"]  # prepare --mode: a crop per cell, or tiles of the smear
MODES: tuple[Mode, ...] = ("cells", "patches")
Format = Literal["crops", "points"]  # eval --format: crops in a folder per class, or smears with point labels
FORMATS: tuple[Format, ...] = ("crops", "points")
