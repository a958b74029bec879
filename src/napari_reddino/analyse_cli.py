"""``reddino-analyse``: many smears at once without the GUI (a day's smears with a head trained
in the Cell map widget), written as the widget's export: ``cells.csv`` and ``cells_summary.csv``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .atomic_files import NotReplacedError, PartlyWrittenError, remove_leftovers
from .batch_analysis import GALLERIES, PARTS, SmearAnalysis, SmearCells, list_smears, smear_names
from .cell_classifier import MOSTLY_UNLIKE, UNLIKE_ADVICE
from .cell_export import export_cells_csv, stale_beside, summary_path
from .cell_table import SOURCE_PATH
from .class_gallery import ROW_CELLS, pictures_in, remove_pictures
from .image_input import read_smear
from .segmentation import RBC_DIAMETER_UM, pixel_size_refusal
from .smear_parts import SmearParts, newest_part_settings, note_covers, read_note
from .stop_signals import handling_signals
from .wording import counted, shown

# Red cells fewer pixels across than this (Chula's are 36 px, a 20x objective's about 15) show too
# little of their shape: a 160 x 120 px thumbnail of a Chula smear has cells of 10 px.
SMALL_CELLS_PX = 15
# A temporary file of the results unchanged this long is a killed run's: a write takes seconds, or
# minutes for a large embeddings file on a slow share, and the files of one write are staged in turn.
LEFTOVER_AGE_S = 24 * 3600
INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C (143 for SIGTERM)
NOTHING_WRITTEN = 3  # no smear analysed, or the files could not be written: the results in DIR are not this run's
DEFAULT_MODEL = "reddino-small"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reddino-analyse",
        description="Segment, measure, embed and classify the red cells of many smears, as the napari "
                    "widgets do, and write one row per cell (DIR/cells.csv) and one per smear "
                    "(DIR/cells_summary.csv).",
    )
    parser.add_argument("smears", nargs="+", metavar="SMEAR", help="image files, or folders searched for "
                        "png/jpg/jpeg/tif/tiff at any depth")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    parser.add_argument("--model", help="reddino-small, reddino-base or reddino-large, hf_hub:org/name, or a local "
                        f"model folder (default: the --head's model if on the Hub, else {DEFAULT_MODEL})")
    parser.add_argument("--head", metavar="PATH", help="a head saved by the Cell map widget for this model: "
                        "every cell gets a predicted class and its probabilities, the summary class counts and %%")
    parser.add_argument("--measure-only", action="store_true", help="segment and measure only; no model")
    parser.add_argument("--device", help="auto (CUDA, then MPS, then CPU; the default), cpu, cuda, cuda:1, mps")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile: on a GPU "
                        "1.2-1.3x the cells/s, after 20-32 s of compiling; worth it past about a million cells "
                        "(300,000 with reddino-large)")
    parser.add_argument("--pixel-size-um", type=float, metavar="UM", help="µm per pixel: sizes in µm too, and "
                        "the segmentation expects cells of 7.5 µm instead of estimating their size per smear")
    parser.add_argument("--with-embeddings", action="store_true", help="also write the embeddings to DIR/cells.npz")
    parser.add_argument("--galleries", action="store_true", help="with --head: also write DIR/galleries/<smear>.png, "
                        f"per class a row of up to {ROW_CELLS} of the whole cells the head put in it, to check by eye")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _remembered_stop() as stop:  # SIGTERM too, while the model loads (the smears take it over)
        try:
            return _analyse(args)
        except _Refused as refusal:
            print(f"reddino-analyse: {refusal}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # while the model loads, before any smear: nothing to write
            print("reddino-analyse: interrupted; nothing written", file=sys.stderr)
            return stop.status if stop.is_set() else INTERRUPTED


class _StopRequest(threading.Event):
    """Set by Ctrl-C or SIGTERM (a scheduler's time limit), with the signal's number. While
    ``raising``, the signal also raises KeyboardInterrupt; after it, while the files are
    written, it is only noted: a write cut short would leave a new table beside an old summary."""

    signum: int = signal.SIGINT
    raising: bool = True

    @property
    def status(self) -> int:
        """The exit status of a run it stopped: 130 for Ctrl-C, as the shell gives, 143 for SIGTERM."""
        return 128 + self.signum


@contextlib.contextmanager
def _remembered_stop() -> Iterator[_StopRequest]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, and also set the request yielded: one raised
    inside a finaliser (a progress bar's ``__del__``) is printed and swallowed, and the run would
    go on to the last smear. Outside the main thread the request stays unset; a signal ignored
    when the run began stays ignored (:func:`~napari_reddino.stop_signals.handling_signals`)."""
    request = _StopRequest()

    def on_signal(signum, frame):
        again = request.is_set()
        request.signum = signum
        request.set()
        if request.raising or again:  # a second one stops a write stuck on a share that went away
            raise KeyboardInterrupt
        print("reddino-analyse: finishing the files first (again to stop at once)", file=sys.stderr, flush=True)

    with handling_signals(on_signal):
        yield request


@dataclass
class _Outcome:
    """What became of the smears, filled in as the run goes, so that an interrupt loses none:
    their results (``done``), those skipped, the folders that could not be read, and how many
    of ``done`` are also kept in ``parts`` (``saving`` until a part could not be saved)."""

    parts: SmearParts
    unreadable: list[Path]
    note: dict | None = None  # of the files the cut-short run wrote, which this one may replace
    done: list[SmearCells] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the parts of this run's smears
    kept: int = 0
    saving: bool = True
    unkeyed: bool = False  # a smear was skipped before its key was taken (its file could not be read)


def _analyse_each(analysis: SmearAnalysis, smears: list[Path], outcome: _Outcome, stop: _StopRequest) -> None:
    """Analyse the smears in turn (or read back those an earlier, unfinished run analysed with
    the same settings), each result appended to ``outcome`` as soon as it is known and kept as
    a part. A ``stop`` whose KeyboardInterrupt was swallowed is raised again before the next
    smear and the next batch."""

    def progress(bar: tqdm, done_cells: int, total: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        _advance(bar, done_cells, total)

    names = smear_names(smears)
    _say_earlier_parts(outcome.parts, smears, names)
    for number, (path, name) in enumerate(zip(smears, names), 1):
        if stop.is_set():
            raise KeyboardInterrupt
        started, earlier, key = time.perf_counter(), None, None
        try:
            key = outcome.parts.key(path, name)
            earlier = _earlier_part(analysis, outcome.parts, key, f"[{number}/{len(smears)}] {name}")
            if earlier is None:
                with tqdm(desc=f"embedding {name}", unit=" cells", leave=False,
                          disable=analysis.embedder is None) as bar:
                    cells = analysis(read_smear(path), name,
                                     progress=lambda n, total, bar=bar: progress(bar, n, total))
                cells.metadata[SOURCE_PATH] = shown(os.path.abspath(path))  # the same key from whatever folder
            else:
                cells = earlier
        except Exception as error:  # one smear's failure (unreadable, too large, out of memory) skips it alone
            outcome.skipped.append(path)
            outcome.unkeyed |= key is None  # its earlier part, if any, cannot be told from another's
            reason = str(error) if isinstance(error, OSError | ValueError) else f"{type(error).__name__}: {error}"
            print(f"[{number}/{len(smears)}] {shown(path)}: skipped: {reason}", file=sys.stderr, flush=True)
            continue
        outcome.done.append(cells)
        outcome.keys.append(key)
        found = counted(len(cells.features), "cell") if len(cells.features) else "no cells found (is it a blood smear?)"
        when = "analysed by the earlier run" if earlier is not None else f"{time.perf_counter() - started:.1f} s"
        print(f"[{number}/{len(smears)}] {name}: {found} ({when})", flush=True)
        _warn_of(cells, f"[{number}/{len(smears)}] {name}", analysis)
        if earlier is None and outcome.saving:
            _keep_part(outcome, key, cells)
        outcome.kept += earlier is not None or outcome.saving


def _say_earlier_parts(parts: SmearParts, smears: list[Path], names: list[str]) -> None:
    """Say how many smears an earlier, unfinished run in this folder analysed with these settings,
    and how many parts it holds of other smears or settings."""
    found = 0
    for path, name in zip(smears, names):
        with contextlib.suppress(OSError):  # a smear gone since it was listed: skipped in its turn
            found += parts.has(parts.key(path, name))
    if found:
        print(f"reddino-analyse: {found} of {counted(len(smears), 'smear')} {'was' if found == 1 else 'were'} analysed "
              f"by an earlier run that did not finish; their results are read back from {shown(parts.folder)} "
              "where still whole, not analysed again", flush=True)
    if (others := parts.count() - found) > 0:  # a busy CPU may choose another precision: worth knowing why
        print(f"reddino-analyse: {shown(parts.folder)} also holds {counted(others, 'smear')} analysed with other "
              "settings (model, device, precision, head, pixel size, code) or since changed; they are not used, and "
              "are removed once every smear of this run is in its files", flush=True)


def _earlier_part(analysis: SmearAnalysis, parts: SmearParts, key: str, smear: str) -> SmearCells | None:
    """The smear's results saved under ``key`` by an earlier run, where they stand for this run's."""
    try:
        earlier = parts.load(key)
        return earlier if earlier is not None and analysis.reusable(earlier) else None
    except Exception as error:  # analysed again, and the part replaced
        print(f"{smear}: warning: {error}; analysed again", file=sys.stderr, flush=True)
        return None


def _keep_part(outcome: _Outcome, key: str, cells: SmearCells) -> None:
    """Save the smear's results as a part; where that fails, say so and save no more."""
    try:
        outcome.parts.save(key, cells)
    except Exception as error:  # a full disk, a file where the folder goes: the run itself goes on
        print(f"reddino-analyse: warning: cannot keep the smears' results as they finish in "
              f"{shown(outcome.parts.folder)} ({error}); should the run be cut short, the smears from this one on "
              "are analysed again", file=sys.stderr, flush=True)
        outcome.saving = False


def _warn_of(cells: SmearCells, smear: str, analysis: SmearAnalysis) -> None:
    """Say what looks wrong with a smear's results: the pixel size, the gallery, the head."""
    if "cells_look_px" in cells.metadata:
        expected = RBC_DIAMETER_UM / analysis.pixel_size_um
        print(f"{smear}: warning: its cells look {cells.metadata['cells_look_px']:.0f} px "
              f"across, where --pixel-size-um {analysis.pixel_size_um:g} makes a 7.5 µm cell {expected:.0f} px: "
              "is it this smear's pixel size (another microscope or objective)? A wrong one cuts cells into "
              "pieces or merges them", file=sys.stderr, flush=True)
    diameters = cells.features.get("equivalent_diameter_px")
    if diameters is not None and len(diameters) and (median := float(diameters.median())) < SMALL_CELLS_PX:
        print(f"{smear}: warning: its cells are only {median:.0f} px across (a thumbnail, or a low magnification?): "
              "shapes, sizes and classes read from so few pixels are coarse; analyse the full-size image",
              file=sys.stderr, flush=True)
    if "gallery_failed" in cells.metadata:
        print(f"{smear}: warning: no gallery written ({cells.metadata['gallery_failed']})", file=sys.stderr, flush=True)
    if cells.metadata.get("unlike_head", 0) > MOSTLY_UNLIKE:
        print(f"{smear}: warning: {cells.metadata['unlike_head']:.0%} of its cells {UNLIKE_ADVICE}",
              file=sys.stderr, flush=True)


class _Refused(Exception):
    """Nothing can be done with these arguments; said before any smear is read."""


def _analyse(args: argparse.Namespace) -> int:
    _check_options(args)
    out = Path(args.out)
    table = out / "cells.csv"
    targets = _export_files(table, args.with_embeddings)
    stale = stale_beside(table, with_embeddings=args.with_embeddings, with_summary=True)
    galleries = out / GALLERIES
    if args.galleries and galleries.exists() and not galleries.is_dir():
        raise _Refused(f"{galleries} is a file, where the pictures would go; move it, or choose another --out.")
    folders = [str(file) for file in targets if file.is_dir()]
    if folders:
        raise _Refused(f"{', '.join(folders)} {'is a folder' if len(folders) == 1 else 'are folders'}, where a "
                       "table would go; move it, or choose another --out.")
    old_galleries = pictures_in(galleries)
    in_the_way = [file for file in (*targets, *stale) if file.exists()]
    existing = [str(file) for file in in_the_way]
    existing += [f"{galleries} (with {counted(len(old_galleries), 'picture')})"] * bool(old_galleries)
    refusal = None
    if existing and not args.overwrite:
        refusal = _Refused(f"{', '.join(existing)} {'exists' if len(existing) == 1 else 'exist'}; pass --overwrite to "
                           "replace them, or choose another --out." + (f" (The smears that an unfinished run kept in "
                           f"{out / PARTS} are read back where its settings match, not analysed again.)" if
                           (out / PARTS).is_dir() else ""))
    unreadable: list[Path] = []
    smears = list_smears(args.smears, leave_out=out, unreadable=unreadable)
    for folder in unreadable:  # permissions, a share that dropped: said now, and in the exit status
        print(f"reddino-analyse: warning: cannot read the folder {shown(folder)}; its smears are left out",
              file=sys.stderr, flush=True)
    missing = [shown(path) for path in smears if not path.is_file()]
    if missing:
        raise _Refused(f"no such file: {', '.join(missing)}")
    found_in = {folder for path in smears for folder in (*path.parents, *path.resolve().parents)}  # through links too
    empty = [source for source in args.smears if Path(source).is_dir() and Path(source) not in found_in
             and Path(source).resolve() not in found_in]
    if empty:  # a day's smears would be missing from the report without a word
        cannot = set(unreadable)
        raise _Refused("; ".join(f"cannot read the folder {shown(source)}" if Path(source) in cannot else
                                 f"no images (png, jpg, jpeg, tif, tiff) in {shown(source)}" for source in empty))
    note = None
    if refusal is not None:  # unless they are the files of the cut-short run this one goes on with
        note = read_note(out / PARTS)
        if note is None or not note_covers(note, [*in_the_way, *old_galleries], smears):
            raise refusal
    _check_output_folder(out)  # before the model, which may download for minutes
    analysis = _analysis(args)
    earlier = (note or {}).get("settings") or newest_part_settings(out / PARTS)
    if (dtype := _precision_to_keep(analysis.settings(), earlier)) is not None:
        print(f"reddino-analyse: in {dtype}, as the earlier run on {shown(out)}, to go on with its smears", flush=True)
        analysis = _analysis(args, dtype=dtype)
    try:  # said now, not after hours of smears
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # os.access cannot tell for ACLs, network shares, Windows
            pass
    except OSError as error:
        raise _Refused(f"cannot write in the output folder {out}: {error}") from error

    parts = SmearParts(out / PARTS, analysis.settings())
    if note is not None and not parts.same_settings(note):  # a busy CPU may time another precision
        raise _Refused(f"{', '.join(existing)} {'was' if len(existing) == 1 else 'were'} written by an unfinished run "
                       "with other settings (model, device, precision, head, pixel size or code), whose kept smears "
                       "this run cannot read back: give that run's model, head, --pixel-size-um and --device to go "
                       "on with it, or pass --overwrite to start afresh.")
    outcome = _Outcome(parts, unreadable, note)
    with _remembered_stop() as stop:
        try:  # Ctrl-C or SIGTERM during a smear or between two: the smears finished so far are written
            _analyse_each(analysis, smears, outcome, stop)
        except KeyboardInterrupt:
            pass
        finally:
            stop.raising = False
        return _write_results(args, analysis, smears, outcome, (stale, old_galleries), stop)


def _write_results(args: argparse.Namespace, analysis: SmearAnalysis, smears: list[Path], outcome: _Outcome,
                   earlier: tuple[list[Path], list[Path]], stop: _StopRequest) -> int:
    """Write the smears done and say what became of the others (skipped, in folders that could
    not be read, not reached); remove the ``earlier`` run's files that no longer match (its stale
    tables, its pictures), and the parts once every smear is in the files (else note the files
    written, which the same command may then replace). Returns the exit status."""
    done, skipped, unreadable = outcome.done, outcome.skipped, outcome.unreadable
    stale, old_galleries = earlier
    table, galleries = Path(args.out) / "cells.csv", Path(args.out) / GALLERIES
    left = len(smears) - len(done) - len(skipped)  # not reached
    unfinished = bool(left or skipped or unreadable)  # some smear is not in the files
    again = f"the same command{' with --overwrite' * (not args.overwrite)}"
    read_back = (f": {counted(outcome.kept, 'smear')} analysed {'is' if outcome.kept == 1 else 'are'} kept in "
                 f"{shown(outcome.parts.folder)}, to be read back rather than analysed again" if outcome.kept else "")
    if not done:
        print("reddino-analyse: no smear was analysed; nothing written", file=sys.stderr)
        return stop.status if stop.is_set() or left else NOTHING_WRITTEN
    pictured = {Path(cells.metadata["gallery"]) for cells in done if "gallery" in cells.metadata}
    with_galleries = f"; galleries of {counted(len(pictured), 'smear')} in {galleries}" if args.galleries else ""
    classes = analysis.head.classes if analysis.head is not None else None
    # the cut-short run's files, which this one may replace: only if none changed since this run began
    replace = args.overwrite or (outcome.note is not None and note_covers(
        outcome.note, [file for file in _export_files(table, args.with_embeddings) if file.exists()]))
    try:
        targets, table_is_ours = _export(table, done, classes, args, replace, outcome.note)
    except PartlyWrittenError as error:
        print(f"reddino-analyse: only partly written: {error}{with_galleries}; run it again with --overwrite"
              f"{read_back}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:  # ValueError: a name no encoder takes, a table that does not fit
        written = f" (but {with_galleries[2:]})" if pictured else ""
        there = any(file.exists() for file in _export_files(table, args.with_embeddings))
        # the files as they were: the note still holds; none there (a first run): nothing to overwrite
        again = "the same command" if replace or not there else again
        mend = f"; run {again} once that is mended{read_back}" if read_back else ""
        print(f"reddino-analyse: nothing written in {shown(table.parent)}{written}: {error}{mend}", file=sys.stderr)
        return NOTHING_WRITTEN
    if targets[0] != table:  # beside another run's files: the parts and note there may be that run's
        if not unfinished:
            with contextlib.suppress(OSError):  # else they wait for a run that finishes to clear them
                outcome.parts.remove(outcome.keys)
    elif not unfinished:  # every smear's results are in the files now
        _clear_parts(outcome.parts)
    elif not (left or unreadable or outcome.unkeyed):  # those of other smears or settings would pile up
        _clear_parts(outcome.parts, keep=outcome.keys)
    removed, not_removed = "", []
    if not table_is_ours:  # the earlier run's files still belong to the table left there
        stale, old_galleries = [], []
    for file in stale:
        try:
            file.unlink(missing_ok=True)
        except OSError as error:  # held open elsewhere, or the folder's permissions
            not_removed.append(f"{file} ({error.strerror or error})")
            continue
        removed += f"; removed the earlier run's {file.name}, which no longer matched"
    # they would show cells the new cells.csv no longer holds
    removed += remove_pictures([path for path in old_galleries if path not in pictured], "the earlier run's")
    # every smear in the files kept as a part too, and the files where the next run looks for them
    if (unfinished and outcome.kept == len(done) and targets[0] == table and not not_removed
            and _note_written(outcome.parts, [*targets, *pictured], smears)):
        again = "the same command"  # which may replace these files: they hold nothing its parts do not
    print(f"reddino-analyse: {sum(len(c.features) for c in done):,} cells of {counted(len(done), 'smear')} written to "
          f"{', '.join(shown(file) for file in targets)}{with_galleries}{removed}")
    if not_removed:
        print(f"reddino-analyse: could not remove the earlier run's {', '.join(not_removed)}, which no longer matches the "
              "new tables; delete it by hand", file=sys.stderr)
    if left:
        print(f"reddino-analyse: interrupted; {counted(left, 'smear')} not reached, not in the files"
              f"{f'; run {again} to go on{read_back}' if read_back else ''}", file=sys.stderr)
        return stop.status
    if stop.is_set():  # asked to stop while the files were written: they were finished first
        print("reddino-analyse: interrupted after the last smear; the files are whole", file=sys.stderr)
        return stop.status
    if skipped:
        print(f"reddino-analyse: {len(skipped)} of {counted(len(smears), 'smear')} skipped (see above)"
              f"{f'; run {again} to try them again{read_back}' if read_back else ''}", file=sys.stderr)
        return 1
    if unreadable:
        print(f"reddino-analyse: {counted(len(unreadable), 'folder')} could not be read (see above)"
              f"{f'; run {again} once they can be{read_back}' if read_back else ''}", file=sys.stderr)
        return 1
    return 1 if not_removed or targets[0] != table else 0  # a script reading DIR/cells.csv would read the other run's


def _clear_parts(parts: SmearParts, *, keep: list[str] | None = None) -> None:
    """Remove the parts (but those under ``keep``); where that fails, the files are written all the
    same: said, not raised."""
    try:
        if keep is None:
            parts.clear()
        else:
            parts.keep_only(keep)
    except OSError as error:  # a colleague's run made the folder; a virus scanner holds a part open
        if keep is None:
            print(f"reddino-analyse: warning: could not remove {shown(parts.folder)} ({error.strerror or error}), "
                  "whose smears are all in the files now; delete it by hand", file=sys.stderr, flush=True)


def _note_written(parts: SmearParts, files: list[Path], smears: list[Path]) -> bool:
    """Note the files this unfinished run wrote of ``smears`` beside its parts; False where that fails."""
    try:
        parts.note_written(files, smears)
    except OSError:  # then the same command needs --overwrite, as before the parts
        return False
    return True


def _check_output_folder(out: Path) -> None:
    """Refuse an output folder that could not be made or written in, without making it yet."""
    nearest = next((folder for folder in (out, *out.absolute().parents) if folder.exists()), None)
    if nearest is None:  # an unmapped drive, a share that is offline
        raise _Refused(f"cannot make the output folder {out}: {out.absolute().anchor} is not there")
    if not nearest.is_dir():
        raise _Refused(f"cannot make the output folder {out}: {nearest} is a file")
    if not os.access(nearest, os.W_OK):
        raise _Refused(f"the output folder {out} is not writable" if nearest == out else
                       f"cannot make the output folder {out}: {nearest} is not writable")


def _export_files(table: Path, with_embeddings: bool) -> list[Path]:
    """The table, its smear summary and, when kept, its embeddings."""
    return [table, summary_path(table), *[table.with_suffix(".npz")] * with_embeddings]


def _export(table: Path, done: list, classes: list[str] | None, args: argparse.Namespace,
            overwrite: bool, note: dict | None) -> tuple[list[Path], bool]:
    """Write the export; return its files and whether ``table`` is now this run's. When one of
    them cannot be written where it goes (another run, given the same --out, wrote it after this
    run's start; a file of the cut-short run this one goes on with, ``note``, was edited since; a
    spreadsheet holds the old one open), this run's files go beside them under a timestamped name
    rather than losing hours of smears."""
    try:
        return _write(table, done, classes, args, overwrite), True
    except FileExistsError as error:
        changed, appeared = _came_meanwhile(_export_files(table, args.with_embeddings), note)
        said = [f"{', '.join(changed)} changed"] * bool(changed) + [f"{', '.join(appeared)} appeared"] * bool(appeared)
        why = f"{' and '.join(said) or f'{error.filename} appeared'} while this run went on"
        why, ours = f"{why} ({'edited, or ' * bool(changed)}another run writing to the same folder?)", False
    except NotReplacedError as error:
        why, ours = f"{error} (open in another program?)", False
    except PartlyWrittenError as error:
        why, ours = f"{error}, so they no longer match (one open in another program?)", table in error.written
    print(f"reddino-analyse: {why}; this run's files get a timestamped name instead", file=sys.stderr, flush=True)
    aside = table.with_name(f"{table.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{table.suffix}")
    return _write(aside, done, classes, args, overwrite), ours  # the process id: two runs may collide in one second


def _came_meanwhile(files: list[Path], note: dict | None) -> tuple[list[str], list[str]]:
    """Those of ``files`` that the note of the cut-short run this one goes on with lists and that
    changed since, and those there that it does not list (all of them, without a note)."""
    there = [file for file in files if file.exists()]
    noted = [file for file in there if note is not None and os.path.abspath(file) in note["files"]]
    return ([str(file) for file in noted if not note_covers(note, [file])],
            [str(file) for file in there if file not in noted])


def _write(table: Path, done: list, classes: list[str] | None, args: argparse.Namespace,
           overwrite: bool) -> list[Path]:
    files = _export_files(table, args.with_embeddings)
    for file in _export_files(table, True):  # another run may be writing them: only those a day unchanged
        for leftover, size in remove_leftovers(file, older_than_s=LEFTOVER_AGE_S):
            print(f"reddino-analyse: removed {shown(leftover)} ({size / 2**20:,.1f} MB), left by a run killed while it "
                  f"wrote {file.name}", file=sys.stderr, flush=True)
    export_cells_csv(table, done, summary_path=files[1], embeddings_path=files[2] if args.with_embeddings else None,
                     classes=classes, overwrite=overwrite)
    return files


def _check_options(args: argparse.Namespace) -> None:
    if args.measure_only:
        model_options = [f"--{name.replace('_', '-')}"
                         for name in ("model", "device", "compile", "head", "with_embeddings") if getattr(args, name)]
        if model_options:
            raise _Refused(f"--measure-only runs no model, so it cannot take {' or '.join(model_options)}.")
    if args.galleries and not args.head:
        raise _Refused("--galleries shows the cells of each class a head predicts: give --head PATH too.")
    if not args.measure_only and not (args.head or args.with_embeddings):
        raise _Refused("a model run needs --head PATH (to classify every cell) or --with-embeddings (to keep the "
                       "embeddings in DIR/cells.npz): without either, nothing it computes would be written. "
                       "Pass --measure-only to segment and measure only.")
    if args.pixel_size_um is not None and (refusal := pixel_size_refusal(args.pixel_size_um)):
        raise _Refused(f"--pixel-size-um {args.pixel_size_um:g}: {refusal}")


def _precision_to_keep(settings: dict, earlier: dict | None) -> str | None:
    """The precision of the ``earlier`` run on this output folder (its settings), where that
    alone differs from this run's ``settings``: timed again on a busy CPU, "auto" may choose the
    other, and the earlier run's smears would be analysed again (or, its files written, refused)."""
    if not earlier or not settings.get("model") or not isinstance(earlier.get("model"), dict):
        return None
    was = earlier["model"].get("dtype")
    same_but_precision = {**earlier, "model": {**earlier["model"], "dtype": settings["model"]["dtype"]}}
    if was == settings["model"]["dtype"] or same_but_precision != json.loads(json.dumps(settings)):
        return None
    return str(was).removeprefix("torch.")


def _analysis(args: argparse.Namespace, dtype: str = "auto") -> SmearAnalysis:
    """The settings for every smear, with the model and head loaded (or refused) up front, in
    ``dtype`` (see :func:`~napari_reddino.embedding.resolve_dtype`)."""
    if args.measure_only:
        return SmearAnalysis(pixel_size_um=args.pixel_size_um)
    from .cell_classifier import CellClassifier  # torch and timm load only when a model runs
    from .embedding import load_embedder
    from .model_errors import ModelLoadError

    model = args.model or _model_of_head(args.head) or DEFAULT_MODEL
    if args.model and args.head:
        _check_head_model(args.head, args.model)
    if Path(model).expanduser().is_file():  # the library's message for one names its Python argument
        raise _Refused(f"--model {model} is a weights file; give the model folder (config.json and "
                       "model.safetensors, as reddino-train export writes it) or a Hub name")
    try:
        embedder = load_embedder(model, device=args.device or "auto", dtype=dtype, compile=args.compile)
    except (ModelLoadError, ValueError) as error:  # DeviceError is a ValueError
        raise _Refused(f"cannot load the model {model!r}: {error}") from error
    if embedder.compiled:
        print("reddino-analyse: torch.compile compiles the model during the first smear (20-32 s on an H100)",
              file=sys.stderr, flush=True)
    head = None
    if args.head:
        try:
            head = CellClassifier.load(args.head, model_id=embedder.model_id)
        except (OSError, ValueError) as error:  # HeadMismatchError is a ValueError
            raise _head_refused(args.head, error) from error
    return SmearAnalysis(embedder=embedder, model=model, head=head, pixel_size_um=args.pixel_size_um,
                         keep_embeddings=args.with_embeddings, galleries=Path(args.out) / GALLERIES if args.galleries
                         else None)


def _head_refused(head: str, error: Exception) -> _Refused:
    return _Refused(f"cannot use the head {head}: {error}")


def _learnt_from(head: str) -> str | None:
    """The model the saved ``head`` learnt from, read before any model loads (or downloads) in vain."""
    from .cell_classifier import saved_head_model

    try:
        return saved_head_model(head)
    except (OSError, ValueError) as error:
        raise _head_refused(head, error) from error


def _check_head_model(head: str, model: str) -> None:
    """Refuse, before ``model`` loads (or downloads for minutes), a head that learnt from another
    Hub repository than the Hub model given. A local folder (a copy of the Hub model's files, on a
    machine offline) and another revision are compared once loaded, by their weights."""
    from .models import hub_id

    learnt = _learnt_from(head)
    repositories = [(hub_id(name) or "").partition("@")[0].lower() for name in (learnt or "", model)]
    if "" in repositories or repositories[0] == repositories[1]:
        return
    raise _Refused(f"the head {head} learnt from {learnt}, not from --model {model}: leave --model out to embed the "
                   "cells with the head's model, or train a head on this one")


def _model_of_head(head: str | None) -> str | None:
    """The Hub model a saved head learnt from: without --model, the cells are embedded with it.
    A local model's folder is not in the head (only its name), so it must be given."""
    from .models import hub_id

    model = _learnt_from(head) if head else None
    if model is None:
        return None
    if hub_id(model) or (Path(model).is_absolute() and Path(model).is_dir()):  # the latter: an older head's id
        print(f"reddino-analyse: the head learnt from {model}; its cells are embedded with it", flush=True)
        return model
    raise _Refused(f"the head {head} learnt from the local model {Path(model).name!r}; give its folder with --model")


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


if __name__ == "__main__":
    sys.exit(main())
