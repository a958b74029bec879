"""The Cell map's colours over the smears: one extra Labels layer per mapped cells layer.

Each "<cells> map colours" layer holds every cell's place in the map as uint16 (see
:meth:`~napari_reddino.cell_map.PooledCells.rank_image`): napari draws uint16 labels through a
GPU lookup table, so recolouring 50,000 cells is one table upload, not a pass over the smear.
The same layers answer which cell a click on a smear hit.
"""

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import CyclicLabelColormap

from ..cell_map import PooledCells, rank_lut
from .job_widget import place_above
from .smear_links import level_0, placement, smear_under

MARK = "reddino_map_colours"  # metadata key of a colour layer (it holds map ranks, not cells): see coloured_smear


def coloured_smear(layer) -> str | None:
    """The smear whose cells ``layer`` colours (the image layer's name, or the cells layer's for
    cells from no known image), or None if it is no colour layer. The smear, not the cells
    layer: a cells layer can be renamed while its map is shown."""
    return getattr(layer, "metadata", {}).get(MARK)


def is_map_colours(layer) -> bool:
    return bool(coloured_smear(layer))


class SmearColours:
    """The colour layers of one map's smears, added to ``viewer`` and removed with :meth:`remove`."""

    def __init__(self, viewer, pool: PooledCells):
        self._viewer, self._pool = viewer, pool
        self.layers: list[Labels] = []
        for position, cells in enumerate(pool.layers):
            overlay = viewer.add_labels(
                pool.rank_image(position), name=f"{cells.name} map colours",
                **placement(cells), opacity=1.0, visible=cells.visible,
                metadata={MARK: cells.metadata.get("source_image") or cells.name},
            )
            overlay.editable = False
            place_above(viewer.layers, overlay, cells)
            self.layers.append(overlay)

    def paint(self, fill: np.ndarray) -> None:
        """Colour every cell: ``fill`` is (n_points, 4) RGBA in the map's point order."""
        for position, overlay in enumerate(self.layers):
            overlay.colormap = CyclicLabelColormap(colors=rank_lut(fill[self._pool.span(position)]))

    def cell_at(self, world_position, *, hidden: bool = False) -> tuple[Labels, int] | None:
        """The cells layer and label id of the cell shown at ``world_position`` in the top one of
        the visible smears (of all smears with ``hidden``) that lie there, or None. The top smear's
        background answers None while its image is shown: that covers the smears under it. Ask
        :meth:`unmapped_on_top` first: a smear not on the map covers them too."""
        layers = self._viewer.layers
        shown = [p for p, overlay in enumerate(self.layers)
                 if overlay in layers and (hidden or overlay.visible and self._pool.layers[p].visible)]
        for position in sorted(shown, key=lambda p: -layers.index(self.layers[p])):
            rank = _value_at(self.layers[position], world_position)
            if rank == 0:  # this smear's background: over any smear below, unless its image is hidden
                image = smear_under(self._viewer, self._pool.layers[position])
                if image is not None and image.visible:
                    return None
                continue
            if rank is not None:
                return self._pool.layers[position], int(self._pool.label_ids[self._pool.offsets[position] + rank - 1])
        return None

    def unmapped_on_top(self, world_position) -> Image | Labels | None:
        """The smear layer (image or cells) drawn on top at ``world_position`` where it is not on
        the map: napari opens a new smear over the mapped ones, and a click on its cells must not
        pick the hidden cell of a mapped smear under it."""
        layers = self._viewer.layers
        # by name, unique in a viewer: a plugin's viewer hands out proxies of its layers, not the layers
        mapped = {layer.name for layer in (*self.layers, *self._pool.layers)}
        mapped |= {image.name for cells in self._pool.layers if (image := smear_under(self._viewer, cells)) is not None}
        for layer in reversed(layers):
            if layer.visible and _is_smear_layer(layer) and _pixel_at(layer, world_position) is not None:
                return None if layer.name in mapped else layer
        return None

    def uncover(self, position: int) -> list[str]:
        """Show smear ``position`` (its image, cells and colours) and hide the smears drawn over it:
        napari opens every smear at the origin, so the second one covers the first, and a cell
        centred in the first would show the second's pixels. Returns the names of the layers hidden."""
        cells = self._pool.layers[position]
        layers = self._viewer.layers
        own = [layer for layer in (smear_under(self._viewer, cells), cells, self.layers[position]) if layer is not None and layer in layers]
        box = np.stack([layer.extent.world for layer in own])
        low, high = box[:, 0].min(axis=0), box[:, 1].max(axis=0)
        hidden = []
        for layer in list(layers)[min(map(layers.index, own)) + 1:]:
            if layer in own or not layer.visible or not _is_smear_layer(layer) or layer.ndim != len(low):
                continue
            extent = layer.extent.world
            if np.all(extent[0] < high) and np.all(low < extent[1]):  # it covers part of this smear
                layer.visible = False
                hidden.append(layer.name)
        for layer in own:
            if not layer.visible:  # napari redraws a layer on every assignment, even of True
                layer.visible = True
        return hidden

    def remove(self) -> None:
        for overlay in self.layers:
            if overlay in self._viewer.layers:
                self._viewer.layers.remove(overlay)
        self.layers = []


def _value_at(labels: Labels, world_position) -> int | None:
    """The label at ``world_position``, None outside the layer; also of a hidden layer, which
    napari's ``get_value`` answers with None."""
    pixel = _pixel_at(labels, world_position)
    return None if pixel is None else int(labels.data[pixel])


def _pixel_at(layer, world_position) -> tuple[int, ...] | None:
    """The index of the pixel of ``layer`` (an image's first level, less its colour axis) at
    ``world_position``; None outside the layer."""
    shape = (level_0(layer) if isinstance(layer, Image) else layer.data).shape[:layer.ndim]
    index = np.round(layer.world_to_data(world_position)).astype(int)
    return tuple(index) if np.all(index >= 0) and np.all(index < shape) else None


def _is_smear_layer(layer) -> bool:
    """A smear's image, cells or map colours (not, say, a user's points or shapes)."""
    return isinstance(layer, Image) or (isinstance(layer, Labels) and (
        is_map_colours(layer) or "label" in layer.features))


def cells_layers(viewer) -> list[Labels]:
    """Every Labels layer with a cell table (not the map's colour layers), embedded or not."""
    return [layer for layer in viewer.layers
            if isinstance(layer, Labels) and not is_map_colours(layer) and "label" in layer.features]


def own_cells(layers, image_name: str) -> Labels | None:
    """The smear's topmost cells layer, its newest segmentation (a smear segmented again while its
    cells carry labels keeps the labelled layer below the new one), found by the link its cells
    layers keep to it (``source_image``, which follows a renamed smear), else, for cells layers
    with no such link, by name."""
    cells = [layer for layer in reversed(layers) if isinstance(layer, Labels) and not is_map_colours(layer)]
    linked = next((layer for layer in cells if layer.metadata.get("source_image") == image_name), None)
    return linked or next((layer for layer in cells if not layer.metadata.get("source_image")
                           and layer.name == f"{image_name} cells"), None)
