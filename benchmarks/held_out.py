"""How far the Cell map's held-out check (``CellClassifier.held_out_recall``) trusts a head,
against how it does on smears it has not seen: Chula RBC-12, from an eval's cached features.

A few Chula smears are drawn at random and half of their annotated cells labelled (at random,
not by lasso); the head is fitted among all their annotated cells, as the Cell map fits it. The
held-out check's mean recall over classes is set against the head's balanced accuracy on the
annotated cells of every other smear (classes it knows).

    python benchmarks/held_out.py /work/runs/eval29/chula.json
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from chula_head import load
from overlap_head import measurement_names

from napari_reddino.cell_classifier import DEFAULT_MEASUREMENTS, CellClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_json", type=Path, help="the --json path of a points-format reddino-train eval run")
    args = parser.parse_args()
    embeddings, measured = load(args.eval_json, "cls"), load(args.eval_json, "measurements")
    table = pd.DataFrame(measured["features"].astype(np.float64), columns=measurement_names())
    table["image"] = groups = measured["groups"]
    classes = np.array(measured["class_names"].tolist(), dtype=object)
    truth = classes[measured["targets"]]
    rng = np.random.default_rng(0)
    print("| labelled smears | labelled cells | held-out check (mean recall) | other smears (balanced accuracy) |")
    print("|---:|---:|---:|---:|")
    for n_smears in (5, 5, 10, 10, 20, 20, 40, 40):
        mapped = np.isin(groups, rng.choice(np.unique(groups), n_smears, replace=False))
        rows, others = np.flatnonzero(mapped), np.flatnonzero(~mapped)
        labels = np.where(rng.random(len(rows)) < 0.5, truth[rows], "").astype(object)
        measurements = table.iloc[rows].reset_index(drop=True)
        head = CellClassifier(list(classes)).fit(embeddings["features"][rows], labels, measurements=measurements,
                                                 measurement_columns=list(DEFAULT_MEASUREMENTS))
        recall = head.held_out_recall(embeddings["features"][rows], labels, measurements=measurements)
        check = "too few cells of a class" if recall is None else f"{np.mean(list(recall.values())):.3f}"
        predicted = head.predict(embeddings["features"][others], measurements=table.iloc[others].reset_index(drop=True))
        known = truth[others]
        accuracy = np.mean([np.mean(predicted[known == name] == name) for name in head.classes if (known == name).any()])
        print(f"| {n_smears} | {(labels != '').sum():,} | {check} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
