"""follow_image_renames: a renamed image layer stays the smear of its cells and map colours."""

import numpy as np
from napari.components import ViewerModel

from napari_reddino.widgets.image_renames import follow_image_renames
from napari_reddino.widgets.smear_colours import MARK, own_cells
from napari_reddino.cell_embeddings import image_digest
from napari_reddino.widgets.smear_links import SOURCE_DIGEST, SOURCE_LAYER


def test_a_renamed_image_is_followed_by_its_cells_and_colours_and_no_other_layer():
    viewer = ViewerModel()
    follow_image_renames(viewer)
    follow_image_renames(viewer)  # a second widget asks again: still one link per image
    image = viewer.add_image(np.zeros((8, 8)), name="scan1")
    other = viewer.add_image(np.zeros((8, 8)), name="scan2")
    cells = viewer.add_labels(np.zeros((8, 8), np.int32), name="scan1 cells", metadata={"source_image": "scan1"})
    colours = viewer.add_labels(np.zeros((8, 8), np.uint16), name="scan1 cells map colours", metadata={MARK: "scan1"})
    others = viewer.add_labels(np.zeros((8, 8), np.int32), name="scan2 cells", metadata={"source_image": "scan2"})
    changes = []
    cells.events.metadata.connect(lambda event: changes.append(event))

    image.name = "P-042"
    assert cells.metadata == {"source_image": "P-042"} and colours.metadata == {MARK: "P-042"}
    assert others.metadata == {"source_image": "scan2"} and len(changes) == 1
    other.name = "P-042"  # taken: napari makes it unique, and its own cells follow that name
    assert other.name != "P-042" and others.metadata == {"source_image": other.name}
    assert cells.metadata == {"source_image": "P-042"}
    viewer.layers.remove(image)
    late = viewer.add_image(np.zeros((8, 8)), name="scan3")  # added after: followed too
    cells.metadata = {"source_image": "scan3"}
    late.name = "P-043"
    assert cells.metadata == {"source_image": "P-043"}


def test_the_cells_of_a_closed_image_stay_when_another_of_its_name_is_renamed():
    # Two cameras both write "Image001": the first one's cells keep naming it, so that its file,
    # opened again, is their smear; renaming the second camera's image leaves them be.
    viewer = ViewerModel()
    follow_image_renames(viewer)
    first = viewer.add_image(np.zeros((8, 8)), name="Image001")
    cells = viewer.add_labels(np.zeros((8, 8), np.int32), name="Image001 cells",
                              metadata={"source_image": "Image001", SOURCE_LAYER: str(first.unique_id)})
    viewer.layers.remove(first)
    second = viewer.add_image(np.ones((8, 8)), name="Image001")
    second.name = "camera B"
    assert cells.metadata["source_image"] == "Image001"
    first.name = "camera A"  # its own image, renamed (opened again, say): followed
    viewer.layers.append(first)
    first.name = "camera A2"
    assert cells.metadata["source_image"] == "camera A2"


def test_the_cells_of_a_smear_opened_again_follow_it_when_it_is_renamed_at_once():
    # Segmented, closed, opened again (a new layer, the same pixels) and renamed before any panel
    # looked at it: the cells follow the name; those of another camera's "Image001" do not.
    viewer = ViewerModel()
    follow_image_renames(viewer)
    pixels, others = np.arange(64.0).reshape(8, 8), np.ones((8, 8))
    first = viewer.add_image(pixels, name="Image001")
    link = {"source_image": "Image001", SOURCE_DIGEST: image_digest(pixels), SOURCE_LAYER: str(first.unique_id)}
    cells = viewer.add_labels(np.zeros((8, 8), np.int32), name="Image001 cells", metadata=link)
    viewer.layers.remove(first)
    stranger = viewer.add_image(others, name="Image001")
    stranger.name = "camera B"
    assert cells.metadata["source_image"] == "Image001"
    viewer.layers.remove(stranger)
    again = viewer.add_image(pixels.copy(), name="Image001")
    again.name = "P-7"
    assert cells.metadata["source_image"] == "P-7" and cells.metadata[SOURCE_LAYER] == str(again.unique_id)


def test_a_smear_s_own_cells_are_found_by_their_link_before_a_name_that_another_smear_s_cells_took():
    viewer = ViewerModel()
    linked = viewer.add_labels(np.zeros((8, 8), np.int32), name="renamed by hand", metadata={"source_image": "scan1"})
    viewer.add_labels(np.zeros((8, 8), np.int32), name="scan1 cells", metadata={"source_image": "scan2"})
    assert own_cells(viewer.layers, "scan1") is linked
    unlinked = viewer.add_labels(np.zeros((8, 8), np.int32), name="scan3 cells")  # painted by hand: by name
    assert own_cells(viewer.layers, "scan3") is unlinked and own_cells(viewer.layers, "scan2").name == "scan1 cells"
