"""export_cells_csv: a real smear's table goes out and comes back with pandas unchanged."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _layers import labels_layer
from napari.layers import Labels
from skimage.io import imread

from napari_reddino import cell_export, measure_cells, segment_cells
from napari_reddino.atomic_files import NotReplacedError, PartlyWrittenError
from napari_reddino.cell_embeddings import store_embeddings
from napari_reddino.cell_export import export_cells_csv, summary_path
from napari_reddino.cell_table import ANALYSIS_COLUMNS, PREDICTED_CLASSES

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smear_table() -> pd.DataFrame:
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    return measure_cells(segment_cells(image), image)


def analysed_layer(table: pd.DataFrame, name: str = "1 cells", **metadata) -> Labels:
    """A cells layer as the map widget leaves it: measured, embedded, mapped, labelled, predicted."""
    rng = np.random.default_rng(0)
    n = len(table)
    features = table.copy()
    features["umap_x"] = rng.normal(size=n).astype(np.float32)
    features["umap_y"] = rng.normal(size=n).astype(np.float32)
    features["manual_label"] = np.where(np.arange(n) % 3 == 0, "target cell", "")
    features["predicted_class"] = np.where(np.arange(n) % 2 == 0, "target cell", "normal")
    features["prediction_probability"] = rng.uniform(0.5, 1, size=n).astype(np.float32)
    features["p_normal"] = rng.uniform(size=n).astype(np.float32)
    layer = labels_layer(features, name, **metadata)
    ids = np.sort(table["label"].to_numpy())  # embeddings are stored in ascending label order
    store_embeddings(layer, ids, rng.normal(size=(n, 16)), model_id="reddino-small", fingerprint="f")
    return layer


def test_the_csv_reads_back_column_by_column(tmp_path, smear_table):
    layer = analysed_layer(smear_table)
    written = export_cells_csv(tmp_path / "cells.csv", layer)
    assert written == tmp_path / "cells.csv"
    back = pd.read_csv(written)
    features = layer.features.drop(columns="index")
    assert list(back.columns) == ["layer", "image", "label", *features.columns.drop("label"), "model_id"]
    assert (back["layer"] == "1 cells").all()
    assert (back["image"].astype(str) == "1").all()  # "1" (from 1.jpg) reads back as a number
    assert (back["model_id"] == "reddino-small").all()
    for column in features.columns:
        original, read = features[column], back[column]
        if column == "manual_label":  # an unlabelled cell is an empty field: NaN to pandas
            assert read.fillna("").tolist() == original.tolist()
        else:
            assert read.dtype.kind == original.dtype.kind or original.dtype == np.float32, column
            np.testing.assert_array_equal(read.to_numpy(), original.to_numpy(), err_msg=column)


def test_layers_are_stacked_with_every_analysis_column(tmp_path, smear_table):
    mapped = analysed_layer(smear_table, source_image="smear 1.jpg")
    measured_only = labels_layer(smear_table.head(5), "26 cells")
    back = pd.read_csv(export_cells_csv(tmp_path / "cells.csv", [mapped, measured_only]))
    assert len(back) == len(smear_table) + 5
    assert back["image"].tolist() == ["smear 1.jpg"] * len(smear_table) + ["26"] * 5
    tail = back.tail(5)
    assert tail[list(ANALYSIS_COLUMNS) + ["p_normal", "model_id"]].isna().all().all()
    assert tail["label"].tolist() == smear_table["label"].head(5).tolist()
    only_measured = pd.read_csv(export_cells_csv(tmp_path / "one.csv", measured_only))
    assert list(only_measured.columns[-6:]) == [*ANALYSIS_COLUMNS, "model_id"]


def test_columns_keep_one_order_whether_the_head_predicted_before_or_after_the_map(tmp_path, smear_table):
    mapped_first = analysed_layer(smear_table)
    predicted_first = analysed_layer(smear_table, name="2 cells")
    late = ["umap_x", "umap_y", "manual_label"]  # as reddino-analyse leaves them: a head, no map
    features = predicted_first.features
    predicted_first.features = features[[c for c in features.columns if c not in late]].copy()
    predicted_first.features["p_target cell"] = np.float32(0.5)
    for layer in (mapped_first, predicted_first):
        back = pd.read_csv(export_cells_csv(tmp_path / f"{layer.name}.csv", layer))
        probabilities = ["p_normal", "p_target cell"] if layer is predicted_first else ["p_normal"]
        assert list(back.columns[-len(ANALYSIS_COLUMNS) - len(probabilities) - 1:]) == [
            *ANALYSIS_COLUMNS, *probabilities, "model_id"]
    assert back["umap_x"].isna().all() and back["manual_label"].isna().all()
    # A lab's own column that starts with p_ stays among the layer's columns when the head's
    # classes are known; the head's probabilities go last.
    mapped_first.features = mapped_first.features.assign(p_value=0.01)
    mapped_first.metadata[PREDICTED_CLASSES] = ["normal", "target cell"]
    back = pd.read_csv(export_cells_csv(tmp_path / "own_p.csv", mapped_first))
    assert list(back.columns[-len(ANALYSIS_COLUMNS) - 2:]) == [*ANALYSIS_COLUMNS, "p_normal", "model_id"]
    assert list(back.columns).index("p_value") < list(back.columns).index("umap_x")
    unpredicted = labels_layer(smear_table.assign(p_value=0.01), "never predicted")
    back = pd.read_csv(export_cells_csv(tmp_path / "unpredicted.csv", unpredicted))
    assert list(back.columns[-len(ANALYSIS_COLUMNS) - 2:]) == ["p_value", *ANALYSIS_COLUMNS, "model_id"]


def test_an_existing_file_is_replaced_only_when_asked(tmp_path, smear_table):
    path = tmp_path / "cells.csv"
    path.write_text("keep me")
    layer = analysed_layer(smear_table)
    with pytest.raises(FileExistsError, match="cells.csv"):
        export_cells_csv(path, layer)
    assert path.read_text() == "keep me"
    export_cells_csv(path, layer, overwrite=True)
    assert len(pd.read_csv(path)) == len(smear_table)


def test_a_table_named_like_its_embeddings_file_is_refused_before_writing(tmp_path, smear_table):
    with pytest.raises(ValueError, match=r"the embeddings would both be cells.npz; name the table .csv"):
        export_cells_csv(tmp_path / "cells.npz", analysed_layer(smear_table), embeddings_path=tmp_path / "cells.npz")
    assert list(tmp_path.iterdir()) == []


def test_written_files_are_readable_like_any_new_file_not_private(tmp_path, smear_table):
    umask = os.umask(0o022)
    os.umask(umask)
    written = export_cells_csv(tmp_path / "cells.csv", analysed_layer(smear_table), embeddings_path=tmp_path / "cells.npz")
    for path in (written, tmp_path / "cells.npz"):  # mkstemp alone would make them 0600
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_a_failing_write_leaves_the_old_file(tmp_path, smear_table, monkeypatch):
    path = tmp_path / "cells.csv"
    path.write_text("keep me")

    def write_half_then_fail(self, handle, **_):
        handle.write(b"image,label\n1,")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_cells_csv(path, analysed_layer(smear_table), overwrite=True)
    assert path.read_text() == "keep me"
    assert os.listdir(tmp_path) == ["cells.csv"]


def test_embeddings_go_out_in_csv_order_with_their_ids(tmp_path, smear_table):
    first = analysed_layer(smear_table)
    second = analysed_layer(smear_table.iloc[::-1].head(4), name="26 cells")  # rows not in label order
    export_cells_csv(tmp_path / "cells.csv", [first, second], embeddings_path=tmp_path / "cells.npz")
    table = pd.read_csv(tmp_path / "cells.csv")
    with np.load(tmp_path / "cells.npz", allow_pickle=False) as saved:
        assert saved["layer"].tolist() == table["layer"].tolist()
        assert saved["image"].tolist() == table["image"].astype(str).tolist()
        assert saved["label"].tolist() == table["label"].tolist()
        assert set(saved["model_id"]) == {"reddino-small"}
        for layer, rows in ((first, saved["image"] == "1"), (second, saved["image"] == "26")):
            record = layer.metadata["reddino_embeddings"]
            expected = record["embeddings"][np.searchsorted(record["label_ids"], saved["label"][rows])]
            np.testing.assert_array_equal(saved["embedding"][rows], expected)


def test_a_cell_without_an_embedding_is_in_the_csv_but_not_in_the_embeddings(tmp_path, smear_table):
    layer = analysed_layer(smear_table)
    record = layer.metadata["reddino_embeddings"]
    ids, vectors = record["label_ids"], record["embeddings"]
    kept = np.arange(len(ids)) != 5  # a cell drawn by hand since Embed cells ran, among the others' ids
    store_embeddings(layer, ids[kept], vectors[kept], model_id="reddino-small", fingerprint="f")
    export_cells_csv(tmp_path / "cells.csv", layer, embeddings_path=tmp_path / "cells.npz")
    written = pd.read_csv(tmp_path / "cells.csv", keep_default_na=False)
    assert written["label"].tolist() == smear_table["label"].tolist()
    embedded = written["label"].isin(ids[kept])
    assert set(written.loc[embedded, "model_id"]) == {"reddino-small"} and written.loc[~embedded, "model_id"].tolist() == [""]
    with np.load(tmp_path / "cells.npz") as saved:
        np.testing.assert_array_equal(saved["label"], ids[kept])  # no vector borrowed from the next cell for it
        np.testing.assert_array_equal(saved["embedding"], vectors[kept].astype(np.float32))


def test_embeddings_need_every_layer_embedded_and_an_npz_name(tmp_path, smear_table):
    bare = labels_layer(smear_table, "26 cells")
    with pytest.raises(ValueError, match="'26 cells'"):
        export_cells_csv(tmp_path / "cells.csv", [analysed_layer(smear_table), bare], embeddings_path=tmp_path / "e.npz")
    with pytest.raises(ValueError, match=".npz"):
        export_cells_csv(tmp_path / "cells.csv", analysed_layer(smear_table), embeddings_path=tmp_path / "e.npy")
    wider = analysed_layer(smear_table)
    ids = wider.metadata["reddino_embeddings"]["label_ids"]
    store_embeddings(wider, ids, np.zeros((len(ids), 768), np.float32), model_id="reddino-base", fingerprint="f")
    with pytest.raises(ValueError, match=r"embeddings differ in size \(\[16, 768\]\)"):
        export_cells_csv(tmp_path / "cells.csv", [analysed_layer(smear_table), wider], embeddings_path=tmp_path / "e.npz")
    assert os.listdir(tmp_path) == []


def test_a_file_that_cannot_be_replaced_leaves_the_table_and_summary_as_they_were(tmp_path, smear_table,
                                                                                  monkeypatch):
    # A summary open in a spreadsheet: the new table must not stand beside the old summary.
    csv, npz, summary = tmp_path / "cells.csv", tmp_path / "cells.npz", tmp_path / "cells_summary.csv"
    export_cells_csv(csv, analysed_layer(smear_table), embeddings_path=npz, summary_path=summary)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    replace = os.replace

    def refuse_the_summary(source, target):
        if Path(target).name == summary.name:
            raise PermissionError(13, "Permission denied")
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_summary)
    fewer = analysed_layer(smear_table.iloc[:5])
    with pytest.raises(NotReplacedError, match=r"^cells_summary.csv could not be replaced \(Permission denied\); it "
                                               r"and cells.csv and cells.npz, put back, are as before$"):
        export_cells_csv(csv, fewer, embeddings_path=npz, summary_path=summary, overwrite=True)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # no temporary left either
    (tmp_path / "new").mkdir()  # files that were not there before are removed again
    with pytest.raises(NotReplacedError, match="put back, are as before$"):
        export_cells_csv(tmp_path / "new" / "cells.csv", fewer, summary_path=tmp_path / "new" / "cells_summary.csv",
                         overwrite=True)
    assert list((tmp_path / "new").iterdir()) == []
    # Where the file system makes no hard links, what was replaced stays so, and is said.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    with pytest.raises(PartlyWrittenError, match=r"^cells.csv, cells.npz were written, but cells_summary.csv could "
                                                 r"not be replaced \(Permission denied\); cells_summary.csv is as "
                                                 r"before$"):
        export_cells_csv(csv, fewer, embeddings_path=npz, summary_path=summary, overwrite=True)
    assert len(pd.read_csv(csv)) == 5 and summary.read_bytes() == before["cells_summary.csv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*before, "new"])


def test_a_summary_written_meanwhile_by_another_run_is_not_replaced(tmp_path, smear_table, monkeypatch):
    # Two reddino-analyse runs given one folder, finishing at once: the check before the write passed for both.
    csv, summary = tmp_path / "cells.csv", tmp_path / "cells_summary.csv"
    as_table = cell_export._float32_as_float64

    def while_another_run_finishes(table):
        summary.write_text("the other run's")
        return as_table(table)

    monkeypatch.setattr(cell_export, "_float32_as_float64", while_another_run_finishes)
    with pytest.raises(FileExistsError):
        export_cells_csv(csv, analysed_layer(smear_table), summary_path=summary)
    assert summary.read_text() == "the other run's" and sorted(path.name for path in tmp_path.iterdir()) == [
        "cells_summary.csv"]


def test_a_folder_where_a_file_would_go_is_refused_before_anything_is_written(tmp_path, smear_table):
    (tmp_path / "cells_summary.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="cells_summary.csv is a folder; name a file to write"):
        export_cells_csv(tmp_path / "cells.csv", analysed_layer(smear_table), summary_path=summary_path(
            tmp_path / "cells.csv"), overwrite=True)
    assert os.listdir(tmp_path) == ["cells_summary.csv"]  # not cells.csv without its summary


def test_a_first_file_that_cannot_be_replaced_is_named_and_nothing_changes(tmp_path, smear_table, monkeypatch):
    csv = tmp_path / "cells.csv"
    csv.write_text("open in a spreadsheet")
    replace = os.replace

    def refuse_the_csv(source, target):
        if Path(target) == csv:
            raise PermissionError(13, "Permission denied", source, None, target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_csv)
    with pytest.raises(NotReplacedError, match=r"^cells.csv could not be replaced \(Permission denied\); it is as "
                                               r"before$") as error:  # the target named, not the temporary file
        export_cells_csv(csv, analysed_layer(smear_table), overwrite=True)
    assert error.value.errno == 13 and error.value.filename == str(csv)
    assert csv.read_text() == "open in a spreadsheet" and os.listdir(tmp_path) == ["cells.csv"]


def test_a_file_system_that_refuses_to_sync_folders_still_gets_every_file(tmp_path, smear_table, monkeypatch):
    csv = tmp_path / "cells.csv"
    csv.write_text("yesterday's")
    fsync = os.fsync

    def refuse_folders(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_folders)
    export_cells_csv(csv, analysed_layer(smear_table), summary_path=summary_path(csv), overwrite=True)
    assert len(pd.read_csv(csv)) == len(smear_table) and len(pd.read_csv(summary_path(csv))) == 1


def test_two_layers_of_one_smear_keep_their_cells_apart_by_layer(tmp_path, smear_table):
    """A smear re-segmented beside its labelled layer: the same label ids, one image."""
    first = analysed_layer(smear_table)
    again = analysed_layer(smear_table.head(3), name="1 cells [1]", source_image="1")
    export_cells_csv(tmp_path / "cells.csv", [first, again], embeddings_path=tmp_path / "cells.npz")
    table = pd.read_csv(tmp_path / "cells.csv", dtype={"image": str})
    assert set(table["image"]) == {"1"} and table["label"].duplicated().sum() == 3
    assert not table.duplicated(["layer", "label"]).any()
    assert table["layer"].tolist() == ["1 cells"] * len(smear_table) + ["1 cells [1]"] * 3
    with np.load(tmp_path / "cells.npz", allow_pickle=False) as saved:
        assert saved["layer"].tolist() == table["layer"].tolist()
        rows = saved["layer"] == "1 cells [1]"
        record = again.metadata["reddino_embeddings"]
        expected = record["embeddings"][np.searchsorted(record["label_ids"], saved["label"][rows])]
        np.testing.assert_array_equal(saved["embedding"][rows], expected)
