"""A cells layer knows its smear by the image layer's name (``metadata["source_image"]``, and a
map-colours layer by its own key), so a renamed image layer (a file name replaced by a patient
ID) renames that link in its layers.

Without this, the Cell map would not find a renamed smear's image to show a clicked cell in it
(and would show it over another smear's pixels), Embed cells would not find the image's own
cells layer, and an export would name the smear by its old name.
"""

import functools
import weakref

from napari.layers import Image

from ..cell_embeddings import image_digest
from .smear_links import SOURCE_DIGEST, SOURCE_LAYER, level_0, of_image

_FOLLOWED: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()  # by id: viewers equal by value


def follow_image_renames(viewer) -> None:
    """Keep ``source_image`` of ``viewer``'s layers in step with its image layers' names (once
    per viewer, however many widgets ask)."""
    from .smear_colours import MARK  # here: smear_colours imports job_widget, which imports this module

    links = ("source_image", MARK)  # a cells layer's smear; the smear a map-colours layer colours
    viewer = getattr(viewer, "__wrapped__", viewer)  # napari hands plugins a proxy, new objects on every access
    if _FOLLOWED.get(id(viewer)) is viewer:
        return
    _FOLLOWED[id(viewer)] = viewer
    layers = weakref.ref(viewer.layers)  # the connections must not keep a closed viewer alive
    names: "weakref.WeakKeyDictionary[Image, str]" = weakref.WeakKeyDictionary()

    def renamed(event) -> None:
        image = event.source
        old, names[image] = names.get(image), image.name
        digest = functools.cache(lambda: image_digest(level_0(image)))  # hashed only where it decides
        for layer in layers() or ():
            moved = {key: image.name for key in links if old is not None and layer.metadata.get(key) == old}
            if moved and layer is not image and _segmented_from(layer, image, digest):
                layer.metadata = {**layer.metadata, **moved}

    def watch(layer) -> None:
        if isinstance(layer, Image) and layer not in names:
            names[layer] = layer.name
            layer.events.name.connect(renamed)

    for layer in viewer.layers:
        watch(layer)
    viewer.layers.events.inserted.connect(lambda event: watch(event.value))


def _segmented_from(layer, image: Image, digest) -> bool:
    """Whether ``layer`` belongs to ``image``: it names no image layer, or this one, or one now
    closed whose pixels ``image`` holds (the file opened again, and renamed before any panel
    looked at it); not the cells of another image once open under that name (a second camera's
    file)."""
    known = layer.metadata.get(SOURCE_LAYER)
    if known is None or known == str(image.unique_id):
        return True
    return layer.metadata.get(SOURCE_DIGEST) is not None and of_image(layer, image, digest)
