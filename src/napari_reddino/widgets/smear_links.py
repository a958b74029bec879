"""Which open image is a cells layer's smear.

A cells layer keeps the name of its smear (``source_image``, kept in step with renames), and,
since segmenting records them, the image layer it came from (napari's unique id) and a digest of
that image's pixels. Two cameras both write "Image001": the name alone would take a new image
opened under a closed one's name for the smear, and cut its pixels for the old cells. The very
layer counts as the smear whatever its pixels now hold (a background correction edits them in
place); another layer counts only with the same pixels (the file opened again), and the cells
then link to it.
"""

from collections.abc import Callable

from napari.layers import Image

from ..cell_embeddings import image_digest
from ..cell_table import SOURCE_DIGEST, image_name

SOURCE_LAYER = "source_image_layer"  # metadata: napari's unique id of the image layer they came from


def of_image(cells, image: Image, image_hash: str | Callable[[], str]) -> bool:
    """Whether ``cells`` were segmented from ``image``: that very layer, or one with the same pixels,
    which they link to from then on. Layers from other tools, or from before this was recorded,
    count as its own. ``image_hash`` is the image's :func:`image_digest`, or a function that gives
    it, asked only where it decides."""
    digest, layer_id = cells.metadata.get(SOURCE_DIGEST), str(image.unique_id)
    if digest is None or cells.metadata.get(SOURCE_LAYER) == layer_id:
        return True
    if digest != (image_hash() if callable(image_hash) else image_hash):
        return False
    cells.metadata = {**cells.metadata, SOURCE_LAYER: layer_id}  # assigned: a plugin's viewer hands out proxies
    return True


def smear_under(viewer, cells) -> Image | None:
    """The image layer of the smear under ``cells`` (see :func:`of_image`), if one is open and of
    the same size. Another layer of its name and size is hashed each time it is asked about
    (80 ms for 48 Mpx), which only a second camera's file of the same name costs."""
    name = image_name(cells)
    image = viewer.layers[name] if name in viewer.layers else None
    if not isinstance(image, Image) or level_0(image).shape[:2] != cells.data.shape:
        return None
    return image if of_image(cells, image, lambda: image_digest(level_0(image))) else None


def level_0(image: Image):
    """The full-resolution pixels of an image layer (the first level of a multiscale one)."""
    return image.data[0] if image.multiscale else image.data


def placement(layer) -> dict:
    """Where ``layer`` lies in the world (scale, translate, rotation, shear, affine and units), as
    keyword arguments of a new layer, so cells drawn over their smear sit on its pixels."""
    return {"scale": tuple(layer.scale), "translate": tuple(layer.translate), "rotate": layer.rotate,
            "shear": layer.shear, "affine": layer.affine.affine_matrix, "units": layer.units}
