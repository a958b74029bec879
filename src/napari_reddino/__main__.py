"""``python -m napari_reddino``: napari with a sample smear (or yours) and every RedDino widget docked."""

import argparse
from pathlib import Path

import napari
from npe2 import PluginManager

PLUGIN = "napari-reddino"
TABBED = {"Embed cells"}  # a tab beside the widget before it: one after the other, and the map keeps its room


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m napari_reddino", description="Open napari with a blood smear and every RedDino widget docked.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sample", choices=("chula", "aslan"), default="chula", help="bundled smear to open (default: chula)")
    source.add_argument("--image", metavar="PATH", nargs="+", help="open these smears (one layer each) instead of a sample")
    args = parser.parse_args(argv)
    missing = [path for path in args.image or () if not Path(path).expanduser().exists()]
    if missing:  # said before napari's window opens, not as napari's traceback
        parser.error(f"no such file: {', '.join(missing)}")
    return args


def open_smear_and_widgets(viewer: napari.Viewer, args: argparse.Namespace) -> None:
    if args.image:
        viewer.open(args.image, stack=False)
    else:
        viewer.open_sample(PLUGIN, f"{args.sample}-smear")
    for widget in PluginManager.instance().get_manifest(PLUGIN).contributions.widgets:
        viewer.window.add_plugin_dock_widget(PLUGIN, widget.display_name, tabify=widget.display_name in TABBED)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    open_smear_and_widgets(napari.Viewer(), args)
    napari.run()


if __name__ == "__main__":
    main()
