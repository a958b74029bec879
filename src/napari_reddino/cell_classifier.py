"""A linear head that names cell morphologies from embeddings and a few measurements.

Multinomial logistic regression on standardised features, each class weighing the same in
the loss however many cells were labelled with it, L2-regularised, fitted by full-batch
L-BFGS (scipy; deterministic, no torch start-up). Features are the embedding plus the
measurement columns chosen at fit time; :data:`DEFAULT_MEASUREMENTS` are scale-free, so a
head carries over to smears taken at another magnification or stained a shade darker:

- ``circularity``, ``eccentricity``, ``solidity``, ``central_pallor``, ``outline_shared``
  from ``measure_cells`` (the last tells a cell split from an overlapping neighbour: balanced
  accuracy on Chula 0.688 -> 0.699, schistocytes 0.545 -> 0.593; benchmarks/RESULTS.md). A
  table without it (measured by an older version) trains a head without it;
- ``relative_diameter``: equivalent diameter over the median of the smear's whole (not
  border-touching) cells. At the default crop scale ("smear") embeddings see a cell's size
  too; at "cell" scale they do not, and larger-than-usual cells keep their own window at
  either, so this names microcytes and macrocytes in every case without a pixel size. "The smear" is
  each ``layer`` of the table (one segmentation of a smear; the map's and the CSV's tables
  have it), else each ``image``, else the whole table;
- ``red_fraction``, ``blue_fraction``: mean colour as chromaticity, R / (R + G + B) and
  B / (R + G + B), which a brighter or dimmer exposure leaves unchanged.

Saved as ``<name>.safetensors`` (weights, bias, feature mean and std) beside ``<name>.json``
(classes, colours, model id, crop settings, embedding size, measurement columns, reach, the
class list's ids of the classes); never pickle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from .atomic_files import write_files_atomically
from .cell_embeddings import check_embeddings, crops_in_words
from .cell_table import whole_cells
from .crop_windows import valid_crops
from .model_ids import named_as, readable_ids, same_model

DEFAULT_MEASUREMENTS = (
    "circularity", "eccentricity", "solidity", "central_pallor", "outline_shared", "relative_diameter", "red_fraction",
    "blue_fraction",
)
WEIGHT_DECAY = 1e-3  # on the class-balanced mean loss over standardised features
MAX_ITERATIONS = 500
HELD_OUT_FOLDS = 5  # at most; fewer where a class has fewer labelled cells
FORMAT = "napari-reddino-cell-classifier"
FORMAT_VERSION = 1
REACH_PERCENTILE = 99  # of the training cells' distances: beyond it, a cell is unlike them
MOSTLY_UNLIKE = 0.5  # share of a smear's cells beyond the reach above which the smear is warned of
UNLIKE_ADVICE = ("are unlike the cells the head was trained among (another stain, scanner or magnification?): "
                 "trust its predictions there less than their probabilities suggest")
_COLOURS = ("mean_red", "mean_green", "mean_blue")


class HeadMismatchError(ValueError):
    """A saved head was trained on embeddings of another model, or of other crops, than the cells'."""


class CellClassifier:
    """Multinomial logistic regression from cell embeddings (+ measurements) to class names."""

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        colours: Mapping[str, str] | None = None,
        model_id: str | None = None,
        crops: Mapping | None = None,
    ):
        self.classes: list[str] = list(classes or [])
        self.colours: dict[str, str] = dict(colours or {})
        self.model_id = model_id
        # how the cells it learns from were cropped (mode, scale, margin): the same model sees a
        # masked crop at smear scale otherwise than a context crop at cell scale
        self.crops = None if crops is None else dict(crops)
        self.embedding_dim: int | None = None
        self.measurement_columns: list[str] = []
        self._class_order = list(self.classes)
        self._weight = self._bias = self._mean = self._std = None
        self.reach: float | None = None  # see beyond_reach; None for heads saved without it
        self.class_ids: dict[str, str] = {}  # name -> the class list's id of the class, where known

    @property
    def fitted(self) -> bool:
        return self._weight is not None

    def rename_classes(self, renames: Mapping[str, str]) -> None:
        """Call each class ``old`` of ``renames`` by its ``new`` name from now on, all at once (so two
        classes can swap names); their weights, colours and ids stay."""
        self.classes, self._class_order = ([renames.get(c, c) for c in names]
                                           for names in (self.classes, self._class_order))
        self.colours, self.class_ids = ({renames.get(name, name): value for name, value in by_name.items()}
                                        for by_name in (self.colours, self.class_ids))

    def fit(self, embeddings, labels, *, measurements: pd.DataFrame | None = None, measurement_columns=None):
        """Train on the rows whose label is a class name ("" or None: unlabelled, ignored).

        ``classes`` becomes the classes that have labelled cells, in the order of the class
        list given to the constructor (sorted without one). Pass the measurements of all
        cells, labelled or not: ``relative_diameter`` compares a cell with all cells of its smear.
        ``measurement_columns=None`` takes the :data:`DEFAULT_MEASUREMENTS` the table allows.
        """
        if isinstance(measurement_columns, str):
            raise TypeError(f"measurement_columns must be a list of column names, not the one string "
                            f"{measurement_columns!r} (write [{measurement_columns!r}]).")
        names = _label_names(labels)
        named = set(names) - {""}
        unknown = sorted(named - set(self._class_order)) if self._class_order else []
        if unknown:
            raise ValueError(f"Labels {', '.join(map(repr, unknown))} are not in the class list.")
        classes = [c for c in self._class_order if c in named] if self._class_order else sorted(named)
        if len(classes) < 2:
            raise ValueError(
                f"Label cells of at least two classes to train the head (labelled: {', '.join(classes) or 'none'})."
            )
        embeddings = check_embeddings(embeddings)
        if len(names) != len(embeddings):
            raise ValueError(f"{len(names)} labels for {len(embeddings)} embedded cells.")
        if measurement_columns is None:
            columns = [] if measurements is None else available_measurements(measurements)
        else:
            columns = list(measurement_columns)
        labelled = names != ""
        every = np.hstack([embeddings, measurement_features(measurements, columns, len(embeddings))])
        # Scaled by all the cells, not the few labelled ones: two labelled cells that happen to
        # agree on a feature would make it a huge, decisive z-score on every other cell.
        mean = every.mean(axis=0)
        std = every.std(axis=0)
        std[std < 1e-6] = 1.0  # a constant feature carries nothing; leave it at zero
        features = every[labelled]
        index = {name: i for i, name in enumerate(classes)}
        targets = np.array([index[name] for name in names[labelled]])
        weight, bias = _train(((features - mean) / std).astype(np.float32), targets, len(classes))
        self.classes, self.embedding_dim, self.measurement_columns = classes, embeddings.shape[1], columns
        self._weight, self._bias = weight, bias
        self._mean, self._std = mean.astype(np.float32), std.astype(np.float32)
        self.reach = float(np.percentile(self._distance(every), REACH_PERCENTILE))
        return self

    def beyond_reach(self, embeddings, *, measurements: pd.DataFrame | None = None) -> np.ndarray:
        """Which cells lie farther from the mean of the cells the head was trained among (root
        mean square of the standardised features) than 99 % of those cells, labelled or not:
        typically the cells of a smear of another stain, scanner or magnification.

        Its predictions there deserve less trust than their probabilities suggest: a head taught
        five Chula smears gives every Aslan cell p ≈ 1.00, and on Chula smears whose cells
        mostly lie beyond it names 9 % of the annotated cells right, against 26 % on the smears
        within (benchmarks/RESULTS.md, "A head's reach"). Where more than :data:`MOSTLY_UNLIKE`
        of a smear's cells lie beyond, the Cell map and ``reddino-analyse`` warn. All False for a
        head saved without its reach."""
        features = self._features(embeddings, measurements)
        return np.zeros(len(features), bool) if self.reach is None else self._distance(features) > self.reach

    def _distance(self, features: np.ndarray) -> np.ndarray:
        return np.sqrt(np.mean(((features - self._mean) / self._std) ** 2, axis=1))

    def _features(self, embeddings, measurements: pd.DataFrame | None) -> np.ndarray:
        """Embeddings and the head's measurements of each cell, checked against what it was trained on."""
        if not self.fitted:
            raise ValueError("The head is not trained yet: label cells of two classes and train it.")
        embeddings = check_embeddings(embeddings)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"The head takes {self.embedding_dim}-d embeddings (model {self.model_id or 'unknown'}); "
                f"these are {embeddings.shape[1]}-d."
            )
        return np.hstack([embeddings, measurement_features(measurements, self.measurement_columns, len(embeddings))])

    def predict_proba(self, embeddings, *, measurements: pd.DataFrame | None = None) -> np.ndarray:
        """Class probabilities, float32 (cells x classes), columns in ``classes`` order."""
        features = self._features(embeddings, measurements)
        logits = ((features - self._mean) / self._std) @ self._weight.T + self._bias
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return (proba / proba.sum(axis=1, keepdims=True)).astype(np.float32)

    def held_out_recall(self, embeddings, labels, *, measurements: pd.DataFrame | None = None,
                        seed: int = 0) -> dict[str, float] | None:
        """Each class's recall on labelled cells the head did not see: refitted (on the head's
        scaling, which every cell it was fitted among shares, labelled or not, as in :meth:`fit`)
        without each of up to :data:`HELD_OUT_FOLDS` stratified parts of the labelled
        cells in turn, the share of a class's cells left out that it named right. None when a
        class has fewer than two labelled cells. Takes what :meth:`fit` took; optimistic where
        the labels went to whole clusters of the map at once, since those cells are alike."""
        from sklearn.model_selection import StratifiedKFold

        names = _label_names(labels)
        if len(names) != len(embeddings):  # the embeddings themselves are checked with the features
            raise ValueError(f"{len(names)} labels for {len(embeddings)} embedded cells.")
        labelled = np.isin(names, self.classes)
        targets = np.array([self.classes.index(name) for name in names[labelled]], dtype=np.int64)
        counts = np.bincount(targets, minlength=len(self.classes))
        if counts.min() < 2:
            return None
        features = ((self._features(embeddings, measurements)[labelled] - self._mean) / self._std).astype(np.float32)
        predicted = np.empty_like(targets)
        folds = StratifiedKFold(n_splits=min(HELD_OUT_FOLDS, int(counts.min())), shuffle=True, random_state=seed)
        for train, test in folds.split(features, targets):
            weight, bias = _train(features[train], targets[train], len(self.classes))
            predicted[test] = (features[test] @ weight.T + bias).argmax(axis=1)
        return {name: float((predicted[targets == index] == index).mean()) for index, name in enumerate(self.classes)}

    def predict(self, embeddings, *, measurements: pd.DataFrame | None = None) -> np.ndarray:
        """The most probable class name of each cell (object array)."""
        proba = self.predict_proba(embeddings, measurements=measurements)
        return np.array(self.classes, dtype=object)[proba.argmax(axis=1)]

    def digest(self) -> str:
        """A hash of all that its predictions and pictures follow from: two heads of equal
        digest classify and colour every cell alike."""
        if not self.fitted:
            raise ValueError("Train the head before asking for its digest.")
        digest = hashlib.sha256()
        for array in (self._weight, self._bias, self._mean, self._std):
            digest.update(f"{array.dtype}{array.shape}".encode() + np.ascontiguousarray(array).tobytes())
        about = [self.classes, self.colours, self.model_id, self.crops, self.measurement_columns, self.reach,
                 self.class_ids]
        digest.update(json.dumps(about, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def save(self, path) -> None:
        """Write ``<path>.safetensors`` and ``<path>.json`` (``path`` with or without either suffix), atomically."""
        from safetensors.numpy import save

        if not self.fitted:
            raise ValueError("Train the head before saving it.")
        weights_path, about_path = head_paths(path)
        blob = save(
            {"weight": self._weight, "bias": self._bias, "feature_mean": self._mean, "feature_std": self._std},
            # the rows' classes and the columns' measurements, inside the weights (which weights_sha256
            # ties to the .json): a .json whose lists were reordered by hand would swap the results
            metadata={"format": FORMAT, "classes": json.dumps(self.classes),
                      "measurement_columns": json.dumps(self.measurement_columns)},
        )
        about = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "classes": self.classes,
            "colours": {name: self.colours[name] for name in self.classes if name in self.colours},
            "model_id": self.model_id,
            "crops": self.crops,
            "embedding_dim": self.embedding_dim,
            "measurement_columns": self.measurement_columns,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),  # ties the pair together
            "reach": self.reach,
            "class_ids": {name: self.class_ids[name] for name in self.classes if name in self.class_ids},
        }
        text = (json.dumps(about, indent=2) + "\n").encode()
        write_files_atomically({weights_path: lambda h: h.write(blob), about_path: lambda h: h.write(text)})

    @classmethod
    def load(cls, path, *, model_id: str | None = None, crops: Mapping | None = None) -> CellClassifier:
        """A saved head; with ``model_id``, refuse (HeadMismatchError) one trained on another model's
        embeddings (a copy of its model elsewhere is the same model: :mod:`~napari_reddino.model_ids`);
        with ``crops`` (mode, scale, margin), one trained on cells cropped otherwise."""
        from safetensors.numpy import load

        weights_path, about_path = head_paths(path)
        about = _read_about(about_path)
        if model_id is not None and not same_model(about["model_id"], model_id):
            theirs, ours = readable_ids([about["model_id"], model_id])
            raise HeadMismatchError(
                f"The head {about_path.stem!r} was trained on embeddings of {theirs}, "
                f"but these cells were embedded with {ours}. Embed the cells with the head's model, "
                "or train a new head on these cells."
            )
        if crops is not None and about.get("crops") is not None and dict(crops) != about["crops"]:
            raise HeadMismatchError(
                f"The head {about_path.stem!r} was trained on cells embedded from {crops_in_words(about['crops'])}, "
                f"but these cells were embedded from {crops_in_words(crops)}. Embed them with the head's Crop, "
                "Scale and Margin, or train a new head on these cells."
            )
        try:
            blob = weights_path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{about_path.name} is there but not {weights_path.name}, the head's weights "
                                    "(a head is the pair; copy both).") from None
        if hashlib.sha256(blob).hexdigest() != about["weights_sha256"]:
            raise ValueError(f"{weights_path} does not belong to {about_path.name} (saved separately, or damaged).")
        try:
            tensors = load(blob)
            weight, bias = tensors["weight"], tensors["bias"]
            mean, std = tensors["feature_mean"], tensors["feature_std"]
        except Exception as error:
            raise ValueError(f"{weights_path} is not a readable head ({error}).") from error
        _check_order(weights_path, about_path, _stored_lists(blob), about)
        n_classes, n_features = len(about["classes"]), about["embedding_dim"] + len(about["measurement_columns"])
        shapes = [a.shape for a in (weight, bias, mean, std)]
        if shapes != [(n_classes, n_features), (n_classes,), (n_features,), (n_features,)]:
            raise ValueError(f"{weights_path} holds arrays of the wrong shape for {about_path.name}.")
        head = cls(about["classes"], about["colours"], about["model_id"], about.get("crops"))
        head.embedding_dim, head.measurement_columns = about["embedding_dim"], list(about["measurement_columns"])
        head._weight, head._bias, head._mean, head._std = weight, bias, mean, std
        head.reach, head.class_ids = about.get("reach"), dict(about.get("class_ids") or {})
        return head


def uncertainty_order(proba) -> np.ndarray:
    """Row indices from least to most certain, by margin (top probability minus the runner-up).

    The margin, unlike the top probability alone, ranks a cell torn between two classes as
    uncertain even when many classes share the rest; ties keep row order.
    """
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] == 0:
        raise ValueError(f"Probabilities must be a 2-D array (cells x classes); got shape {proba.shape}.")
    top_two = -np.sort(-proba, axis=1)[:, :2]
    margin = top_two[:, 0] - (top_two[:, 1] if proba.shape[1] > 1 else 0)
    return np.argsort(margin, kind="stable")


def head_paths(path) -> tuple[Path, Path]:
    """``(<name>.safetensors, <name>.json)`` for ``path`` given with either suffix or none."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def saved_head_model(path) -> str | None:
    """The model a saved head learnt the embeddings of, as it was named (without its digest)."""
    return named_as(_read_about(head_paths(path)[1])["model_id"])


def available_measurements(table: pd.DataFrame) -> list[str]:
    """The :data:`DEFAULT_MEASUREMENTS` that ``table`` has or allows computing (no colour for a gray smear)."""
    return [name for name in DEFAULT_MEASUREMENTS if not _missing(table, [name])]


def measurement_features(table: pd.DataFrame | None, columns: Sequence[str], n_cells: int) -> np.ndarray:
    """float64 (cells x columns): each column of ``table`` or derived from it (see the module doc)."""
    if not columns:
        return np.zeros((n_cells, 0))
    if table is None:
        raise ValueError(f"The head was trained on measurements too ({', '.join(columns)}): pass the cells' "
                         "table from measure_cells as measurements=.")
    missing = _missing(table, columns)
    if missing:
        # where the table has µm columns, the pixel size was given: an older measuring lacks the newer ones
        in_um = [name for name in missing if "_um" in name] if not any("_um" in name for name in table) else []
        raise ValueError(
            f"The head needs the measurements {', '.join(missing)}, which some of these cells lack: "
            + (f"{', '.join(in_um)} need{'s' if len(in_um) == 1 else ''} the smear's pixel size (give it at Segment "
               "cells, or as pixel_size_um=); " if in_um else "")
            + "a head trained with colour cannot read gray smears, and cells need Segment cells' measurements "
            "(cells measured by an older version lack the newer ones: segment them again)."
        )
    if len(table) != n_cells:
        raise ValueError(f"Measurements of {len(table)} cells for {n_cells} embedded cells.")
    derived = {"relative_diameter": _relative_diameter, "red_fraction": _fraction("red"), "blue_fraction": _fraction("blue")}
    values = np.column_stack([derived[c](table) if c not in table and c in derived else table[c] for c in columns])
    values = values.astype(np.float64)
    bad = [c for c, finite in zip(columns, np.isfinite(values).all(axis=0)) if not finite]
    if bad:
        raise ValueError(f"The measurements {', '.join(bad)} have missing or infinite values.")
    return values


def prediction_table(classes: Sequence[str], proba: np.ndarray) -> pd.DataFrame:
    """``predicted_class``, ``prediction_probability`` and ``p_<class>`` for each row of ``proba``
    (the columns a head's prediction adds to a cells table)."""
    proba = np.asarray(proba)
    names = np.asarray(classes, dtype=object)
    columns = {"predicted_class": names[proba.argmax(axis=1)], "prediction_probability": proba.max(axis=1)}
    columns.update({f"p_{name}": proba[:, column] for column, name in enumerate(names)})
    return pd.DataFrame(columns)


def _missing(table: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The ``columns`` that ``table`` neither holds nor can derive for every cell (a map pooling
    colour and gray smears has no colour for the gray smear's cells)."""
    sources = {"relative_diameter": ["equivalent_diameter_px"], "red_fraction": _COLOURS, "blue_fraction": _COLOURS}

    def complete(name: str) -> bool:
        return name in table and bool(table[name].notna().all())

    return [c for c in columns if not complete(c) and not (c in sources and all(map(complete, sources[c])))]


def _relative_diameter(table: pd.DataFrame) -> np.ndarray:
    diameter = table["equivalent_diameter_px"].astype(float)
    key = next((column for column in ("layer", "image") if column in table), None)
    smear = table[key] if key else pd.Series(0, index=table.index)
    whole = whole_cells(table)
    typical = diameter.where(whole).groupby(smear).transform("median")
    typical = typical.fillna(diameter.groupby(smear).transform("median"))  # every cell touches the border
    return (diameter / typical).to_numpy()


def _fraction(channel: str):
    def chromaticity(table: pd.DataFrame) -> np.ndarray:
        total = table[list(_COLOURS)].to_numpy(float).sum(axis=1)
        return np.divide(table[f"mean_{channel}"].to_numpy(float), total, out=np.full(len(table), 1 / 3), where=total > 0)
    return chromaticity


def _stored_lists(blob: bytes) -> dict:
    """The class and measurement lists a head's weights were saved with (its safetensors header's
    metadata); none in heads saved before they were kept there, or in a header that cannot be read."""
    try:
        size = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8:8 + size]).get("__metadata__") or {}
        return {key: json.loads(metadata[key]) for key in ("classes", "measurement_columns") if key in metadata}
    except (ValueError, AttributeError, TypeError):  # the shape check that follows says it is unreadable
        return {}


def _check_order(weights_path: Path, about_path: Path, stored: dict, about: dict) -> None:
    """Refuse a .json whose classes or measurements are in another order than the rows and
    columns of the weights: each class would get another's probability, silently. A class
    renamed in place (to a name the weights do not know) keeps its row, and is read so."""
    classes = stored.get("classes")
    moved = classes is not None and any(name in classes and classes.index(name) != row
                                        for row, name in enumerate(about["classes"]))
    if moved:  # a class more or fewer: the shape check after this says so
        raise ValueError(f"{about_path.name} lists the classes {about['classes']}, but {weights_path.name} was saved for "
                         f"{classes}, in that order (edited by hand?): rename classes in the Cell map panel, then "
                         "save the head again.")
    columns = stored.get("measurement_columns")
    if columns is not None and columns != about["measurement_columns"]:
        raise ValueError(f"{about_path.name} lists the measurements {about['measurement_columns']}, but "
                         f"{weights_path.name} was saved for {columns} (edited by hand?).")


def _read_about(path: Path) -> dict:
    try:
        about = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"No saved head at {path} (a head is a .json beside a .safetensors file).") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a saved head: it is not valid JSON ({error}).") from error
    if not isinstance(about, dict) or about.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved napari-reddino head.")
    if about.get("version") != FORMAT_VERSION:  # before the keys: another version may name them otherwise
        raise ValueError(f"{path} is a head of format version {about.get('version')}; this version reads {FORMAT_VERSION}.")
    keys = {"classes", "colours", "model_id", "embedding_dim", "measurement_columns", "weights_sha256"}
    if not keys <= about.keys():
        raise ValueError(f"{path} is not a saved napari-reddino head: it lacks {', '.join(sorted(keys - about.keys()))}.")
    types = {"classes": list, "colours": dict, "model_id": str | None, "embedding_dim": int,
             "measurement_columns": list, "weights_sha256": str}
    wrong = [f"{key} ({type(about[key]).__name__}, not {getattr(kind, '__name__', kind)})"
             for key, kind in types.items() if not isinstance(about[key], kind) or isinstance(about[key], bool)]
    reach, class_ids = about.get("reach"), about.get("class_ids", {})  # heads saved before them have none
    if reach is not None and (isinstance(reach, bool) or not isinstance(reach, int | float) or not reach >= 0):
        wrong.append(f"reach ({reach!r}, not a number of at least 0)")  # 0: its cells all alike
    if not isinstance(class_ids, dict) or not all(isinstance(v, str) for v in class_ids.values()):
        wrong.append("class_ids (not a mapping of class names to ids)")
    classes = about["classes"] if isinstance(about["classes"], list) else []
    if not all(isinstance(name, str) and name.strip() for name in classes) or len(set(classes)) < len(classes):
        wrong.append("classes (not distinct names)")
    crops = about.get("crops")  # heads saved before it have none
    if crops is not None and valid_crops(crops) is None:
        wrong.append("crops (not a mode, scale and margin)")
    if wrong:
        raise ValueError(f"{path} is not a readable head: wrong types for {', '.join(wrong)} (edited by hand?).")
    return about


def _label_names(labels) -> np.ndarray:
    """Labels as class names, "" for unlabelled (None, NaN or "")."""
    if isinstance(labels, str):
        raise TypeError(f"labels must be one class name per cell, not the one string {labels!r}.")
    return np.array(["" if pd.isna(label) else str(label) for label in labels], dtype=object)


def _train(features: np.ndarray, targets: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight (classes x features) and bias minimising the class-balanced cross-entropy + L2."""
    n, d = features.shape
    sample_weight = (1.0 / (n_classes * np.bincount(targets, minlength=n_classes)))[targets]  # sums to 1
    rows = np.arange(n)

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = theta[:-n_classes].reshape(n_classes, d), theta[-n_classes:]
        logits = (features @ weight.T.astype(np.float32)).astype(np.float64) + bias
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        total = proba.sum(axis=1)
        proba /= total[:, None]
        loss = sample_weight @ (np.log(total) - logits[rows, targets]) + 0.5 * WEIGHT_DECAY * np.sum(weight**2)
        proba[rows, targets] -= 1
        proba *= sample_weight[:, None]
        grad_weight = (proba.T.astype(np.float32) @ features) + WEIGHT_DECAY * weight
        return loss, np.concatenate([grad_weight.ravel(), proba.sum(axis=0)])

    # The products are thin (classes x cells x features): BLAS threads gain nothing, and
    # OpenBLAS's spinning threads made a 10,000-cell fit 6 s instead of 0.8 s on a busy 2-core CPU.
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(
            loss_and_gradient, np.zeros(n_classes * (d + 1)), jac=True, method="L-BFGS-B",
            options={"maxiter": MAX_ITERATIONS},
        )
    theta = result.x.astype(np.float32)
    return theta[:-n_classes].reshape(n_classes, d), theta[-n_classes:]
