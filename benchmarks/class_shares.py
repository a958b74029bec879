"""How close the head's class shares per smear come to the annotators', on Chula RBC-12, split by image.

A smear report gives each class's share of the red cells. The Cell map's head is class-balanced,
so that a rare class is found at all; but counting its argmax then also gives a rare class the
benefit of every doubt. This script fits the head as ``overlap_head.py`` does (5 folds by image,
embeddings + default measurements), takes each annotated cell's out-of-fold probabilities, and
counts the classes of each smear with at least ``MIN_CELLS`` annotated cells in several ways:

- **balanced**: the argmax, as the Cell map and ``reddino-analyse`` count today;
- **labelled prior ** beta**: probabilities times the training folds' class frequencies to the
  power beta, then the argmax (beta 1 is what an unweighted head would give; it needs labels
  that are a fair sample of the smears, as Chula's annotations are and a lasso's picks are not);
- **own prior, pooled / per smear**: probabilities times the shares the balanced head itself
  predicts among the test fold's smears pooled, or within the smear alone (needs no labels).

Prints each way's total variation distance from the annotators' shares (mean and median over
smears), balanced accuracy and accuracy, then each class's mean share error, then each class's
mean share in the smears where the annotators found it abundant (at least ``ABUNDANT_TIMES`` its
mean share and at least ``ABUNDANT_SHARE``): the smears a lab most needs counted right.

    python benchmarks/class_shares.py /work/runs/eval29/chula.json
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from chula_head import load
from overlap_head import RowHead, measurement_names
from sklearn.metrics import balanced_accuracy_score

from napari_reddino.cell_classifier import DEFAULT_MEASUREMENTS
from reddino_train.evaluate import make_folds

MIN_CELLS = 30
ABUNDANT_TIMES, ABUNDANT_SHARE = 3, 0.10


def out_of_fold_probabilities(eval_json: Path):
    """Each annotated cell's class probabilities from the head fitted on the other folds, the
    training folds' class frequencies, the targets, each cell's image and the class names."""
    embeddings, measured = load(eval_json, "cls"), load(eval_json, "measurements")
    if not np.array_equal(embeddings["targets"], measured["targets"]):
        raise SystemExit("the embeddings' rows do not line up with the measurements' rows; re-run the eval")
    table = pd.DataFrame(measured["features"].astype(np.float64), columns=measurement_names())
    table["image"] = measured["groups"]
    targets, groups = measured["targets"], measured["groups"]
    classes = np.asarray(measured["class_names"].tolist(), dtype=object)
    probabilities, prior = np.zeros((len(targets), len(classes))), np.zeros((len(targets), len(classes)))
    rows = np.arange(len(targets))[:, None]
    for train, test in make_folds(targets, "by-image", groups):
        head = RowHead(embeddings["features"], table, classes, list(DEFAULT_MEASUREMENTS)).fit(rows[train], targets[train])
        probabilities[test] = head.head.predict_proba(
            embeddings["features"][test], measurements=table.iloc[test].reset_index(drop=True))
        prior[test] = np.bincount(targets[train], minlength=len(classes)) / len(train)
    return probabilities, prior, targets, groups, classes


def shares(classes_of_cells: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(classes_of_cells, minlength=n_classes) / len(classes_of_cells)


def own_prior(probabilities: np.ndarray, groups: np.ndarray, per_smear: bool) -> np.ndarray:
    """Each cell's prior: the balanced head's predicted shares among its smear, or among all."""
    n_classes = probabilities.shape[1]
    if not per_smear:
        return np.tile(shares(probabilities.argmax(1), n_classes), (len(probabilities), 1))
    prior = np.zeros_like(probabilities)
    for group in np.unique(groups):
        rows = groups == group
        prior[rows] = shares(probabilities[rows].argmax(1), n_classes)
    return prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_json", type=Path, help="the --json path of a points-format reddino-train eval run")
    args = parser.parse_args()
    probabilities, prior, targets, groups, classes = out_of_fold_probabilities(args.eval_json)
    n_classes = len(classes)
    ways = {"balanced (as counted today)": probabilities}
    for beta in (0.25, 0.5, 1.0):
        ways[f"labelled prior ** {beta}"] = probabilities * prior ** beta
    ways["own prior, test folds pooled"] = probabilities * own_prior(probabilities, groups, per_smear=False)
    ways["own prior, per smear"] = probabilities * own_prior(probabilities, groups, per_smear=True)
    smears = [group for group in np.unique(groups) if (groups == group).sum() >= MIN_CELLS]
    truth = np.array([shares(targets[groups == group], n_classes) for group in smears])
    print(f"# {len(smears)} smears with at least {MIN_CELLS} annotated cells, {len(targets):,} cells in all\n")
    print("| way | share error (TV), mean | median | balanced accuracy | accuracy |\n|---|---:|---:|---:|---:|")
    errors = {}
    for name, weighted in ways.items():
        predicted = weighted.argmax(1)
        reported = np.array([shares(predicted[groups == group], n_classes) for group in smears])
        errors[name] = reported - truth
        distance = 0.5 * np.abs(errors[name]).sum(1)
        print(f"| {name} | {distance.mean():.3f} | {np.median(distance):.3f} | "
              f"{balanced_accuracy_score(targets, predicted):.3f} | {(predicted == targets).mean():.3f} |")
    shown = ["balanced (as counted today)", "labelled prior ** 1.0", "own prior, test folds pooled"]
    print("\n| class | annotated share | " + " | ".join(f"error, {name}" for name in shown) + " |\n|---|---:|"
          + "---:|" * len(shown))
    for index, name in enumerate(classes):
        mean_errors = " | ".join(f"{100 * errors[way][:, index].mean():+.1f}" for way in shown)
        print(f"| {name} | {100 * truth[:, index].mean():.1f} % | {mean_errors} |")
    print("\n| class | smears where abundant | annotated share there | " + " | ".join(shown) + " |\n|---|---:|---:|"
          + "---:|" * len(shown))
    for index, name in enumerate(classes):
        abundant = truth[:, index] >= max(ABUNDANT_TIMES * truth[:, index].mean(), ABUNDANT_SHARE)
        if abundant.any():
            counted = " | ".join(f"{100 * (truth + errors[way])[abundant, index].mean():.1f} %" for way in shown)
            print(f"| {name} | {abundant.sum()} | {100 * truth[abundant, index].mean():.1f} % | {counted} |")


if __name__ == "__main__":
    main()
