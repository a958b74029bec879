"""``reddino-train prepare`` on real smears: crops and index, resume, bad files, patches."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.io import imread

from napari_reddino import cell_crops, measure_cells, segment_cells
from reddino_train.cli import main
import reddino_train.prepare as prepare_module
from reddino_train.prepare import (
    PrepareError,
    PrepareSettings,
    content_digest,
    prepare,
    read_index,
)

DATA = Path(__file__).parents[1] / "data"
SIZE = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two real smears (JPEG and PNG) and a truncated JPEG."""
    folder = tmp_path_factory.mktemp("sources")
    shutil.copy(DATA / "chula_rbc12" / "1.jpg", folder / "1.jpg")
    shutil.copy(DATA / "aslan_bcd" / "image-1.png", folder / "image-1.png")
    (folder / "broken.jpg").write_bytes((DATA / "chula_rbc12" / "26.jpg").read_bytes()[:2000])
    return folder


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "cells"
    report = prepare([sources], out, PrepareSettings(size=SIZE), progress=False)
    return out, report


def test_cells_become_crops_listed_in_the_index(prepared, sources):
    out, report = prepared
    assert report.written == ["1", "image-1"] and report.already_done == []
    rows = read_index(out)
    assert len(rows) == report.samples_written == report.samples_total > 20
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*.png"))
    assert sorted(row["file"] for row in rows) == files
    assert {row["source"] for row in rows} == {str(sources / "1.jpg"), str(sources / "image-1.png")}
    for row in rows:
        assert row["file"] == f"{row['file'].split('/')[0]}/{row['label']}.png"
        with Image.open(out / row["file"]) as crop:
            assert crop.size == (SIZE, SIZE) and crop.mode == "RGB"
        with Image.open(row["source"]) as smear:
            width, height = smear.size
        top, left, bottom, right = (int(row[key]) for key in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"))
        assert 0 < top < bottom < height and 0 < left < right < width  # border cells left out
        assert top <= float(row["centroid_y"]) < bottom and left <= float(row["centroid_x"]) < right
    journal = [line.split("\t") for line in (out / "done.txt").read_text().splitlines()]
    assert journal == [["1", str((sources / "1.jpg").resolve())], ["image-1", str((sources / "image-1.png").resolve())]]
    digests = [line.split("\t") for line in (out / "digests.txt").read_text().splitlines()]
    assert digests == [["1", content_digest(sources / "1.jpg")], ["image-1", content_digest(sources / "image-1.png")]]


def test_the_crop_shows_its_cell(prepared):
    out, _ = prepared
    row = read_index(out)[0]
    with Image.open(out / row["file"]) as crop:
        pixels = np.asarray(crop, dtype=float)
    centre, corner = pixels[12:20, 12:20].mean(axis=(0, 1)), pixels[:3, :3].mean(axis=(0, 1))
    assert centre[1] < corner[1] - 10  # the cell absorbs green; the slide around it does not


def test_unreadable_files_are_skipped_and_reported(prepared, sources):
    out, report = prepared
    assert [path for path, _ in report.skipped] == [sources / "broken.jpg"]
    assert "unreadable" in report.skipped[0][1]
    assert (out / "skipped.txt").read_text().startswith(f"{sources / 'broken.jpg'}\tunreadable")
    assert len((out / "skipped.txt").read_text().splitlines()) == len(report.skipped)  # one line per file


def test_rerun_skips_the_smears_done(sources, tmp_path):
    out = tmp_path / "cells"
    prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE), progress=False)
    first = {path: path.stat().st_mtime_ns for path in out.rglob("*.png")}
    report = prepare([sources], out, PrepareSettings(size=SIZE), progress=False)
    assert report.already_done == ["1"] and report.written == ["image-1"]
    assert {path: path.stat().st_mtime_ns for path in first} == first  # not rewritten
    assert {row["file"].split("/")[0] for row in read_index(out)} == {"1", "image-1"}
    again = prepare([sources], out, PrepareSettings(size=SIZE), progress=False)
    assert again.written == [] and again.samples_written == 0 and again.samples_total == report.samples_total


def test_a_smear_cut_short_is_redone(sources, tmp_path):
    out = tmp_path / "cells"
    prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE), progress=False)
    (out / "done.txt").write_text("")  # as if killed before the journal was written
    (out / "1" / "99999.png").write_bytes(b"left over")
    (out / ".partial-1").mkdir()  # and a second smear's folder half written
    (out / ".partial-1" / "3.png").write_bytes(b"half")
    report = prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE), progress=False)
    assert report.written == ["1"] and not (out / "1" / "99999.png").exists()
    assert len(read_index(out)) == report.samples_written == len(list((out / "1").glob("*.png")))
    assert sorted(path.name for path in out.iterdir()) == [".reddino-prepare.lock", "1", "digests.txt", "done.txt",
                                                           "index.csv", "prepare.json", "skipped.txt"]  # no .partial-1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_every_crop_is_on_disk_before_its_smear_counts_as_done(sources, tmp_path, monkeypatch):
    # A power cut after the journal line must not leave empty crops that no re-run cuts again.
    synced, real_fsync = [], os.fsync

    def recorded_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    out = tmp_path / "cells"
    prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE), progress=False)
    crops = sorted(path.name for path in (out / "1").glob("*.png"))
    assert len(crops) > 20
    assert sorted(path.name for path in synced if path.parent.name == ".partial-1" and path.suffix == ".png") == crops


def test_a_folder_prepare_did_not_write_is_never_replaced(tmp_path):
    (smear,) = _smear_copies(tmp_path, "src/1.jpg")
    out = tmp_path / "out"
    (out / "1").mkdir(parents=True)  # a folder of one's own, of a smear's name, in a reused --out
    (out / "1" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match=r"out/1 is where the crops of a smear go, and holds files that prepare "
                                           r"did not write; move it, or give --out an empty folder"):
        prepare([smear], out, PATCHES, progress=False)
    assert [path.name for path in out.iterdir()] == ["1"] and (out / "1" / "notes.txt").read_text() == "mine"


def test_smears_whose_names_cannot_name_a_folder_of_their_own_get_one(tmp_path):
    # "..png" and "...png" would name OUT and its parent; "done.txt.png" the journal; "A.png" and
    # "a.png" one folder where letter case does not count (macOS, Windows)
    names = ["src/..png", "src/...png", "src/done.txt.png", "src/A.png", "src/a.png"]
    smears = _smear_copies(tmp_path, *names)
    out = tmp_path / "run" / "out"
    report = prepare(smears, out, PATCHES, progress=False)
    assert len(report.written) == len(names) and report.skipped == []
    keys = {key.casefold() for key in report.written}
    assert len(keys) == len(names) and not any(key.startswith(".") for key in keys)
    assert {"a", "done.txt"} & keys == {"a"}
    assert sorted(set(_sources_in_index(out))) == sorted(str(smear) for smear in smears)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["out"]


def test_other_settings_in_the_same_folder_are_refused(prepared, sources):
    out, _ = prepared
    with pytest.raises(PrepareError, match="other settings.*size: 32 -> 48"):
        prepare([sources], out, PrepareSettings(size=48), progress=False)


def test_a_default_size_given_by_its_number_is_the_same_setting(tmp_path):
    (smear,) = _smear_copies(tmp_path, "src/1.jpg")
    prepare([smear], tmp_path / "tiles", PATCHES, progress=False)  # tiles as cut: 200 px
    spelt_out = PrepareSettings(mode="patches", patch_size=200, size=200)
    assert prepare([smear], tmp_path / "tiles", spelt_out, progress=False).already_done == ["1"]
    with pytest.raises(PrepareError, match=r"size: None -> 100"):
        prepare([smear], tmp_path / "tiles", PrepareSettings(mode="patches", patch_size=200, size=100), progress=False)


def test_a_bad_start_writes_nothing_and_a_corrected_one_runs(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", str(sources), "--out", str(out), "--margin", "-1", "--size", "32"]) == 2
    assert "--margin -1.0: give a fraction of the cell's box on each side, from 0 to 4" in capsys.readouterr().err
    assert main(["prepare", str(sources), "--out", str(out), "--size", "100000"]) == 2  # once asked for 14.7 TB
    assert "--size 100000 px; give at most 2,048 (RedDino's crops are 224)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(out), "--size", "32"]) == 2
    assert not out.exists()  # no settings were written that would refuse the corrected run
    assert main(["prepare", str(sources), "--out", str(out), "--size", "32"]) == 1  # ran; broken.jpg skipped
    assert (out / "index.csv").is_file()


def test_a_folder_from_before_a_setting_existed_takes_its_default(sources, tmp_path):
    out = tmp_path / "cells"
    prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE), progress=False)
    saved = json.loads((out / "prepare.json").read_text())
    del saved["crop_scale"]
    (out / "prepare.json").write_text(json.dumps(saved))
    assert prepare([sources], out, PrepareSettings(size=SIZE), progress=False).already_done == ["1"]
    with pytest.raises(PrepareError, match="crop_scale: 'cell' -> 'smear'"):
        prepare([sources], out, PrepareSettings(size=SIZE, crop_scale="smear"), progress=False)


def test_a_folder_cut_with_the_defaults_of_before_resumes_as_it_began_and_a_new_one_takes_the_plugins(sources,
                                                                                                    tmp_path):
    out = tmp_path / "cells"
    prepare([sources / "1.jpg"], out, PrepareSettings(size=SIZE, crop_mode="context", crop_scale="cell"),
            progress=False)  # what no option gave until 2026-12-07
    report = prepare([sources], out, PrepareSettings(size=SIZE), progress=False)  # resumed after an upgrade
    assert report.already_done == ["1"] and report.written == ["image-1"]
    assert (json.loads((out / "prepare.json").read_text())["crop_mode"],
            json.loads((out / "prepare.json").read_text())["crop_scale"]) == ("context", "cell")
    with pytest.raises(PrepareError, match="crop_mode: 'context' -> 'masked'"):
        prepare([sources], out, PrepareSettings(size=SIZE, crop_mode="masked"), progress=False)
    fresh = tmp_path / "fresh"
    prepare([sources / "1.jpg"], fresh, PrepareSettings(size=SIZE), progress=False)
    saved = json.loads((fresh / "prepare.json").read_text())
    assert (saved["crop_mode"], saved["crop_scale"]) == ("masked", "smear")


@pytest.mark.parametrize("options, crops, pixel_size_um", [
    ([], {"mode": "masked", "scale": "smear"}, None),  # as the plugin cuts cells
    (["--crop-scale", "cell"], {"mode": "masked", "scale": "cell"}, None),
    (["--crop-mode", "context"], {"mode": "context", "scale": "smear"}, None),
    (["--pixel-size-um", "0.2", "--margin", "0.5"], {"mode": "masked", "scale": "smear", "margin": 0.5}, 0.2),
])
def test_every_crop_is_the_plugins_crop_of_that_cell(sources, tmp_path, options, crops, pixel_size_um):
    out = tmp_path / "cells"
    assert main(["prepare", str(sources / "1.jpg"), "--out", str(out), "--size", str(SIZE), *options]) == 0
    saved = json.loads((out / "prepare.json").read_text())
    assert (saved["crop_mode"], saved["crop_scale"]) == (crops["mode"], crops["scale"])
    image = imread(sources / "1.jpg")
    ids, expected = cell_crops(image, segment_cells(image, pixel_size_um=pixel_size_um), SIZE, **crops)
    rows = read_index(out)
    assert len(rows) > 80
    for row in rows:
        crop = expected[np.searchsorted(ids, int(row["label"]))]
        with Image.open(out / row["file"]) as written:
            np.testing.assert_array_equal(np.asarray(written), np.rint(crop * 255))


def test_cells_cut_by_a_round_field_stop_are_left_out_like_border_cells(tmp_path):
    image = imread(DATA / "chula_rbc12" / "1.jpg")
    rows, cols = np.indices(image.shape[:2])
    image[np.hypot(rows - 240, cols - 320) > 216] = 0  # an eyepiece photograph's dark surround
    (tmp_path / "src").mkdir()
    Image.fromarray(image).save(tmp_path / "src" / "round.png")
    prepare([tmp_path / "src"], tmp_path / "out", PrepareSettings(size=SIZE), progress=False)
    table = measure_cells(segment_cells(image), image)
    whole = table.loc[~table["touches_border"], "label"].tolist()
    assert sorted(int(row["label"]) for row in read_index(tmp_path / "out")) == whole
    assert len(whole) < len(table) - 10  # the field's edge cut some


def test_patches_tile_the_smear(sources, tmp_path):
    out = tmp_path / "patches"
    report = prepare([sources / "1.jpg"], out, PrepareSettings(mode="patches", patch_size=200), progress=False)
    rows = read_index(out)
    assert len(rows) == report.samples_written == (480 // 200) * (640 // 200)
    assert [(int(r["bbox_min_y"]), int(r["bbox_min_x"])) for r in rows[:4]] == [(0, 0), (0, 200), (0, 400), (200, 0)]
    with Image.open(out / rows[1]["file"]) as tile, Image.open(sources / "1.jpg") as smear:
        assert np.array_equal(np.asarray(tile), np.asarray(smear)[0:200, 200:400])
    larger = prepare([sources / "1.jpg"], tmp_path / "large", PrepareSettings(mode="patches", patch_size=500),
                     progress=False)  # 480 px high: no patch fits, which is said, not left at "0 images"
    assert larger.written == [] and larger.skipped == [(sources / "1.jpg", "640x480 px holds no 500 px patch")]
    # An option of the other mode would do nothing (and later refuse a run that gave it otherwise).
    assert main(["prepare", str(sources), "--out", str(tmp_path / "x"), "--mode", "patches", "--crop-mode", "masked",
                 "--pixel-size-um", "0.2"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(PrepareError, match="^--patch-size is for --mode patches only, not for --mode cells$"):
        PrepareSettings(patch_size=200)
    # A folder whose settings recorded such an option, as earlier versions did, resumes.
    saved = json.loads((out / "prepare.json").read_text())
    (out / "prepare.json").write_text(json.dumps(saved | {"margin": 0.5, "crop_mode": "masked"}))
    assert prepare([sources / "1.jpg"], out, PrepareSettings(mode="patches", patch_size=200),
                   progress=False).already_done == ["1"]


PATCHES = PrepareSettings(mode="patches", patch_size=200)  # no segmentation: quick


def _smear_copies(tmp_path, *relative: str) -> list[Path]:
    paths = [tmp_path / name for name in relative]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "chula_rbc12" / "1.jpg", path)
    return paths


def _sources_in_index(out) -> list[str]:
    return [row["source"] for row in read_index(out)]


def test_names_no_journal_line_holds_as_they_are_are_prepared_or_skipped_with_the_reason(tmp_path, capsys):
    # "café" in Latin-1 from a Windows share, a tab and line breaks in a name: each stopped the run
    latin, tab, line_break = os.fsdecode(b"src/caf\xe9.jpg"), "src/a\tb.jpg", "src/c\nd.jpg"
    smears = _smear_copies(tmp_path, latin, tab, line_break, "src/e.jpg", "src/f\x85g.jpg")
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "src"), "--out", str(out), "--mode", "patches", "--patch-size", "200"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"  {tmp_path / 'src' / 'c'}\\nd.jpg: its path holds a line break" in err  # on one line
    report = prepare([tmp_path / "src"], out, PATCHES, progress=False)
    keys = sorted(report.already_done)
    assert len(keys) == 3 and report.written == [] and [path for path, _ in report.skipped] == [smears[2], smears[4]]
    assert keys[0].startswith("a_b-") and keys[1].startswith("caf_-") and keys[2] == "e"
    rows = read_index(out)  # UTF-8 throughout: a spreadsheet or pandas reads it
    assert report.samples_total == len(rows) == 3 * len(list((out / "e").glob("*.png")))
    assert {row["source"] for row in rows} == {str(tmp_path / "src" / name) for name in ("caf\\xe9.jpg", "a\tb.jpg",
                                                                                         "e.jpg")}
    why = "its path holds a line break, which the journal of smears done cannot hold; rename it"
    assert (out / "skipped.txt").read_text(encoding="utf-8") == (f"{tmp_path / 'src' / 'c'}\\nd.jpg\t{why}\n"
                                                                 f"{tmp_path / 'src' / 'f'}\\x85g.jpg\t{why}\n")


def test_same_stems_in_folders_of_the_same_name_are_both_prepared(tmp_path):
    first, second = _smear_copies(tmp_path, "lab1/images/1.jpg", "lab2/images/1.jpg")
    out = tmp_path / "out"
    report = prepare([first.parent, second.parent], out, PATCHES, progress=False)
    assert len(report.written) == 2 and report.already_done == [] and report.written[0] == "1"
    assert sorted(set(_sources_in_index(out))) == [str(first), str(second)]
    assert report.samples_total == 2 * 6


def test_a_later_run_with_another_source_keeps_the_keys_and_rows(tmp_path):
    first, second = _smear_copies(tmp_path, "a/1.jpg", "b/1.jpg")
    out = tmp_path / "out"
    prepare([first.parent], out, PATCHES, progress=False)
    report = prepare([first.parent, second.parent], out, PATCHES, progress=False)
    assert report.already_done == ["1"] and len(report.written) == 1 and report.written[0].startswith("1-")
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == sorted(["1", report.written[0]])
    assert sorted(_sources_in_index(out)) == sorted([str(first)] * 6 + [str(second)] * 6)
    # and the other way round: the smear already done under the stem keeps it
    again = prepare([second.parent, first.parent], out, PATCHES, progress=False)
    assert again.written == [] and sorted(again.already_done) == sorted(["1", report.written[0]])


def test_a_smear_whose_folder_was_removed_is_redone_once(tmp_path):
    (smear,) = _smear_copies(tmp_path, "src/1.jpg")
    out = tmp_path / "out"
    prepare([smear], out, PATCHES, progress=False)
    shutil.rmtree(out / "1")
    report = prepare([smear], out, PATCHES, progress=False)
    assert report.written == ["1"] and report.samples_total == 6
    assert (out / "done.txt").read_text().splitlines() == [f"1\t{smear.resolve()}"]
    assert prepare([smear, smear.parent], out, PATCHES, progress=False).samples_total == 6  # listed twice: once


def test_a_journal_from_before_sources_were_kept_still_counts(tmp_path):
    (smear,) = _smear_copies(tmp_path, "src/1.jpg")
    out = tmp_path / "out"
    prepare([smear], out, PATCHES, progress=False)
    (out / "done.txt").write_text("1\n")
    assert prepare([smear], out, PATCHES, progress=False).already_done == ["1"]


def test_cli_prepares_resumes_and_reports(sources, tmp_path, capsys):
    out = str(tmp_path / "cells")
    args = ["prepare", str(sources / "1.jpg"), str(sources / "broken.jpg"), "--out", out, "--size", str(SIZE)]
    assert main(args) == 1  # a file was skipped
    captured = capsys.readouterr()
    assert "1 smears done now" in captured.out and "broken.jpg" in captured.err
    assert main(args) == 1  # retried, and skipped again
    assert "0 smears done now (0 images), 1 done before" in capsys.readouterr().out
    assert main(args[:2] + args[3:]) == 0  # without it: nothing skipped
    assert main([*args[:-1], "48"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_smear_with_a_space_in_its_name_counts_as_done_on_the_next_run(tmp_path):
    source = tmp_path / "sources" / "Slide 1.jpg"
    source.parent.mkdir()
    shutil.copy(DATA / "chula_rbc12" / "1.jpg", source)
    first = prepare([source.parent], tmp_path / "cells", PrepareSettings(size=SIZE), progress=False)
    again = prepare([source.parent], tmp_path / "cells", PrepareSettings(size=SIZE), progress=False)
    assert (first.written, again.written, again.already_done) == (["Slide 1"], [], ["Slide 1"])


def test_a_smear_too_small_for_the_pixel_size_is_skipped_and_the_rest_prepared(sources, tmp_path):
    # At 0.2 µm per pixel a red cell is 38 px across: a 30 px thumbnail cannot hold one.
    mixed = shutil.copytree(sources, tmp_path / "mixed")
    Image.fromarray(imread(sources / "1.jpg")[:30, :30]).save(mixed / "a-thumbnail.png")
    report = prepare([mixed], tmp_path / "cells", PrepareSettings(size=SIZE, pixel_size_um=0.2), progress=False)
    assert sorted(report.written) == ["1", "image-1"]
    reasons = dict(report.skipped)
    assert reasons[mixed / "a-thumbnail.png"].startswith("With a pixel size of 0.2 µm, a red cell would be 38 px")


def test_settings_are_fixed_by_the_first_smear_written_not_by_a_run_that_wrote_none(sources, tmp_path):
    out = tmp_path / "cells"
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    shutil.copy(sources / "broken.jpg", only_broken)
    assert prepare([only_broken], out, PrepareSettings(size=48), progress=False).written == []
    assert prepare([sources], out, PrepareSettings(size=SIZE), progress=False).written  # other settings: taken
    with pytest.raises(PrepareError, match="other settings.*size: 32 -> 48"):
        prepare([sources], out, PrepareSettings(size=48), progress=False)


def test_an_output_that_cannot_be_written_and_ctrl_c_are_said_in_a_sentence(sources, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("mine")
    assert main(["prepare", str(sources), "--out", str(tmp_path / "a-file"), "--size", "32"]) == 2
    assert capsys.readouterr().err.startswith(f"reddino-train prepare: cannot write in {tmp_path / 'a-file'} (File "
                                              "exists); the smears done before are kept")

    out = tmp_path / "project" / "out"
    for failed, said in ((sources / "1.jpg", f"cannot read {sources / '1.jpg'}"),  # a smear's share gone meanwhile
                         (out / ".partial-1", f"cannot write in {out}"),
                         (tmp_path / "project", f"cannot write in {out}")):  # a parent of OUT that cannot be made

        def failing(*_, **__):
            raise OSError(errno.EIO, "Input/output error", str(failed))

        monkeypatch.setattr(prepare_module, "prepare", failing)
        assert main(["prepare", str(sources), "--out", str(out), "--size", "32"]) == 2
        assert capsys.readouterr().err.startswith(f"reddino-train prepare: {said} (Input/output error); the smears "
                                                  "done before are kept")
    monkeypatch.undo()

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("reddino_train.prepare.prepare", interrupted)
    assert main(["prepare", str(sources), "--out", str(tmp_path / "out"), "--size", "32"]) == 130
    assert capsys.readouterr().err == ("\nreddino-train prepare: interrupted; the smears done so far are kept, and the "
                                       "same command goes on from there\n")


def test_sigterm_stops_prepare_as_ctrl_c_does_with_the_index_of_the_smears_done(sources, tmp_path, capsys,
                                                                                 terminate_after):
    # A scheduler's time limit: the smear done is journalled and indexed, the next one is not.
    terminate_after(prepare_module, "_sync", call=2)  # as the second smear's crops are written
    out = tmp_path / "out"
    assert main(["prepare", str(sources), "--out", str(out), "--size", "32"]) == 130
    assert capsys.readouterr().err.endswith("\nreddino-train prepare: interrupted; the smears done so far are kept, "
                                            "and the same command goes on from there\n")
    assert {Path(row["source"]).name for row in read_index(out)} == {"1.jpg"}
    assert main(["prepare", str(sources), "--out", str(out), "--size", "32"]) == 1  # broken.jpg: skipped
    assert {Path(row["source"]).name for row in read_index(out)} == {"1.jpg", "image-1.png"}


def test_smears_inside_the_output_folder_are_said_to_be_there(sources, tmp_path):
    folder = shutil.copytree(sources, tmp_path / "smears")
    with pytest.raises(PrepareError, match=rf"^every image under {folder} lies inside the output folder {folder}, "
                                           "where the crops go"):
        prepare([folder], folder, PATCHES, progress=False)


def test_a_second_prepare_on_the_folder_is_refused_until_the_first_ends(sources, tmp_path, capsys):
    # A SLURM array's jobs given one --out each read the journal, then replaced each other's smears.
    out = tmp_path / "patches"
    holder = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from reddino_train.run_lock import hold_prepare_folder
        with hold_prepare_folder(Path(sys.argv[1])):
            print("holding", flush=True)
            time.sleep(120)
    """)
    command = ["prepare", str(sources / "1.jpg"), "--out", str(out), "--mode", "patches", "--patch-size", "200"]
    with subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout.readline() == "holding\n"
        assert main(command) == 2
        assert (f"{out} is in use by another reddino-train prepare (pid {child.pid} on "
                in capsys.readouterr().err)
        assert [path.name for path in out.iterdir()] == [".reddino-prepare.lock"]
        child.kill()
    assert main(command) == 0 and len(read_index(out)) == 6


def test_smears_whose_folder_was_renamed_count_as_done_under_their_keys(tmp_path):
    # Found by path alone, every smear was cut again under a new key, and trained on twice.
    (tmp_path / "old").mkdir()
    for name in ("1.jpg", "26.jpg"):
        shutil.copy(DATA / "chula_rbc12" / name, tmp_path / "old" / name)
    out = tmp_path / "patches"
    prepare([tmp_path / "old"], out, PATCHES, progress=False)
    rows = read_index(out)
    (tmp_path / "old").rename(tmp_path / "new")
    report = prepare([tmp_path / "new"], out, PATCHES, progress=False)
    assert report.written == [] and sorted(report.already_done) == ["1", "26"]
    assert read_index(out) == rows and sorted(path.name for path in out.iterdir() if path.is_dir()) == ["1", "26"]
    shutil.copy(DATA / "chula_rbc12" / "1.jpg", tmp_path / "new" / "1 again.jpg")  # a copy beside its original
    assert prepare([tmp_path / "new"], out, PATCHES, progress=False).written == ["1 again"]
    (tmp_path / "other").mkdir()  # a copy of the same name (to a cluster's scratch), its original still there:
    shutil.copy(DATA / "chula_rbc12" / "26.jpg", tmp_path / "other" / "26.jpg")  # cut again, it was trained on twice
    report = prepare([tmp_path / "other"], out, PATCHES, progress=False)
    assert report.written == [] and report.already_done == ["26"] and read_index(out)[: len(rows)] == rows
    # An older version's journal lines are as they were; this one's digests lie beside them.
    (tmp_path / "new").rename(tmp_path / "moved again")
    (tmp_path / "moved again" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable: skipped, no stop
    report = prepare([tmp_path / "moved again"], out, PATCHES, progress=False)
    assert report.written == [] and sorted(report.already_done) == ["1", "1 again", "26"]
    assert [path for path, _ in report.skipped] == [tmp_path / "moved again" / "broken.jpg"]


def test_a_file_of_the_same_name_whose_ends_match_is_no_copy_unless_it_matches_whole(tmp_path):
    # The digest reads the first and last 64 KiB: day 2's smear of day 1's name, size and borders is no copy.
    (tmp_path / "day1").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "day1" / "1.png", compress_level=0)
    out = tmp_path / "tiles"
    prepare([tmp_path / "day1"], out, PATCHES, progress=False)
    data = bytearray((tmp_path / "day1" / "1.png").read_bytes())
    assert len(data) > 4 * 65536
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "day2").mkdir()
    (tmp_path / "day2" / "1.png").write_bytes(bytes(data))
    report = prepare([tmp_path / "day2"], out, PATCHES, progress=False)
    assert report.already_done == [] and len(report.written) + len(report.skipped) == 1


def test_sizes_default_to_224_px_cells_and_tiles_as_cut_and_a_relative_source_is_the_same_smear(
    tmp_path, monkeypatch
):
    (smear,) = _smear_copies(tmp_path, "src/1.jpg")
    monkeypatch.chdir(tmp_path)
    cells = prepare([Path("src/1.jpg")], tmp_path / "cells", PrepareSettings(), progress=False)
    with Image.open(tmp_path / "cells" / read_index(tmp_path / "cells")[0]["file"]) as crop:
        assert crop.size == (224, 224)  # RedDino's input
    assert prepare([smear], tmp_path / "cells", PrepareSettings(), progress=False).already_done == cells.written
    # the default given by its number is the same setting
    assert prepare([smear], tmp_path / "cells", PrepareSettings(size=224), progress=False).already_done == cells.written
    prepare([smear], tmp_path / "small", PrepareSettings(mode="patches", patch_size=200, size=100), progress=False)
    with Image.open(tmp_path / "small" / read_index(tmp_path / "small")[0]["file"]) as tile:
        assert tile.size == (100, 100)


def test_a_field_too_large_for_memory_is_skipped_and_the_others_are_cut(tmp_path, monkeypatch):
    first, second = _smear_copies(tmp_path, "src/1.jpg", "src/2.jpg")
    cut, calls = prepare_module._patch_samples, []

    def out_of_memory_on_the_first(image, settings):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError
        return cut(image, settings)

    monkeypatch.setattr(prepare_module, "_patch_samples", out_of_memory_on_the_first)
    report = prepare([tmp_path / "src"], tmp_path / "tiles", PATCHES, progress=False)
    assert report.written == ["2"] and report.skipped == [(first, "out of memory (too large a field at this --size?)")]
