"""The Cell map's head: Train head, Review uncertain, Save head and Apply saved head.

A mixin of :class:`.cell_map_widget.CellMapWidget`: it keeps the head (``classifier``,
``head_token``) and the review queue (``_review``, ``_uncertain``, ``_unlike``,
``_head_applied``), reads the widget's ``pool``, ``class_list``, ``colour_by``, ``status`` and
viewer, and calls its ``_map_is_current``, ``_pooled``, ``select``, ``_show_cell_in_smear``,
``recolour``, ``_refuse`` and ``_confirm_overwrite``.
"""

import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from napari.layers import Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog

from ..atomic_files import PartlyWrittenError
from ..cell_classifier import (
    DEFAULT_MEASUREMENTS,
    MOSTLY_UNLIKE,
    UNLIKE_ADVICE,
    CellClassifier,
    head_paths,
    prediction_table,
    uncertainty_order,
)
from ..cell_map import PREDICTED, UNLABELLED, PooledCells, PoolingError
from ..cell_table import PREDICTED_BY, PREDICTED_CLASSES, class_names, whole_cells
from ..wording import counted
from .cells_layer import embedded_cells_layers
from .map_export import not_written


def held_out_words(recall: dict[str, float] | None, labels) -> str:
    """What :meth:`CellClassifier.held_out_recall` found on the cells' ``labels``, in a sentence
    for the status line."""
    if recall is None:
        classes, counts = np.unique([label for label in labels if label != UNLABELLED], return_counts=True)
        alone = ", ".join(repr(str(name)) for name in classes[counts < 2])
        return f"Label a second cell of {alone} to see how the head does on cells it was not trained on."
    weakest = min(recall, key=recall.get)
    return (f"On labelled cells left out of its training in turn, it named {np.mean(list(recall.values())):.0%} "
            f"right (mean over classes; weakest: {weakest}, {recall[weakest]:.0%}); expect less on other smears.")


class MapHead:
    """The linear head of the map's cells: trained, applied, saved, and its least certain cells reviewed."""

    def _probability_columns(self, cells: Labels) -> list[str]:
        """The ``p_<class>`` columns of a cells layer: of the classes of the list, of the head, and
        of the head that last predicted its cells (in an earlier panel, perhaps); a layer's own
        column that happens to begin with ``p_`` is not one of them."""
        classes = [*self.class_list.classes, *(self.classifier.classes if self.classifier else []),
                   *cells.metadata.get(PREDICTED_CLASSES, [])]
        return [column for column in dict.fromkeys(f"p_{name}" for name in classes) if column in cells.features]

    def train(self) -> None:
        """Fit the linear head on the labelled cells and predict every cell of the map."""
        if not self._map_is_current(pixels=True):
            return
        if self.pool is None:
            self._refuse("Compute the map first.", notify=show_info)
            return
        started = time.perf_counter()
        table = self.pool.table()
        labels = class_names(table, "manual_label") if "manual_label" in table else None
        classifier = CellClassifier(self.class_list.classes, self.class_list.hex_colours, model_id=self.pool.model_id,
                                    crops=self.pool.crops)
        try:
            classifier.fit(self.pool.embeddings, labels if labels is not None else [], measurements=table)
        except ValueError as error:
            self._refuse(str(error), notify=show_info)
            return
        classifier.class_ids = {name: self.class_list.id_of(name) for name in classifier.classes}
        self._predict(classifier, self.pool, classifier.predict_proba(self.pool.embeddings, measurements=table))
        taught = int((labels != UNLABELLED).sum())
        seconds = time.perf_counter() - started
        recall = classifier.held_out_recall(self.pool.embeddings, labels, measurements=table)
        unused = [name for name in DEFAULT_MEASUREMENTS if name not in classifier.measurement_columns]
        unused = (f" Not used: {', '.join(unused)}, which some of the cells lack (a gray smear has no colour; cells "
                  "measured by an older version lack the newer measurements)." if unused else "")
        self.status.value = (f"Head trained on {taught:,} labelled cells in {seconds:.2f} s; every cell has a "
                             f"predicted class. {held_out_words(recall, labels)}{unused}")

    def _predict(self, classifier: CellClassifier, pool: PooledCells, proba: np.ndarray,
                 unlike: np.ndarray | None = None) -> None:
        """Make ``classifier`` the head and write its probabilities ``proba`` for every cell of ``pool``.

        A cell's ``p_<class>`` columns are those of this head only: a previous head's are dropped.
        Review visits the ``unlike`` cells (beyond a saved head's reach, on a smear it warned of)
        first: their probabilities look sure and are not.
        """
        token = uuid.uuid4().hex
        for cells in pool.layers:
            stale = self._probability_columns(cells)
            if stale:
                cells.features = cells.features.drop(columns=stale)
            cells.metadata[PREDICTED_CLASSES] = list(classifier.classes)
            cells.metadata[PREDICTED_BY] = token
        self.classifier, self.head_token = classifier, token
        predictions = prediction_table(classifier.classes, proba)
        pool.write("predicted_class", predictions.pop("predicted_class").to_numpy())
        pool.write_columns({name: column.to_numpy() for name, column in predictions.items()}, empty=np.nan)
        self._review, self._head_applied = [], unlike is not None
        if self.pool is None:
            return
        # The map's cells may have got new predictions (all of them, or some, from a head applied
        # to other smears too): review follows this head only when it predicted the whole map.
        if pool is self.pool:
            self._order_review(proba, unlike)
        else:
            self._uncertain, self._unlike = np.zeros(0, dtype=int), np.zeros(0, dtype=bool)
        self.colour_by.reset_choices()
        self.colour_by.value = PREDICTED
        self.recolour()

    def _order_review(self, proba: np.ndarray, unlike: np.ndarray | None) -> None:
        """Review the map's cells from the least certain, the ``unlike`` ones first."""
        order = uncertainty_order(proba)
        self._unlike = np.zeros(len(order), bool) if unlike is None else unlike
        self._uncertain = np.concatenate([order[self._unlike[order]], order[~self._unlike[order]]])

    @staticmethod
    def _unlike_cells(classifier: CellClassifier, pool: PooledCells,
                      beyond: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The cells beyond the head's reach on the smears most of whose cells are (those a review
        shows first), and which smears those are. ``beyond``: each cell beyond reach, if known."""
        if beyond is None:
            beyond = classifier.beyond_reach(pool.embeddings, measurements=pool.table())
        mostly = np.array([beyond[pool.span(position)].mean() > MOSTLY_UNLIKE for position in range(len(pool.layers))])
        return beyond & mostly[pool.layer_index], mostly

    def review_next(self) -> None:
        """Select the next unlabelled cell to review (see :meth:`_predict`) and show it in its smear
        and on the map."""
        if self.pool is None or len(self._uncertain) != len(self.pool):
            self._refuse("Train the head (or apply a saved one) on this map first; review steps through its "
                         "least certain cells.", notify=show_info)
            return
        labelled = self.pool.column("manual_label", UNLABELLED) != UNLABELLED
        while self._review and labelled[self._review[-1]]:  # labelled since the queue was made (an import)
            self._review.pop()
        if not self._review:  # cells cut by the border last: they count in no share, and look misshapen
            whole = whole_cells(pd.DataFrame({"touches_border": self.pool.column("touches_border", False)}))
            queue = [int(i) for i in self._uncertain if not labelled[i]]
            self._review = ([i for i in queue if whole[i]] + [i for i in queue if not whole[i]])[::-1]
        if not self._review:
            self.status.value = "Every cell is labelled; nothing to review."
            return
        point = self._review.pop()
        mask = np.zeros(len(self.pool), dtype=bool)
        mask[point] = True
        self.select(mask)
        self.canvas.centre_on(point)
        uncovered = self._show_cell_in_smear(point)
        if self.pool is None:  # its smear, shown again, was found changed: the status says so
            return
        predicted = self.pool.column("predicted_class", UNLABELLED)[point]
        certainty = self.pool.column("prediction_probability")[point]
        which = ("Unlabelled cell unlike those the head was trained among" if self._unlike[point]
                 else "Least certain unlabelled cell")
        self.status.value = (f"{which}: cell {self.pool.label_ids[point]} of "
                             f"{self.pool.layers[self.pool.layer_index[point]].name!r}{uncovered}, predicted "
                             f"{predicted!r} ({certainty:.0%} probability). Press its class's number key, or Review "
                             "uncertain to skip it.")

    def save_head(self, path: str | Path) -> None:
        """Save the head as ``<name>.safetensors`` + ``<name>.json``; asks before replacing either."""
        if self.classifier is None:
            self._refuse("Train the head first.", notify=show_info)
            return
        existing = [file for file in head_paths(path) if file.exists()]
        if existing and not self._confirm_overwrite(existing):
            return
        listed = self.class_list.hex_colours  # recoloured since it was trained: its galleries draw them so
        self.classifier.colours = {name: listed.get(name, colour) for name, colour in self.classifier.colours.items()}
        try:
            self.classifier.save(path)
        except PartlyWrittenError as error:  # its weights without their description: it loads no more
            self._refuse(f"The head was only partly saved ({error}); save it again.")
            return
        except (OSError, ValueError) as error:
            self._refuse(f"The head was not saved: {not_written(error)}")
            return
        self.status.value = f"Head saved to {path}."

    def apply_head(self, path: str | Path) -> None:
        """Load a saved head and predict every embedded cell in the viewer with it (one click)."""
        if not self._map_is_current(pixels=True):
            return
        layers = embedded_cells_layers(self._viewer)
        try:
            pool = self.pool if self.pool is not None and set(self.pool.layers) == set(layers) else (
                self._pooled(layers, then="apply the head again"))
            classifier = CellClassifier.load(path, model_id=pool.model_id, crops=pool.crops)
            table = pool.table()
            proba = classifier.predict_proba(pool.embeddings, measurements=table)
            beyond = classifier.beyond_reach(pool.embeddings, measurements=table)
        except (PoolingError, OSError, ValueError) as error:  # HeadMismatchError is a ValueError
            self._refuse(str(error))
            return
        renamed = self._carry_renames(classifier)
        for name in classifier.classes:
            self.class_list.add_class(name, classifier.colours.get(name), classifier.class_ids.get(name))
        unlike, mostly = self._unlike_cells(classifier, pool, beyond)
        self._predict(classifier, pool, proba, unlike)
        mapped = "" if pool is self.pool else " Compute map to see them on the map."
        renamed = f" ({'; '.join(renamed)})" if renamed else ""
        self.status.value = f"Head {Path(path).name} applied to {counted(len(pool), 'cell')}{renamed}.{mapped}"
        if mostly.any():
            names = ", ".join(repr(cells.name) for cells, warned in zip(pool.layers, mostly) if warned)
            review = "Review uncertain" if pool is self.pool else "Compute map: then Review uncertain"
            warning = (f"Most cells of {names} {UNLIKE_ADVICE}. {review} shows them first; label some "
                       "and train the head again.")
            show_warning(warning)
            self.status.value += f" {warning}"

    def _carry_renames(self, classifier: CellClassifier) -> list[str]:
        """Give the classes of a head saved before a rename (in this session: the class list's ids
        tell) their names now, else an old name would come back as a second class; says which. A
        class of the head whose name another class has now (it was removed, the other renamed or
        added so) comes back as "<name> (head)": under its old name it would pass its predictions
        off as the other's. Of a head from another session (ids the list never had) names are all
        there is."""
        renames = {}
        for old, class_id in classifier.class_ids.items():
            new = self.class_list.name_of(class_id)
            if new is not None and new != old:
                renames[old] = new
        said = [f"its {old!r} is {new!r} now" for old, new in renames.items()]

        def taken(name: str) -> bool:
            if name in renames:
                return False
            removed = classifier.class_ids.get(name) in self.class_list.removed_ids
            return name in renames.values() or (removed and self.class_list.id_of(name) is not None)

        in_use = {*classifier.classes, *self.class_list.classes, *renames.values()}
        for name in [name for name in classifier.classes if taken(name)]:
            candidate, number = f"{name} (head)", 1
            while candidate in in_use:
                number += 1
                candidate = f"{name} (head {number})"
            renames[name] = candidate
            in_use.add(candidate)
            said.append(f"its own {name!r} is {candidate!r}")
        classifier.rename_classes(renames)
        return said

    def _save_head_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save head", "head.safetensors", "Heads (*.safetensors)",
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            self.save_head(path)

    def _apply_head_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Apply saved head", "", "Heads (*.safetensors)")
        if path:
            self.apply_head(path)
