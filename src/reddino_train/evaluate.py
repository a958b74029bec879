"""The RedDino paper's evaluation protocol on frozen features: pure numpy and scikit-learn.

Classifiers: kNN with k = 1 and k = 20 (majority vote of the nearest neighbours by cosine
similarity, i.e. Euclidean distance between L2-normalised features), DINOv2's kNN (k = 20,
each neighbour's vote weighted by exp(similarity / 0.07)) and logistic regression
(standardised features, balanced class weights; RedDino's own script fits raw, unweighted
features, which seldom predicts the rare classes and fails on unscaled measurements:
benchmarks/RESULTS.md, "CPU pretraining", eleventh session). Splits: 5-fold stratified CV, or folds
grouped by image (``StratifiedGroupKFold``), so no smear has cells on both sides of a split:
cells of one smear share its staining and focus, and a split by cell lets a classifier
recognise the smear instead of the morphology.

Scores are computed once on the pooled out-of-fold predictions (every sample is predicted by
the one model that did not see it); the balanced accuracy of each fold is kept beside them
to show the spread.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

Split = Literal["5-fold", "by-image"]
SPLITS: tuple[Split, ...] = ("5-fold", "by-image")
N_FOLDS = 5
Folds = list[tuple[np.ndarray, np.ndarray]]  # (train indices, test indices) per fold


class EvaluationError(ValueError):
    """Data that the protocol cannot be run on."""


DINOV2_KNN_TEMPERATURE = 0.07


def similarity_weights(distances: np.ndarray) -> np.ndarray:
    """DINOv2's kNN vote: each neighbour counts exp(cosine similarity / 0.07). Between
    L2-normalised features at Euclidean distance d the cosine similarity is 1 - d^2 / 2."""
    return np.exp((1 - distances**2 / 2) / DINOV2_KNN_TEMPERATURE)


def knn(k: int, weights: str | Callable[[np.ndarray], np.ndarray] = "uniform") -> Callable[[int], ClassifierMixin]:
    """kNN by cosine similarity, a majority vote unless ``weights`` says otherwise; k shrinks to
    the training set's size."""
    return lambda n_train: make_pipeline(
        Normalizer(), KNeighborsClassifier(min(k, n_train), weights=weights, algorithm="brute")
    )


def logistic_regression(n_train: int) -> ClassifierMixin:
    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))


CLASSIFIERS: dict[str, Callable[[int], ClassifierMixin]] = {
    "knn1": knn(1),
    "knn20": knn(20),
    "knn20w": knn(20, similarity_weights),
    "logreg": logistic_regression,
}
METHOD_NAMES = {
    "knn1": "kNN k=1", "knn20": "kNN k=20", "knn20w": "kNN k=20 weighted", "logreg": "logistic regression",
}


def make_folds(targets: np.ndarray, split: Split, groups: np.ndarray | None = None, seed: int = 0) -> Folds:
    """Stratified folds (5, or as many as there are images when grouping by fewer than 5)."""
    targets = np.asarray(targets)
    if split == "5-fold":
        splitter, groups = StratifiedKFold(N_FOLDS, shuffle=True, random_state=seed), None
    elif split == "by-image":
        if groups is None:
            raise EvaluationError("a split by image needs to know each sample's image (points data)")
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise EvaluationError("a split by image needs samples from at least two images (smears); with one, "
                                  "--split 5-fold splits its cells")
        splitter = StratifiedGroupKFold(min(N_FOLDS, n_groups), shuffle=True, random_state=seed)
    else:
        raise EvaluationError(f"split {split!r}; choose one of {', '.join(SPLITS)}")
    with warnings.catch_warnings():  # rare classes: "The least populated class has only 2 members"
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [(train, test) for train, test in splitter.split(np.zeros(len(targets)), targets, groups)]


def out_of_fold_predictions(
    features: np.ndarray, targets: np.ndarray, folds: Folds, classifier: Callable[[int], ClassifierMixin]
) -> np.ndarray:
    """Each sample's class as predicted by the classifier fitted on the other folds."""
    predictions = np.full(len(targets), -1, dtype=np.int64)
    for train, test in folds:
        model = classifier(len(train))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter reached: still a fair fit
            model.fit(features[train], targets[train])
        predictions[test] = model.predict(features[test])
    return predictions


@dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Scores:
    accuracy: float
    balanced_accuracy: float
    weighted_f1: float
    fold_balanced_accuracy: tuple[float, ...]
    per_class: dict[str, ClassScores]

    def to_dict(self) -> dict:
        return asdict(self)


def score(targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], folds: Folds) -> Scores:
    """Accuracy, balanced accuracy (mean recall over the classes present), weighted F1 and the
    per-class report of out-of-fold predictions; only the folds' test samples are scored."""
    tested = np.concatenate([test for _, test in folds])
    y, p = targets[tested], predictions[tested]
    present = np.unique(y)
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=present, zero_division=0)
    with warnings.catch_warnings():  # a fold may lack classes: their recall is then left out
        warnings.simplefilter("ignore", UserWarning)
        fold_scores = tuple(float(balanced_accuracy_score(targets[test], predictions[test])) for _, test in folds)
    return Scores(
        accuracy=float(accuracy_score(y, p)),
        balanced_accuracy=float(balanced_accuracy_score(y, p)),
        weighted_f1=float(f1_score(y, p, labels=present, average="weighted", zero_division=0)),
        fold_balanced_accuracy=fold_scores,
        per_class={
            class_names[c]: ClassScores(float(pr), float(rc), float(f), int(n))
            for c, pr, rc, f, n in zip(present, precision, recall, f1, support)
        },
    )


def evaluate(
    features: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    folds: Folds,
    methods: Sequence[str] = tuple(CLASSIFIERS),
) -> dict[str, Scores]:
    """Scores of each classifier in ``methods`` (keys of :data:`CLASSIFIERS`) on the folds."""
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(features) != len(targets):
        raise EvaluationError(f"{len(features)} feature rows but {len(targets)} targets")
    return {
        method: score(targets, out_of_fold_predictions(features, targets, folds, CLASSIFIERS[method]),
                      class_names, folds)
        for method in methods
    }


POOLED_NOTE = (
    "balanced acc.: the mean recall of every class over all folds' predictions pooled; a fold's own score "
    "averages only the classes among its test cells, so where rare classes fall in few folds the pooled "
    "score can lie outside the folds' range"
)


def format_table(results: Mapping[str, Mapping[str, Scores]]) -> str:
    """A Markdown table: one row per (features, classifier), the headline scores in columns."""
    lines = [
        "| features | classifier | balanced acc. | (folds: min-max) | accuracy | weighted F1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    outside = False
    for features, by_method in results.items():
        for method, scores in by_method.items():
            folds = scores.fold_balanced_accuracy
            outside |= not min(folds) <= scores.balanced_accuracy <= max(folds)
            lines.append(
                f"| {features} | {METHOD_NAMES.get(method, method)} | {scores.balanced_accuracy:.4f} | "
                f"{min(folds):.3f}-{max(folds):.3f} | {scores.accuracy:.4f} | {scores.weighted_f1:.4f} |"
            )
    if outside:
        lines += ["", POOLED_NOTE]  # after a blank line: not a row of the table
    return "\n".join(lines)


def format_per_class(results: Mapping[str, Mapping[str, Scores]]) -> str:
    """A Markdown table of per-class recall, one column per (features, classifier)."""
    columns = [(features, method) for features, by_method in results.items() for method in by_method]
    classes: dict[str, int] = {}
    for features, method in columns:
        for name, scores in results[features][method].per_class.items():
            classes[name] = scores.support
    header = " | ".join(f"{features} {METHOD_NAMES.get(method, method)}" for features, method in columns)
    lines = [f"| class | cells | {header} |", "|---|---:|" + "---:|" * len(columns)]
    for name, support in classes.items():
        recalls = " | ".join(
            f"{results[f][m].per_class[name].recall:.3f}" if name in results[f][m].per_class else "" for f, m in columns
        )
        lines.append(f"| {name} | {support} | {recalls} |")
    return "recall per class\n" + "\n".join(lines)
