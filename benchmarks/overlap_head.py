"""Overlapping cells and the Cell map's head, on Chula RBC-12, split by image.

Reads the features that ``reddino-train eval MODEL --data chula_rbc12 --with-measurements
--json OUT.json`` cached beside OUT.json and fits ``CellClassifier`` as the widget does (the
embeddings plus :data:`DEFAULT_MEASUREMENTS`, class-balanced), 5 folds by image:

1. with and without ``outline_shared`` among the measurements: balanced accuracy, accuracy,
   weighted F1 and each class's recall;
2. with it, each class's recall on its overlapping cells (``outline_shared`` at least
   ``OVERLAPPING_OUTLINE``) against the others.

    python benchmarks/overlap_head.py /work/runs/eval29/chula.json
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from chula_head import load, print_scores

from napari_reddino import measure_cells
from napari_reddino.cell_classifier import DEFAULT_MEASUREMENTS, CellClassifier
from napari_reddino.smear_summary import OVERLAPPING_OUTLINE
from reddino_train.eval_data import MeasurementFeatures
from reddino_train.evaluate import make_folds, out_of_fold_predictions, score


def measurement_names() -> list[str]:
    """The eval's measurement columns of an RGB smear, in its order."""
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 1
    table = measure_cells(labels, np.full((20, 20, 3), 200, np.uint8))
    return [column for column in table.columns if MeasurementFeatures.is_feature(column)]


class RowHead:
    """CellClassifier with scikit-learn's fit / predict, on row numbers into the eval's features."""

    def __init__(self, embeddings, table, classes, columns):
        self.embeddings, self.table, self.classes, self.columns = embeddings, table, classes, columns

    def fit(self, rows, targets):
        rows = rows[:, 0]
        self.head = CellClassifier(list(self.classes)).fit(
            self.embeddings[rows], self.classes[targets], measurements=self.table.iloc[rows].reset_index(drop=True),
            measurement_columns=self.columns)
        return self

    def predict(self, rows):
        rows = rows[:, 0]
        names = self.head.predict(self.embeddings[rows], measurements=self.table.iloc[rows].reset_index(drop=True))
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[name] for name in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_json", type=Path, help="the --json path of a points-format reddino-train eval run")
    args = parser.parse_args()
    embeddings, measured = load(args.eval_json, "cls"), load(args.eval_json, "measurements")
    if not np.array_equal(embeddings["targets"], measured["targets"]):
        raise SystemExit("the embeddings' rows do not line up with the measurements' rows; re-run the eval")
    table = pd.DataFrame(measured["features"].astype(np.float64), columns=measurement_names())
    table["image"] = measured["groups"]  # relative_diameter: against the median of its smear
    targets, classes = measured["targets"], np.asarray(measured["class_names"].tolist(), dtype=object)
    folds = make_folds(targets, "by-image", measured["groups"])
    rows = np.arange(len(targets))[:, None]
    without = [column for column in DEFAULT_MEASUREMENTS if column != "outline_shared"]
    variants = {"without outline_shared": without, "with outline_shared": [*without, "outline_shared"]}
    predictions, results = {}, {}
    for name, columns in variants.items():
        predictions[name] = out_of_fold_predictions(
            rows, targets, folds, lambda _n, columns=columns: RowHead(embeddings["features"], table, classes, columns))
        results[name] = score(targets, predictions[name], list(classes), folds)

    print_scores(results, "ViT + default measurements", classes, measured["groups"], folds)

    overlapping = table["outline_shared"].to_numpy() >= OVERLAPPING_OUTLINE
    predicted = predictions["with outline_shared"]
    print(f"\n# overlapping (outline_shared >= {OVERLAPPING_OUTLINE}): {overlapping.mean():.1%} of the cells\n")
    print("| class | cells | overlapping | recall, the others | recall, overlapping |\n|---|---:|---:|---:|---:|")
    for index, name in enumerate(classes):
        of_class = targets == index
        free, over = of_class & ~overlapping, of_class & overlapping
        recall = [(predicted[part] == index).mean() if part.any() else np.nan for part in (free, over)]
        print(f"| {name} | {of_class.sum():,} | {over.sum() / of_class.sum():.1%} | {recall[0]:.3f} | {recall[1]:.3f} |")


if __name__ == "__main__":
    main()
