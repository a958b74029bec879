"""Bundled real smears, offered in napari under File > Open Sample > RedDino."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import numpy as np


@dataclass(frozen=True)
class SampleSmear:
    """One bundled smear and what is known about it."""

    key: str
    filename: str
    pixel_size_um: float | None
    credit: str

    @property
    def path(self):
        return files("napari_reddino") / "data" / self.filename

    def read(self) -> np.ndarray:
        from skimage.io import imread

        image = imread(str(self.path))
        return image[..., :3] if image.ndim == 3 else image

    def layer_data(self) -> list[tuple]:
        metadata = {"source": self.credit, "license": "MIT", "pixel_size_um": self.pixel_size_um}
        kwargs = {"name": f"smear ({self.key})", "metadata": metadata, "rgb": True}
        if self.pixel_size_um is not None:
            kwargs["scale"] = (self.pixel_size_um, self.pixel_size_um)
        return [(self.read(), kwargs, "image")]


CHULA = SampleSmear(
    key="chula",
    filename="chula_rbc12/1.jpg",
    pixel_size_um=0.2,
    credit="Chula RBC-12 dataset, image 1 (Naruenatthanaset et al., arXiv:2012.01321; MIT licence)",
)
ASLAN = SampleSmear(
    key="aslan",
    filename="aslan_bcd/image-1.png",
    pixel_size_um=None,
    credit="Blood Cell Detection Dataset, image 1 (draaslan/blood-cell-detection-dataset; MIT licence)",
)
SAMPLES = {sample.key: sample for sample in (CHULA, ASLAN)}


def chula_smear() -> list[tuple]:
    return CHULA.layer_data()


def aslan_smear() -> list[tuple]:
    return ASLAN.layer_data()
