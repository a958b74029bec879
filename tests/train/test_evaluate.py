"""The evaluation protocol on small synthetic feature sets with hand-computed answers."""

import numpy as np
import pytest

from reddino_train.eval_data import FeatureSet, _subsample_per_class, read_point_labels
from reddino_train.evaluate import (
    POOLED_NOTE,
    EvaluationError,
    evaluate,
    format_table,
    make_folds,
    out_of_fold_predictions,
    score,
    similarity_weights,
)
from reddino_train.evaluate import knn as knn_classifier


def one_fold(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.arange(n), np.arange(n))]


def test_scores_against_hand_computed_values():
    targets = np.array([0, 0, 0, 0, 1, 1])
    predictions = np.array([0, 0, 0, 1, 1, 0])
    scores = score(targets, predictions, ["a", "b"], one_fold(6))
    # recall a = 3/4, recall b = 1/2
    assert scores.balanced_accuracy == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert scores.accuracy == pytest.approx(4 / 6)
    # F1 a: precision 3/4, recall 3/4 -> 3/4; F1 b: precision 1/2, recall 1/2 -> 1/2; weights 4:2
    assert scores.weighted_f1 == pytest.approx((4 * 3 / 4 + 2 * 1 / 2) / 6)
    assert scores.per_class["a"].precision == pytest.approx(3 / 4) and scores.per_class["b"].support == 2


def test_balanced_accuracy_weighs_a_rare_class_like_a_common_one():
    targets = np.array([0] * 9 + [1])
    always_zero = np.zeros(10, dtype=int)
    scores = score(targets, always_zero, ["common", "rare"], one_fold(10))
    assert scores.accuracy == pytest.approx(0.9) and scores.balanced_accuracy == pytest.approx(0.5)


def test_pooled_balanced_accuracy_below_every_fold_is_explained_under_the_table():
    # each fold tests the common classes 0 and 1 and one rare class, which is never found:
    # each fold's score is (1 + 1 + 0) / 3, the pooled one (1 + 1 + 0 + 0) / 4
    targets = np.array([0, 1, 2, 0, 1, 3])
    predictions = np.array([0, 1, 0, 0, 1, 0])
    folds = [(np.array([3, 4, 5]), np.array([0, 1, 2])), (np.array([0, 1, 2]), np.array([3, 4, 5]))]
    scores = score(targets, predictions, ["a", "b", "c", "d"], folds)
    assert scores.fold_balanced_accuracy == pytest.approx((2 / 3, 2 / 3))
    assert scores.balanced_accuracy == pytest.approx(1 / 2)
    assert POOLED_NOTE in format_table({"cls": {"logreg": scores}})
    inside = score(targets, targets, ["a", "b", "c", "d"], folds)
    assert POOLED_NOTE not in format_table({"cls": {"logreg": inside}})


def test_knn_uses_cosine_similarity_not_distance():
    # the test point (1, 0.3) is 11 degrees from (10, 1) but much closer to (0.5, 0.5) in distance
    features = np.array([[10.0, 1.0], [0.5, 0.5], [1.0, 0.3], [0.05, 1.0]])
    targets = np.array([0, 1, 0, 1])
    folds = [(np.array([0, 1]), np.array([2, 3]))]
    predictions = out_of_fold_predictions(features, targets, folds, knn_classifier(1))
    assert predictions[2:].tolist() == [0, 1]


def test_knn_k1_accuracy_on_a_constructed_set():
    # two classes on rays at 0 and 90 degrees, plus one class-1 sample at 10 degrees whose
    # nearest neighbour (by angle) is of class 0: with leave-one-out, exactly it is wrong
    angles = np.radians([0, 2, 4, 6, 90, 88, 86, 10])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.arange(1, 9)[:, None]
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    folds = [(np.delete(np.arange(8), i), np.array([i])) for i in range(8)]
    scores = evaluate(features, targets, ["0 deg", "90 deg"], folds, ["knn1"])["knn1"]
    assert scores.accuracy == pytest.approx(7 / 8)
    assert scores.balanced_accuracy == pytest.approx((1 + 3 / 4) / 2)


def test_knn20_votes_among_all_when_fewer_samples_are_there():
    features = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0], [0.0, 1.0]])
    targets = np.array([0, 0, 0, 1, 1, 1])
    folds = [(np.arange(5), np.array([5]))]  # 3 of class 0 and 2 of class 1 vote
    assert out_of_fold_predictions(features, targets, folds, knn_classifier(20))[5] == 0


def test_weighted_knn_lets_a_very_close_neighbour_outvote_several_far_ones():
    # the query at 0 degrees; one class-1 neighbour at 5 degrees (similarity 0.996), three
    # class-0 neighbours at 60 degrees (0.5): exp(0.996 / 0.07) = 1.5e6 > 3 exp(0.5 / 0.07) = 3.8e3
    angles = np.radians([5, 60, -60, 60, 0])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    targets = np.array([1, 0, 0, 0, 1])
    folds = [(np.arange(4), np.array([4]))]
    assert out_of_fold_predictions(features, targets, folds, knn_classifier(20))[4] == 0
    assert out_of_fold_predictions(features, targets, folds, knn_classifier(20, similarity_weights))[4] == 1
    assert similarity_weights(np.array([0.0, np.sqrt(2)])) == pytest.approx([np.exp(1 / 0.07), 1.0])


def test_logistic_regression_separates_separable_classes():
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1, 2], 20)
    features = rng.normal(size=(60, 8)) + 5 * np.eye(8)[targets]
    folds = make_folds(targets, "5-fold", seed=1)
    results = evaluate(features, targets, ["a", "b", "c"], folds)
    assert set(results) == {"knn1", "knn20", "knn20w", "logreg"}
    assert results["logreg"].accuracy == 1.0 and results["logreg"].fold_balanced_accuracy == (1.0,) * 5


def test_logistic_regression_standardises_features_of_any_scale():
    """Measurements mix units (area in px^2, circularity near 1): fitted raw, the L2 penalty keeps
    the weight of a feature in small units too small to use it."""
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 50)
    features = np.column_stack([1e-4 * (rng.normal(size=100) + 4 * targets), 1e3 * rng.normal(size=100)])
    results = evaluate(features, targets, ["a", "b"], make_folds(targets, "5-fold", seed=0))
    assert results["logreg"].balanced_accuracy > 0.95


def test_logistic_regression_weighs_a_rare_class_as_much_as_a_common_one():
    """180 cells of N(0, 1) and 20 of N(1.5, 1): classes weighed equally put the boundary near
    0.75, where 77 % of the rare class lies above it; weighed by count it moves to about 2.2
    (recall near 25 %). Chula's classes are as uneven."""
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], [180, 20])
    features = (rng.normal(size=200) + 1.5 * targets)[:, None]
    results = evaluate(features, targets, ["common", "rare"], make_folds(targets, "5-fold", seed=0))
    assert results["logreg"].per_class["rare"].recall > 0.6
    assert results["logreg"].balanced_accuracy > 0.7


def test_stratified_folds_test_every_sample_once_with_every_class():
    targets = np.repeat([0, 1], [10, 25])
    folds = make_folds(targets, "5-fold")
    tested = np.concatenate([test for _, test in folds])
    assert len(folds) == 5 and sorted(tested) == list(range(35))
    assert all(set(targets[test]) == {0, 1} for _, test in folds)


def test_folds_by_image_never_split_an_image():
    targets = np.tile([0, 1, 2], 12)
    groups = np.repeat([f"smear{i}" for i in range(6)], 6)
    folds = make_folds(targets, "by-image", groups)
    assert len(folds) == 5
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([test for _, test in folds])) == list(range(36))
    assert len(make_folds(targets, "by-image", np.repeat(["a", "b"], 18))) == 2  # as many folds as images
    with pytest.raises(EvaluationError, match="each sample's image"):
        make_folds(targets, "by-image")


def test_feature_sets_are_cached_under_a_key(tmp_path):
    features = FeatureSet(np.eye(3, dtype=np.float32), np.array([0, 1, 1]), ("a", "b"), np.array(["x", "x", "y"]))
    path = tmp_path / "run.cls.npz"
    features.save(path, "model 1|data")
    loaded = FeatureSet.load(path, "model 1|data")
    assert np.array_equal(loaded.features, features.features) and loaded.class_names == ("a", "b")
    assert loaded.groups.tolist() == ["x", "x", "y"]
    assert FeatureSet.load(path, "model 2|data") is None
    assert FeatureSet.load(tmp_path / "absent.npz", "model 1|data") is None


def test_point_labels_read_as_rows_and_columns(tmp_path):
    path = tmp_path / "1.txt"
    path.write_text("594 95 0\n601 151 4\n\n")
    points, classes = read_point_labels(path)
    assert points.tolist() == [[95, 594], [151, 601]] and classes.tolist() == [0, 4]
    # As Notepad saves it (a byte-order mark, CRLF), with column names and a comment: the same cells.
    path.write_bytes("\ufeffx y class_id\r\n594 95 0  # a target cell?\r\n# checked twice\r\n601 151 4\r\n".encode())
    again = read_point_labels(path)
    assert again[0].tolist() == points.tolist() and again[1].tolist() == classes.tolist()


@pytest.mark.parametrize("line, says", [("594 95", "is not 'x y class_id'"), ("594 95 3.7", "a whole number from 0"),
                                        ("594 95 -1", "a whole number from 0"), ("nan 95 1", "a finite x and y"),
                                        ("594 95 inf", "a whole number from 0"), ("594 95 1e30", "a whole number"),
                                        ("594 ninety 1", "is not 'x y class_id'"), ("x 95 1", "is not 'x y")])
@pytest.mark.parametrize("line_number", [1, 2])
def test_a_point_label_line_that_cannot_be_a_cell_is_refused_with_its_file_and_line(tmp_path, line, says,
                                                                                     line_number):
    path = tmp_path / "1.txt"
    path.write_text(f"{line}\n601 151 4\n" if line_number == 1 else f"601 151 4\n{line}\n")
    with pytest.raises(ValueError, match=rf"1.txt, line {line_number}: '{line}' .*{says}"):
        read_point_labels(path)
    path.write_text("594 95 0\n", encoding="utf-16")  # Notepad's "Unicode"
    with pytest.raises(ValueError, match=r"1.txt is not UTF-8 or ASCII text \(saved as 'Unicode', UTF-16\?\)"):
        read_point_labels(path)


def test_at_most_so_many_cells_of_each_class_are_kept_the_same_ones_for_a_seed():
    classes = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 6)
    keep = _subsample_per_class(classes, 4, seed=0)
    assert {name: int(keep[classes == name].sum()) for name in "abc"} == {"a": 4, "b": 3, "c": 4}
    np.testing.assert_array_equal(_subsample_per_class(classes, 4, seed=0), keep)
    assert not np.array_equal(_subsample_per_class(classes, 4, seed=1), keep)
    assert _subsample_per_class(classes, None, seed=0).all()
