"""``python -m napari_reddino``: the smear it opens and the widgets it docks."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from npe2 import PluginManager
from PIL import Image
from qtpy.QtWidgets import QApplication

from napari_reddino.__main__ import PLUGIN, open_smear_and_widgets, parse_args
from napari_reddino.image_input import read_smear
from napari_reddino.widgets.job_widget import smear_pixels

CHULA_1, CHULA_26 = (Path(__file__).parent / "data" / "chula_rbc12" / f"{n}.jpg" for n in (1, 26))


def declared_widgets() -> set[str]:
    manifest = PluginManager.instance().get_manifest(PLUGIN)
    return {f"{widget.display_name} ({PLUGIN})" for widget in manifest.contributions.widgets}


def test_opens_the_chosen_sample_and_docks_every_widget(make_napari_viewer):
    viewer = make_napari_viewer()

    open_smear_and_widgets(viewer, parse_args(["--sample", "aslan"]))

    assert [layer.name for layer in viewer.layers] == ["smear (aslan)"]
    assert viewer.layers[0].rgb
    assert "Segment cells (napari-reddino)" in declared_widgets()
    assert declared_widgets() <= set(viewer.window.dock_widgets)


def test_segment_and_embed_share_a_tabbed_dock_so_the_window_fits_a_laptop(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    open_smear_and_widgets(viewer, parse_args([]))
    QApplication.processEvents()  # Qt applies a tabbing on its next pass
    window, docks = viewer.window._qt_window, viewer.window.dock_widgets
    segment, embed, cell_map = (docks[f"{name} ({PLUGIN})"].parent() for name in ("Segment cells", "Embed cells",
                                                                                    "Cell map"))
    assert window.tabifiedDockWidgets(segment) == [embed]
    assert cell_map not in window.tabifiedDockWidgets(embed)  # the map keeps a place of its own
    # 764 px here (stacked, the three panels asked for 1,037 px): a 1366 x 768 laptop screen
    assert window.minimumSizeHint().height() <= 800


def test_opens_a_users_smears_one_layer_each(make_napari_viewer):
    viewer = make_napari_viewer()

    open_smear_and_widgets(viewer, parse_args(["--image", str(CHULA_26), str(CHULA_1)]))

    assert [layer.name for layer in viewer.layers] == ["26", "1"]
    assert all(layer.rgb and layer.data.shape == (480, 640, 3) for layer in viewer.layers)


def test_a_cmyk_jpeg_and_a_gray_png_with_alpha_open_as_the_smears_they_are(make_napari_viewer, tmp_path):
    # napari's reader shows a CMYK file's inks as RGB and alpha, and gray with alpha as two planes
    with Image.open(CHULA_1) as photo:
        photo.convert("CMYK").save(tmp_path / "print.jpg")
        photo.convert("LA").save(tmp_path / "gray.png")
    viewer = make_napari_viewer()
    open_smear_and_widgets(viewer, parse_args(["--image", str(tmp_path / "print.jpg"), str(tmp_path / "gray.png"),
                                               str(CHULA_26)]))
    cmyk, gray, plain = viewer.layers
    assert (cmyk.name, gray.name, plain.name) == ("print", "gray", "26")
    assert cmyk.rgb and smear_pixels(cmyk).shape == (480, 640, 3)
    np.testing.assert_array_equal(cmyk.data, read_smear(tmp_path / "print.jpg"))
    assert not gray.rgb and smear_pixels(gray).shape == (480, 640)
    np.testing.assert_array_equal(gray.data, np.asarray(Image.open(CHULA_1).convert("L")))
    assert plain.rgb and plain.data.shape == (480, 640, 3)


def test_smears_napari_cannot_read_are_said_and_the_others_open_with_the_widgets(make_napari_viewer, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(CHULA_1, tmp_path / "my smear.jpg")
    (tmp_path / "cut.jpg").write_bytes(CHULA_26.read_bytes()[:2000])  # a copy that stopped half-way
    (tmp_path / "slide.svs").write_bytes(b"II*\x00not a tiff a reader can use")
    viewer = make_napari_viewer()
    shown = len(notification_manager.records)
    open_smear_and_widgets(viewer, parse_args(["--image", "~/my smear.jpg", str(tmp_path / "cut.jpg"),
                                               str(tmp_path / "slide.svs")]))
    assert [layer.name for layer in viewer.layers] == ["my smear"]
    assert declared_widgets() <= set(viewer.window.dock_widgets)
    (said,) = [record.message for record in notification_manager.records[shown:]]
    assert said.startswith(f"napari could not open {tmp_path / 'cut.jpg'} (") and f"; {tmp_path / 'slide.svs'} (" in said
    assert said.endswith("Smears open as PNG, JPEG or TIFF files: save them as one of those (a slide scanner's file "
                         "as a TIFF region).")
    assert said in capsys.readouterr().err


def test_a_smear_that_does_not_exist_is_refused_before_napari_opens(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--image", str(CHULA_1), str(tmp_path / "missing.png")])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: no such file: {tmp_path / 'missing.png'}\n")


def test_defaults_to_the_chula_sample():
    assert parse_args([]).sample == "chula"


@pytest.mark.parametrize("first", ["", "import napari_reddino.widgets.segment_widget\n", "import torch\n",
                                   "import napari_reddino.widgets.segment_widget\nimport torch\n"],
                         ids=["widgets-imported-by-napari", "widgets-imported-before-the-window",
                              "torch-imported-before-the-window", "both-imported-before-the-window"])
def test_docking_the_embed_widget_after_opengl_is_up_does_not_crash(first):
    """A fresh napari with a visible (software-GL) window, then the torch-importing widget.

    Mesa's llvmpipe puts libLLVM in the process; without the triton guard, torchvision's import
    of triton loads a second LLVM and the process dies with a segmentation fault. Also when a
    script imported the widgets, or torch, before the window (and its OpenGL) was there.
    """
    script = (
        first +
        "import napari\n"
        "viewer = napari.Viewer(show=True)\n"
        "viewer.open_sample('napari-reddino', 'chula-smear')\n"
        "import importlib.util\n"
        "importlib.util.find_spec('triton')\n"  # as torch.cuda's set-up asks: a spec or None, never an error
        "viewer.window.add_plugin_dock_widget('napari-reddino', 'Embed cells')\n"
        "import torch, sys\n"
        "print('docked', torch.ones(2).sum().item(), sys.modules.get('triton', 'loaded') is None)\n"
        "viewer.close()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "docked 2.0 True" in done.stdout  # torch runs, without triton
