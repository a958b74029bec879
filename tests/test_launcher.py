"""``python -m napari_reddino``: the smear it opens and the widgets it docks."""

from pathlib import Path

from npe2 import PluginManager

from napari_reddino.__main__ import PLUGIN, open_smear_and_widgets, parse_args

CHULA_26 = Path(__file__).parent / "data" / "chula_rbc12" / "26.jpg"


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


def test_opens_a_users_smear(make_napari_viewer):
    viewer = make_napari_viewer()

    open_smear_and_widgets(viewer, parse_args(["--image", str(CHULA_26)]))

    (layer,) = viewer.layers
    assert layer.name == "26"
    assert layer.rgb and layer.data.shape == (480, 640, 3)


def test_defaults_to_the_chula_sample():
    assert parse_args([]).sample == "chula"
