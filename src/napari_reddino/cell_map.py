"""The pooled cell map: every embedded cell of one or more smears as one point, and back.

A :class:`PooledCells` lists the cells of several cells layers in one order (point ``i`` is
cell ``label_ids[i]`` of ``layers[layer_index[i]]``), so a selection made on the map maps
back to the right smear and a click on a smear finds its point. Colours are computed here
as arrays; the widget only hands them to napari.

No Qt, no napari: a "layer" is anything with ``name``, ``data``, ``features`` and
``metadata`` (a napari Labels layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from skimage.measure import points_in_poly

from .cell_embeddings import crop_settings, crops_in_words, embeddings_of, repainted_since_embedded, stored_fingerprint
from .cell_table import SOURCE_DIGEST, image_name
from .model_ids import readable_ids, same_model

LUT_SIZE = 2**16  # napari draws uint16 labels through a 65,536-colour lookup table on the GPU
UNLABELLED = ""
MANUAL, PREDICTED = "manual label", "predicted class"  # the two class columns, as Colour by names them
MUTED = np.array([0.6, 0.6, 0.6, 0.35], dtype=np.float32)  # cells without a class
DIM_FACTOR = 0.2  # alpha of the cells outside a selection, relative to their own


class PoolingError(ValueError):
    """The chosen cells layers cannot share one map (no embeddings, or different models or crops)."""


@dataclass(frozen=True)
class PooledCells:
    """Point ``i`` is cell ``label_ids[i]`` of ``layers[layer_index[i]]``; a layer's points are contiguous."""

    layers: tuple
    offsets: np.ndarray  # (len(layers) + 1,): layer p owns points offsets[p]:offsets[p + 1]
    label_ids: np.ndarray  # (n,) int64, ascending within each layer
    embeddings: np.ndarray  # (n, dim) float32
    model_id: str
    fingerprints: tuple  # each layer's stored_fingerprint when pooled: a re-embedding changes it
    crops: dict | None = None  # the crop settings of every layer's embeddings, where recorded

    @classmethod
    def from_layers(cls, layers: Sequence) -> PooledCells:
        """Pool the embedded cells of ``layers``; all must be embedded with the same model and crops."""
        records = [(layer, embeddings_of(layer)) for layer in layers]
        missing = [layer.name for layer, record in records if record is None]
        if missing or not records:
            raise PoolingError(
                f"No embeddings on {', '.join(map(repr, missing)) or 'any cells layer'}: "
                "run Plugins > RedDino > Embed cells first."
            )
        models = {record[2] for _, record in records}
        if not all(same_model(records[0][1][2], model) for model in models):
            raise PoolingError(
                f"The cells layers were embedded with different models ({', '.join(readable_ids(sorted(models)))}); "
                "embed them all with one model to compare them in one map."
            )
        crops = [(layer.name, settings) for layer, _ in records if (settings := crop_settings(layer)) is not None]
        if len({tuple(settings.values()) for _, settings in crops}) > 1:
            raise PoolingError(
                "The cells layers were embedded from differently cut crops ("
                + "; ".join(f"{name!r}: {crops_in_words(settings)}" for name, settings in crops)
                + "), which a map would tell apart before their shapes: embed them all with one Crop, Scale and "
                "Margin to compare them in one map."
            )
        repainted = [layer.name for layer, _ in records if repainted_since_embedded(layer)]
        if repainted:
            raise PoolingError(
                f"The cells of {', '.join(map(repr, repainted))} were painted since they were embedded, so some "
                "embeddings describe cells that are gone: embed them again with Plugins > RedDino > Embed cells."
            )
        unmeasured = [layer.name for layer, (ids, *_) in records
                      if "label" not in layer.features or not np.isin(ids, layer.features["label"]).all()]
        if unmeasured:
            raise PoolingError(
                f"Some embedded cells of {', '.join(map(repr, unmeasured))} have no row in the layer's cell table "
                "(new or edited cells?): segment the smear again with Plugins > RedDino > Segment cells "
                "(or Embed cells with 'segment first'), then embed it."
            )
        crowded = [layer.name for layer, record in records if len(record[0]) >= LUT_SIZE]
        if crowded:
            raise PoolingError(
                f"{', '.join(map(repr, crowded))} holds more than {LUT_SIZE - 1:,} cells, more than one "
                "map layer can colour; crop the smear into parts and embed each."
            )
        counts = [len(record[0]) for _, record in records]
        return cls(
            layers=tuple(layer for layer, _ in records),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            label_ids=np.concatenate([record[0] for _, record in records]).astype(np.int64),
            embeddings=np.concatenate([record[1] for _, record in records]).astype(np.float32, copy=False),
            model_id=records[0][1][2],
            fingerprints=tuple(stored_fingerprint(layer) for layer, _ in records),
            crops=crops[0][1] if crops else None,
        )

    def __len__(self) -> int:
        return len(self.label_ids)

    @property
    def layer_index(self) -> np.ndarray:
        """(n,) which of ``layers`` each point comes from."""
        return np.repeat(np.arange(len(self.layers)), np.diff(self.offsets))

    def smears_mapped_twice(self) -> dict[str, list[str]]:
        """The smears with more than one cells layer in the pool (segmented again beside the
        labelled layer, say), each with its layers' names: their cells are counted twice. Layers
        of two smears of one name (two cameras' "Image001") are told apart by their pixels' digest."""
        layers_of: dict[tuple[str, str | None], list[str]] = {}
        for layer in self.layers:
            layers_of.setdefault((image_name(layer), layer.metadata.get(SOURCE_DIGEST)), []).append(str(layer.name))
        return {smear: names for (smear, _), names in layers_of.items() if len(names) > 1}

    def span(self, position: int) -> slice:
        """The points of ``layers[position]``."""
        return slice(int(self.offsets[position]), int(self.offsets[position + 1]))

    def points_of(self, position: int, label_ids) -> np.ndarray:
        """Point indices of the given cells of ``layers[position]``; cells without a point are skipped."""
        ids = self.label_ids[self.span(position)]
        wanted = np.asarray(label_ids, dtype=np.int64).ravel()
        found = np.clip(np.searchsorted(ids, wanted), 0, max(len(ids) - 1, 0))
        hit = (ids[found] == wanted) if len(ids) else np.zeros(len(wanted), dtype=bool)
        return self.offsets[position] + found[hit]

    def rank_image(self, position: int) -> np.ndarray:
        """uint16 image of ``layers[position]``: 1 + the cell's place among the layer's points, 0 elsewhere.

        napari colours uint16 labels through a GPU lookup table, so recolouring every cell is one
        65,536-row table upload however large the smear; label ids themselves may be any int.
        """
        ids = self.label_ids[self.span(position)]
        labels = np.asarray(self.layers[position].data)
        ranks = np.zeros(int(max(labels.max(initial=0), ids.max(initial=0))) + 1, dtype=np.uint16)
        ranks[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
        ranks[0] = 0
        return ranks[np.clip(labels, 0, None)]

    def column(self, name: str, default=np.nan) -> np.ndarray:
        """One feature column for every point, in point order (``default`` where a layer lacks it).
        With a text ``default`` the column is a class column: stripped text, ``default`` where blank."""
        parts = []
        for position, layer in enumerate(self.layers):
            ids = self.label_ids[self.span(position)]
            table = layer.features
            if name in table and "label" in table:
                values = table.set_index("label")[name]
                if isinstance(values.dtype, pd.CategoricalDtype):  # its fillna takes only its own categories
                    values = values.astype(object)
                values = values.reindex(ids).fillna(default)
                if isinstance(default, str):
                    values = values.astype(str).str.strip().replace("", default)
                parts.append(values.to_numpy())
            else:
                parts.append(np.full(len(ids), default, dtype=object if isinstance(default, str) else float))
        return np.concatenate(parts) if parts else np.empty(0)

    def table(self) -> pd.DataFrame:
        """Every point's row of its layer's features, in point order, with the layer's place in the
        pool as ``layer`` (through which the head compares each cell's size with its own layer's
        cells; two layers can share a name)."""
        return pd.concat(
            [layer.features.set_index("label").reindex(self.label_ids[self.span(p)]).reset_index()
             .assign(layer=p) for p, layer in enumerate(self.layers)],
            ignore_index=True,
        )

    def write(self, name: str, values, points=None, *, empty="") -> None:
        """Set feature ``name`` of the cells at ``points`` (all by default) on their own layers.

        A layer without the column gets it, filled with ``empty`` for its other cells.
        """
        self.write_columns({name: values}, points, empty=empty)

    def write_columns(self, columns: dict, points=None, *, empty="") -> None:
        """:meth:`write` for several columns of one kind at once (text when ``empty`` is a
        string, numbers otherwise): each layer's table is copied and replaced once, since each
        replacement re-validates the table and repaints in napari."""
        points = np.arange(len(self)) if points is None else np.asarray(points, dtype=np.int64)
        dtype = object if isinstance(empty, str) else float
        columns = {name: np.broadcast_to(np.asarray(v, dtype=dtype), points.shape) for name, v in columns.items()}
        for position, layer in enumerate(self.layers):
            span = self.span(position)
            inside = (points >= span.start) & (points < span.stop)
            if not inside.any() and all(name in layer.features for name in columns):
                continue
            table = layer.features.copy()
            rows = pd.Index(table["label"]).get_indexer(self.label_ids[points[inside]])
            for name, values in columns.items():
                if name not in table:
                    table[name] = empty
                elif dtype is object and table[name].dtype != object:
                    table[name] = table[name].astype(object)  # all-empty read back as numbers, or categories
                table.iloc[rows, table.columns.get_loc(name)] = values[inside]
            layer.features = table


def points_in_polygon(coords: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Boolean mask of the (n, 2) ``coords`` inside the (m, 2) ``polygon`` (same axis order)."""
    polygon = np.asarray(polygon, dtype=float)
    if len(coords) == 0 or len(polygon) < 3:
        return np.zeros(len(coords), dtype=bool)
    return points_in_poly(np.asarray(coords, dtype=float), polygon)


def class_colours(classes: np.ndarray, palette: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 4) RGBA per cell from its class name; unlabelled or unknown classes are muted grey."""
    table = np.vstack([*palette.values(), MUTED]).astype(np.float32) if palette else MUTED[None]
    codes = pd.Index(list(palette)).get_indexer(classes)  # -1 (not in the palette) picks MUTED, the last row
    return table[codes]


def value_colours(values: np.ndarray, colormap) -> np.ndarray:
    """(n, 4) RGBA per cell from a measurement, scaled between its 2nd and 98th percentile."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    colours = np.tile(MUTED, (len(values), 1))
    if finite.any():
        low, high = np.percentile(values[finite], [2, 98])
        scaled = np.clip((values[finite] - low) / (high - low if high > low else 1.0), 0, 1)
        colours[finite] = colormap.map(scaled)
    return colours


def emphasise(colours: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Dim every cell outside ``selected`` (a boolean mask); the selection opaque; no selection, no change."""
    colours = colours.copy()
    if selected.any():
        colours[~selected, 3] *= DIM_FACTOR
        colours[selected, 3] = 1.0
    return colours


def rank_lut(colours: np.ndarray) -> np.ndarray:
    """A (65536, 4) lookup table for a :meth:`PooledCells.rank_image`: row 1 + i is colour i, row 0 clear."""
    lut = np.zeros((LUT_SIZE, 4), dtype=np.float32)
    lut[1 : len(colours) + 1] = colours
    return lut
