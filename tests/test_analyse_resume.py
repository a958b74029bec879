"""reddino-analyse cut short (Ctrl-C, a kill, a full disk) goes on where it stopped: each smear's
results are kept as a part when it finishes, and the same command reads them back, writing
the files an uninterrupted run writes."""

from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _model_fixtures import hub_cache, publish_to_cache, record_crops, tiny_folder  # noqa: F401  (fixtures)
from skimage.io import imread
from test_analyse_cli import CHULA, DATA, read, saved_head

from napari_reddino import analyse_cli, embedding, load_embedder
from napari_reddino.analyse_cli import main
from napari_reddino.batch_analysis import PARTS, SmearAnalysis, code_digest
from napari_reddino.cell_classifier import CellClassifier
from napari_reddino.cell_embeddings import METADATA_KEY
from napari_reddino.image_input import read_smear
from napari_reddino.smear_parts import SmearParts, newest_part_settings


def smear_folder(tmp_path: Path) -> Path:
    """Four smears: three Chula smears (one in a sub-folder) and an Aslan one."""
    folder = tmp_path / "smears"
    (folder / "day2").mkdir(parents=True)
    shutil.copy(CHULA / "1.jpg", folder / "1.jpg")
    shutil.copy(CHULA / "26.jpg", folder / "b.jpg")
    shutil.copy(CHULA / "26.jpg", folder / "day2" / "26.jpg")
    shutil.copy(DATA / "aslan_bcd" / "image-1.png", folder / "image-1.png")
    return folder


def reading(monkeypatch, *, stop_at: int | None = None) -> list[str]:
    """The names of the smears the run reads, in order; with ``stop_at``, Ctrl-C as it reads that one."""
    read_names: list[str] = []

    def read_or_stop(path):
        read_names.append(path.name)
        if len(read_names) == stop_at:
            raise KeyboardInterrupt
        return read_smear(path)

    monkeypatch.setattr(analyse_cli, "read_smear", read_or_stop)
    return read_names


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_smear_still_copied_in(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The smears' folder, the output folder and the arguments of a run that measured one of its
    two smears and skipped the other, its file cut short."""
    folder = tmp_path / "smears"
    folder.mkdir()
    shutil.copy(CHULA / "1.jpg", folder / "1.jpg")
    (folder / "2.jpg").write_bytes((CHULA / "26.jpg").read_bytes()[:5000])  # still being copied in
    out = tmp_path / "out"
    argv = [str(folder), "--out", str(out), "--measure-only"]
    assert main(argv) == 1
    return folder, out, argv


def test_an_interrupted_run_goes_on_from_its_parts_and_writes_what_a_whole_run_writes(
        tmp_path, tiny_folder, monkeypatch, capsys):  # noqa: F811
    smears, model = smear_folder(tmp_path), str(tiny_folder[1])
    saved_head(smears / "1.jpg", model, tmp_path / "head")
    argv = [str(smears), "--model", model, "--head", str(tmp_path / "head"), "--device", "cpu", "--with-embeddings",
            "--galleries"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = files_under(tmp_path / "whole")
    assert {"cells.csv", "cells_summary.csv", "cells.npz", "galleries/1.png", "galleries/b.png"} <= whole.keys()

    out = tmp_path / "out"
    (out / "galleries" / "1.png").mkdir(parents=True)  # its picture cannot be drawn (a full disk, say)
    read_names = reading(monkeypatch, stop_at=4)
    assert main([*argv, "--out", str(out)]) == 130
    assert read_names == ["1.jpg", "b.jpg", "26.jpg", "image-1.png"]
    err = capsys.readouterr().err
    assert "[1/4] 1: warning: no gallery written (" in err
    assert (f"interrupted; 1 smear not reached, not in the files; run the same command to go on: 3 smears analysed "
            f"are kept in {out / PARTS}, to be read back") in err
    assert len(list((out / PARTS).glob("*.npz"))) == 3
    (out / "galleries" / "1.png").rmdir()
    # a smear whose picture was replaced since (by another run's, here) is analysed again, to draw it
    (out / "galleries" / "b.png").write_bytes(whole["galleries/image-1.png"])

    assert main([*argv, "--out", str(out)]) == 2  # that picture is no longer the cut-short run's to replace
    assert "galleries (with 2 pictures) exist; pass --overwrite to replace them" in capsys.readouterr().err
    read_names = reading(monkeypatch)
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert read_names == ["1.jpg", "b.jpg", "image-1.png"]
    printed = capsys.readouterr().out
    assert "3 of 4 smears were analysed by an earlier run that did not finish" in printed
    assert "[3/4] 26: 140 cells (analysed by the earlier run)" in printed
    assert files_under(out) == whole  # the tables, embeddings and pictures byte for byte; the parts gone

    # Files another run wrote, or that were changed since, are not the resumed run's to replace.
    assert main([*argv, "--out", str(out)]) == 2
    assert "exist; pass --overwrite to replace them" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_precision_of_the_run_it_goes_on_with(tmp_path, tiny_folder, monkeypatch,
                                                                       capsys):  # noqa: F811
    # "auto" times bf16 against fp32 in each process; on a busy CPU the second timing may choose the
    # other, and every smear of the cut-short run was analysed again (or, its files written, refused).
    smears = tmp_path / "smears"
    smears.mkdir()
    for name in ("1.jpg", "26.jpg"):
        shutil.copy(CHULA / name, smears / name)
    argv = [str(smears), "--model", str(tiny_folder[1]), "--device", "cpu", "--with-embeddings", "--out",
            str(tmp_path / "out")]
    reading(monkeypatch, stop_at=2)
    assert main(argv) == 130
    was = newest_part_settings(tmp_path / "out" / PARTS)["model"]["dtype"]
    other = torch.bfloat16 if was == "torch.float32" else torch.float32
    monkeypatch.setattr(embedding, "auto_dtype", lambda device: other)  # this time the timing says otherwise
    read_names = reading(monkeypatch)
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert read_names == ["26.jpg"] and "1 of 2 smears was analysed by an earlier run" in printed
    kept = was.removeprefix("torch.")
    assert f"reddino-analyse: in {kept}, as the earlier run on {tmp_path / 'out'}, to go on" in printed


def test_a_run_whose_files_went_aside_leaves_the_parts_and_note_of_a_run_cut_short_meanwhile(tmp_path, monkeypatch,
                                                                                              capsys):
    smears, other = smear_folder(tmp_path), tmp_path / "other"
    other.mkdir()
    shutil.copy(CHULA / "1.jpg", other / "x.jpg")
    out = tmp_path / "out"
    cut_short = [str(smears), "--out", str(out), "--measure-only"]

    def meanwhile(path):  # as the second run reads its smear, the first is cut short beside it
        with monkeypatch.context() as inner:
            reading(inner, stop_at=3)
            assert main(cut_short) == 130
        return read_smear(path)

    monkeypatch.setattr(analyse_cli, "read_smear", meanwhile)
    assert main([str(other), "--out", str(out), "--measure-only"]) == 1  # its files went aside
    assert len(list(out.glob("cells-*_summary.csv"))) == 1 and (out / PARTS / "written.json").is_file()
    read_names = reading(monkeypatch)
    capsys.readouterr()
    assert main(cut_short) == 0  # the first run goes on where it stopped
    assert read_names == ["26.jpg", "image-1.png"] and "2 of 4 smears were analysed by an earlier run" in \
        capsys.readouterr().out


def test_sigterm_while_the_model_loads_says_nothing_was_written(tmp_path, tiny_folder, monkeypatch,
                                                                capsys):  # noqa: F811
    load = embedding.load_embedder  # imported by the command as it loads the model

    def terminated_while_loading(*args, **kwargs):  # a scheduler's time limit during a download, say
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(embedding, "load_embedder", terminated_while_loading)
    before = signal.signal(signal.SIGTERM, lambda *_: None)  # unhandled, the run goes on (and the test fails)
    try:
        assert main([str(CHULA / "1.jpg"), "--model", str(tiny_folder[1]), "--device", "cpu", "--with-embeddings",
                     "--out", str(tmp_path / "out")]) == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == "reddino-analyse: interrupted; nothing written\n"
    assert not (tmp_path / "out").exists()


def test_a_killed_run_leaves_its_parts_and_the_next_runs_read_them_back(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "smears"
    folder.mkdir()
    for number in range(12):
        shutil.copy(CHULA / ("1.jpg", "26.jpg")[number % 2], folder / f"{number:02d}.jpg")
    argv = [str(folder), "--measure-only", "--pixel-size-um", "0.2"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "out"
    command = [Path(sys.executable).with_name("reddino-analyse"), *argv, "--out", str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as run:
        while not run.stdout.readline().startswith("[3/12] "):
            assert run.poll() is None
        run.send_signal(signal.SIGKILL)  # an out-of-memory kill, a power cut: nothing written at the end
        run.communicate(timeout=60)
    assert not (out / "cells.csv").exists()
    kept = len(list((out / PARTS).glob("*.npz")))
    assert 2 <= kept < 10  # the third is kept just after its line
    argv += ["--out", str(out)]

    capsys.readouterr()
    read_names = reading(monkeypatch, stop_at=2)  # cut short again, after one more smear
    assert main(argv) == 130
    assert read_names == [f"{number:02d}.jpg" for number in range(kept, kept + 2)]
    captured = capsys.readouterr()
    assert f"{kept} of 12 smears were analysed by an earlier run that did not finish" in captured.out
    assert f"run the same command to go on: {kept + 1} smears analysed are kept" in captured.err

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(analyse_cli, "export_cells_csv", disk_full)
    read_names = reading(monkeypatch)
    assert main(argv) == 3  # the night's smears analysed, and the disk full at the end
    assert read_names == [f"{number:02d}.jpg" for number in range(kept + 1, 12)]
    assert (f"nothing written in {out}: [Errno 28] No space left on device; run the same command once that is "
            "mended: 12 smears analysed are kept") in capsys.readouterr().err
    first = tmp_path / "first"  # a first run: no file to overwrite, so no --overwrite to pass
    assert main([str(folder / "00.jpg"), "--measure-only", "--out", str(first)]) == 3
    assert (f"nothing written in {first}: [Errno 28] No space left on device; run the same command once that is "
            "mended: 1 smear analysed is kept") in capsys.readouterr().err

    monkeypatch.undo()
    read_names = reading(monkeypatch)
    assert main(argv) == 0
    assert read_names == []
    assert files_under(out) == files_under(tmp_path / "whole") and not (out / PARTS).exists()


def test_a_skipped_smear_is_tried_again_alone_and_other_runs_files_and_parts_are_not_taken(
        tmp_path, monkeypatch, capsys):
    folder, out, argv = one_smear_still_copied_in(tmp_path)
    assert ("1 of 2 smears skipped (see above); run the same command to try them again: 1 smear analysed is kept in "
            f"{out / PARTS}") in capsys.readouterr().err

    # Another day's smears in that folder, or a table edited since: the files are not that run's to replace.
    (tmp_path / "day2").mkdir()
    shutil.copy(CHULA / "26.jpg", tmp_path / "day2" / "3.jpg")
    assert main([str(tmp_path / "day2"), "--out", str(out), "--measure-only"]) == 2
    assert "exist; pass --overwrite to replace them" in capsys.readouterr().err
    assert main([*argv, "--pixel-size-um", "0.2"]) == 2  # nor those of a run with other settings
    assert ("written by an unfinished run with other settings (model, device, precision, head, pixel size or code), "
            "whose kept smears this run cannot read back") in capsys.readouterr().err
    os.utime(out / "cells.csv", ns=(0, (out / "cells.csv").stat().st_mtime_ns + 1))
    assert main(argv) == 2
    capsys.readouterr()

    # Other settings, the smear still broken: the new parts replace those of the old settings.
    assert main([*argv, "--overwrite", "--pixel-size-um", "0.2"]) == 1
    assert (f"{out / PARTS} also holds 1 smear analysed with other settings (model, device, precision, head, pixel "
            "size, code) or since changed; they are not used") in capsys.readouterr().out
    assert len(list((out / PARTS).glob("*.npz"))) == 1

    shutil.copy(CHULA / "26.jpg", folder / "2.jpg")
    read_names = reading(monkeypatch)
    assert main([*argv, "--pixel-size-um", "0.2"]) == 0
    assert read_names == ["2.jpg"] and not (out / PARTS).exists()
    assert read(out / "cells_summary.csv")["image"].tolist() == ["1", "2"]


def test_a_part_reads_back_equal_dtypes_and_all_and_only_for_its_file_name_and_settings(tmp_path, tiny_folder):  # noqa: F811
    embedder = load_embedder(str(tiny_folder[1]), device="cpu")
    head, *_ = saved_head(CHULA / "1.jpg", str(tiny_folder[1]), tmp_path / "head")
    smear = tmp_path / "1.jpg"
    shutil.copy(CHULA / "1.jpg", smear)
    analysis = SmearAnalysis(embedder=embedder, head=head, pixel_size_um=0.2)
    cells = analysis(imread(smear), "1")
    cells.metadata["cells_look_px"] = np.float64(33.5)  # a numpy scalar comes back one
    parts = SmearParts(tmp_path / "out" / PARTS, analysis.settings())
    key = parts.key(smear, "1")
    parts.save(key, cells)

    back = parts.load(key)
    assert back.name == "1 cells"
    pd.testing.assert_frame_equal(back.features, cells.features, check_exact=True)  # float32 and str columns too
    assert list(back.features.dtypes) == list(cells.features.dtypes)
    assert type(back.metadata["cells_look_px"]) is np.float64 and back.metadata["cells_look_px"] == 33.5
    record, saved = back.metadata[METADATA_KEY], cells.metadata[METADATA_KEY]
    assert record.keys() == saved.keys()
    for name, value in saved.items():
        if isinstance(value, np.ndarray):
            assert record[name].dtype == value.dtype
            np.testing.assert_array_equal(record[name], value)
        else:
            assert record[name] == value and type(record[name]) is type(value)
    assert {name: value for name, value in back.metadata.items() if name != METADATA_KEY} == \
        {name: value for name, value in cells.metadata.items() if name != METADATA_KEY}

    # Another name, other settings, or the file changed since: none of them is this smear's part.
    assert not parts.has(parts.key(smear, "day2/1"))
    loaded_again = CellClassifier.load(tmp_path / "head", model_id=embedder.model_id)
    assert loaded_again.digest() == head.digest()  # the next run's head, read from its file
    for other in (SmearAnalysis(embedder=embedder, head=head, pixel_size_um=0.25),
                  SmearAnalysis(embedder=embedder, head=head, pixel_size_um=0.2, keep_embeddings=False),
                  SmearAnalysis(embedder=embedder, pixel_size_um=0.2)):
        assert not SmearParts(parts.folder, other.settings()).has(SmearParts(parts.folder, other.settings()).key(smear, "1"))
    assert SmearParts(parts.folder, SmearAnalysis(embedder=embedder, head=loaded_again, pixel_size_um=0.2)
                      .settings()).has(key)
    renamed, recoloured = (CellClassifier.load(tmp_path / "head") for _ in range(2))
    renamed.rename_classes({"normal": "discocyte"})  # the same weights: other names in the table
    recoloured.colours["normal"] = "#123456"  # other colours in the pictures
    assert len({head.digest(), renamed.digest(), recoloured.digest()}) == 3
    in_fp32, in_bf16 = (load_embedder(str(tiny_folder[1]), device="cpu", dtype=dtype) for dtype in ("float32",
                                                                                                 "bfloat16"))
    assert SmearAnalysis(embedder=in_bf16).settings() != SmearAnalysis(embedder=in_fp32).settings()
    # the model's record of its training crops edited in its config: the same weights, cut otherwise
    record_crops(tiny_folder[1], {"mode": "context", "scale": "cell", "margin": 0.5})
    recorded = load_embedder(str(tiny_folder[1]), device="cpu", dtype="float32")
    assert recorded.model_id == in_fp32.model_id
    assert SmearAnalysis(embedder=recorded).settings() != SmearAnalysis(embedder=in_fp32).settings()
    os.utime(smear, ns=(smear.stat().st_atime_ns, smear.stat().st_mtime_ns + 1))  # copied over, or edited
    assert parts.key(smear, "1") != key and not parts.has(parts.key(smear, "1"))

    # A part damaged on disk, or put in another's place, is said to be, naming its file.
    (file,) = parts.folder.glob("*.npz")
    foreign = parts.key(CHULA / "26.jpg", "26")
    shutil.copy(file, parts._file(foreign))
    with pytest.raises(ValueError, match="it was saved for another smear"):
        parts.load(foreign)
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{file.name} cannot be read"):
        parts.load(key)

    (parts.folder / "notes.txt").write_text("a lab member's own file")
    (parts.folder / f".{file.name}.abcd_123.tmp").write_bytes(b"half a part")  # a write killed before its rename
    parts.clear()
    assert [path.name for path in parts.folder.iterdir()] == ["notes.txt"]


def test_parts_that_cannot_be_kept_cost_the_run_nothing_but_its_resumption(tmp_path, capsys):
    smears = smear_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / PARTS).write_text("a file where the parts would go")
    assert main([str(smears), "--out", str(out), "--measure-only"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count(f"warning: cannot keep the smears' results as they finish in {out / PARTS} (") == 1
    assert "cannot be read" not in captured.err  # no part to read there: nothing to warn of per smear
    assert "should the run be cut short, the smears from this one on are analysed again" in captured.err
    assert read(out / "cells_summary.csv")["image"].tolist() == ["1", "b", "26", "image-1"]
    assert (out / PARTS).read_text() == "a file where the parts would go"


def test_parts_of_other_library_versions_are_not_read_back(tmp_path, monkeypatch):
    analysis = SmearAnalysis(pixel_size_um=0.2)
    smear = CHULA / "1.jpg"
    parts = SmearParts(tmp_path / PARTS, analysis.settings())
    key = parts.key(smear, "1")
    parts.save(key, analysis(imread(smear), "1"))
    version = importlib.metadata.version

    def updated(library: str) -> str:  # scikit-image updated between the two runs: other cells
        return "99.0" if library == "scikit-image" else version(library)

    monkeypatch.setattr(importlib.metadata, "version", updated)
    code_digest.cache_clear()  # taken once a process: no library changes under a running one
    try:
        updated_run = SmearParts(parts.folder, analysis.settings())
        assert not updated_run.has(updated_run.key(smear, "1"))
    finally:
        monkeypatch.undo()
        code_digest.cache_clear()
    assert SmearParts(parts.folder, analysis.settings()).has(key)


def test_files_of_the_cut_short_run_changed_while_its_resumption_ran_are_kept(tmp_path, monkeypatch, capsys):
    folder, out, argv = one_smear_still_copied_in(tmp_path)
    shutil.copy(CHULA / "26.jpg", folder / "2.jpg")
    summary = out / "cells_summary.csv"
    edited = summary.read_text() + "a colleague's line\n"
    read_names = reading(monkeypatch)

    def edit_as_it_reads(path):  # a colleague edits the summary while the smear is analysed
        summary.write_text(edited)
        return read_names.append(path.name) or read_smear(path)

    monkeypatch.setattr(analyse_cli, "read_smear", edit_as_it_reads)
    capsys.readouterr()
    assert main(argv) == 1
    assert read_names == ["2.jpg"]
    assert (f"{summary} changed while this run went on (edited, or another run writing to the same "
            "folder?); this run's files get a timestamped name instead") in capsys.readouterr().err
    assert summary.read_text() == edited
    (aside,) = [path for path in out.glob("cells-*.csv") if not path.stem.endswith("_summary")]
    assert read(aside.with_name(aside.stem + "_summary.csv"))["image"].tolist() == ["1", "2"]
