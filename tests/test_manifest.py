"""The npe2 manifest: valid in this install and in a built wheel; its sample data are real smears."""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManager, PluginManifest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-reddino"
NOT_BUILT = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks", "docs")


def python(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_manifest_is_valid_in_this_install():
    assert "valid" in python("-m", "npe2", "validate", PLUGIN).stdout


def test_built_wheel_ships_a_valid_manifest(tmp_path):
    # Build from a copy of the checkout: an in-tree build would write build/ into the repository,
    # where a concurrent test run could trip over it. symlinks=True keeps the root napari.yaml a
    # link to the package's, as in the repository (the package's is the file: a Windows checkout
    # turns links into text).
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_BUILT))
    pip = ("-m", "pip", "--disable-pip-version-check")
    python(*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "wheel", source)
    (wheel,) = (tmp_path / "wheel").glob("napari_reddino-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("napari_reddino/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        sections = configparser.ConfigParser()
        sections.read_string(archive.read(entry_points).decode())
    assert sections["napari.manifest"][PLUGIN] == "napari_reddino:napari.yaml"
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    modules = {command.python_name.split(":")[0] for command in manifest.contributions.commands}
    assert {module.replace(".", "/") + ".py" for module in modules} <= set(archive.namelist())

    installed = tmp_path / "installed"
    python(*pip, "install", "--no-deps", "--no-index", "-q", "--target", installed, wheel)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(installed), os.environ.get("PYTHONPATH")]))}
    found = python(
        "-c",
        "import importlib.metadata, napari_reddino; "
        f"print(napari_reddino.__file__); print(importlib.metadata.distribution({PLUGIN!r}).locate_file(''))",
        env=env,
    ).stdout.split()
    assert all(Path(path).resolve().is_relative_to(installed.resolve()) for path in found), found
    assert "valid" in python("-m", "npe2", "validate", PLUGIN, env=env).stdout


@pytest.mark.parametrize(
    ("key", "shape", "pixel_size_um"), [("chula-smear", (480, 640, 3), 0.2), ("aslan-smear", (256, 256, 3), None)]
)
def test_sample_data_are_rgb_smears_with_their_metadata(key, shape, pixel_size_um):
    plugins = PluginManager()
    plugins.register(PluginManifest.from_distribution(PLUGIN))
    plugins.activate(PLUGIN)
    (sample,) = [s for s in plugins.get_manifest(PLUGIN).contributions.sample_data if s.key == key]

    ((data, kwargs, layer_type),) = sample.open(_registry=plugins.commands)

    assert layer_type == "image"
    assert data.dtype == np.uint8 and data.shape == shape and kwargs["rgb"]
    assert data.std() > 10  # a photograph, not a blank
    assert kwargs["metadata"]["pixel_size_um"] == pixel_size_um
    assert kwargs["metadata"]["license"] == "MIT" and kwargs["metadata"]["source"]
    assert kwargs.get("scale") == (None if pixel_size_um is None else (pixel_size_um, pixel_size_um))
