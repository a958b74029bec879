"""``python -m napari_reddino``: napari with a sample smear (or yours) and every RedDino widget docked."""

import argparse
import sys
from pathlib import Path

import napari
from napari.utils.notifications import show_error
from npe2 import PluginManager

from .image_input import CMYK, GRAY_ALPHA, read_smear, stored_mode
from .sample_data import SAMPLES

PLUGIN = "napari-reddino"
TABBED = {"Embed cells"}  # a tab beside the widget before it: one after the other, and the map keeps its room


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m napari_reddino", description="Open napari with a blood smear and every RedDino widget docked.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sample", choices=tuple(SAMPLES), default="chula", help="bundled smear to open (default: chula)")
    source.add_argument("--image", metavar="PATH", nargs="+", help="open these smears (one layer each) instead of a sample")
    args = parser.parse_args(argv)
    missing = [path for path in args.image or () if not Path(path).expanduser().exists()]
    if missing:  # said before napari's window opens, not as napari's traceback
        parser.error(f"no such file: {', '.join(missing)}")
    if args.image:  # a path quoted with "~" in it reaches us unexpanded
        args.image = [str(Path(path).expanduser()) for path in args.image]
    return args


def open_smear_and_widgets(viewer: napari.Viewer, args: argparse.Namespace) -> None:
    """Open the smears (or the sample) and dock every widget. A smear napari cannot read is said
    in the window and on the terminal, and the others open: the lab still gets its window."""
    unread = []
    for path in args.image or ():
        try:
            if stored_mode(path) in CMYK + GRAY_ALPHA:  # napari's reader would show their stored planes
                viewer.add_image(read_smear(path), name=Path(path).stem)
            else:
                viewer.open(path, stack=False)
        except Exception as error:  # noqa: BLE001  (any reader's failure, each in its own words)
            unread.append(f"{path} ({type(error).__name__}: {error})")
    if not args.image:
        viewer.open_sample(PLUGIN, f"{args.sample}-smear")
    for widget in PluginManager.instance().get_manifest(PLUGIN).contributions.widgets:
        viewer.window.add_plugin_dock_widget(PLUGIN, widget.display_name, tabify=widget.display_name in TABBED)
    if unread:
        message = (f"napari could not open {'; '.join(unread)}. Smears open as PNG, JPEG or TIFF files: save "
                   f"{'it' if len(unread) == 1 else 'them'} as one of those (a slide scanner's file as a TIFF region).")
        print(message, file=sys.stderr)
        show_error(message)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    open_smear_and_widgets(napari.Viewer(), args)
    napari.run()


if __name__ == "__main__":
    main()
