"""The Cell map's linear head (``CellClassifier``) on Chula RBC-12, split by image.

It reads the features that ``reddino-train eval MODEL --data chula_rbc12 --with-measurements
--random-init --json OUT.json`` cached beside OUT.json (one row per annotated cell matched to a
segmented cell, the same rows in every file) and trains the head the way the widget does
(class-balanced, standardised) on: the measurements alone, the model's embeddings alone, and
embeddings + measurements; likewise for the random-init embeddings. Folds are the eval's
(``StratifiedGroupKFold`` by image). Prints balanced accuracy and per-class recall.

    python benchmarks/chula_head.py /work/runs/cpu_small_60min/eval/chula_by_image.json
"""

import argparse
from pathlib import Path

import numpy as np

from napari_reddino.cell_classifier import CellClassifier
from reddino_train.evaluate import make_folds, out_of_fold_predictions, score


class HeadAdapter:
    """CellClassifier with the fit(X, y) / predict(X) of a scikit-learn classifier on class indices."""

    def __init__(self, class_names):
        self.class_names = np.asarray(class_names, dtype=object)

    def fit(self, features, targets):
        self.head = CellClassifier(list(self.class_names)).fit(features, self.class_names[targets])
        return self

    def predict(self, features):
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[name] for name in self.head.predict(features)])


def load(json_path: Path, name: str) -> dict:
    with np.load(json_path.with_name(f"{json_path.stem}.{name}.npz"), allow_pickle=False) as saved:
        return {key: saved[key] for key in ("features", "targets", "class_names", "groups")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_json", type=Path, help="the --json path of a points-format reddino-train eval run")
    args = parser.parse_args()
    sets = {name: load(args.eval_json, name) for name in ("cls", "random-init", "measurements")}
    reference = sets["measurements"]
    for name, data in sets.items():
        if not (np.array_equal(data["targets"], reference["targets"]) and np.array_equal(data["groups"], reference["groups"])):
            raise SystemExit(f"{name} rows do not line up with the measurements' rows; re-run the eval")
    targets, classes = reference["targets"], reference["class_names"].tolist()
    folds = make_folds(targets, "by-image", reference["groups"])
    variants = {
        "measurements": reference["features"],
        "trained ViT": sets["cls"]["features"],
        "trained ViT + measurements": np.hstack([sets["cls"]["features"], reference["features"]]),
        "random-init ViT": sets["random-init"]["features"],
        "random-init ViT + measurements": np.hstack([sets["random-init"]["features"], reference["features"]]),
    }
    results = {}
    for name, features in variants.items():
        predictions = out_of_fold_predictions(features, targets, folds, lambda _n: HeadAdapter(classes))
        results[name] = score(targets, predictions, classes, folds)
    print_scores(results, "head on", classes, reference["groups"], folds)


def print_scores(results: dict, heading: str, classes, groups: np.ndarray, folds) -> None:
    """Two tables: each variant's balanced accuracy, accuracy and weighted F1; each class's recall."""
    cells = sum(len(test) for _, test in folds)
    print(f"# {cells:,} cells of {len(np.unique(groups))} images, {len(folds)} folds by image\n")
    print(f"| {heading} | balanced accuracy | accuracy | weighted F1 |\n|---|---:|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {result.balanced_accuracy:.3f} | {result.accuracy:.3f} | {result.weighted_f1:.3f} |")
    print("\n| class | cells | " + " | ".join(results) + " |\n|---|---:|" + "---:|" * len(results))
    for name in classes:
        support = next(iter(results.values())).per_class[name].support
        recalls = " | ".join(f"{result.per_class[name].recall:.3f}" for result in results.values())
        print(f"| {name} | {support} | {recalls} |")


if __name__ == "__main__":
    main()
