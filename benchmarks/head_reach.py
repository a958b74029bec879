"""Whether a head's reach (``CellClassifier.beyond_reach``) tells the smears where its
predictions go wrong: a head taught the annotated cells of the first five Chula smears (fitted
among all their cells, as the Cell map fits it) predicts the annotated cells of other smears;
a smear counts as beyond when most of its cells lie beyond the reach.

    python benchmarks/head_reach.py --model /work/runs/models/run27
"""

import argparse
import platform
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.io import imread

from napari_reddino import CellClassifier, cells_at_points, load_embedder, measure_cells, segment_cells
from reddino_train.eval_data import read_point_labels

CHULA = Path("/work/shared/data/chula_rbc12")
ASLAN = Path("/work/shared/data/aslan_bcd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model the plugin loads")
    args = parser.parse_args()
    embedder = load_embedder(args.model, device="cpu")

    def smear(path: Path):
        """Embeddings, measurements and annotated class ("" where none) of every cell."""
        image = imread(path)[..., :3]
        labels = segment_cells(image)
        table = measure_cells(labels, image).assign(layer=path.stem)
        vectors = embedder.embed(image, labels)[1]
        truth = np.full(len(table), "", dtype=object)
        label_file = CHULA / "Label" / f"{path.stem}.txt"
        if label_file.is_file():
            points, classes = read_point_labels(label_file)
            row = {label: i for i, label in enumerate(table["label"])}
            for hit, name in zip(cells_at_points(labels, points), classes):
                if hit:
                    truth[row[hit]] = str(name)
        return vectors, table, truth

    numbered = sorted(CHULA.glob("Dataset/*.jpg"), key=lambda path: int(path.stem))
    taught = [smear(path) for path in numbered[:5]]
    head = CellClassifier().fit(np.vstack([v for v, _, _ in taught]),
                                np.concatenate([y for _, _, y in taught]),
                                measurements=pd.concat([t for _, t, _ in taught], ignore_index=True))
    rows = []
    for path in numbered[5:40] + numbered[40::25] + sorted(ASLAN.glob("**/*.png"))[:5]:
        vectors, table, truth = smear(path)
        beyond = head.beyond_reach(vectors, measurements=table).mean()
        known = np.isin(truth, head.classes)
        right = (head.predict(vectors, measurements=table)[known] == truth[known]).sum()
        rows.append((path.parent.parent.name, beyond > 0.5, beyond, known.sum(), right))
    table = pd.DataFrame(rows, columns=["data", "beyond", "share", "annotated", "right"])
    print(f"{platform.machine()}; model {args.model}; head taught {sum((y != '').sum() for *_, y in taught)} "
          f"cells of Chula smears 1-5, reach {head.reach:.2f}")
    print("| smears | count | cells beyond reach (median) | annotated cells | predicted right |")
    print("|---|---:|---:|---:|---:|")
    for (data, beyond), group in table.groupby(["data", "beyond"]):
        annotated = group["annotated"].sum()
        right = f"{group['right'].sum() / annotated:.0%}" if annotated else "(no annotations)"
        print(f"| {data}, {'beyond' if beyond else 'within'} | {len(group)} | {group['share'].median():.0%} | "
              f"{annotated:,} | {right} |")


if __name__ == "__main__":
    main()
