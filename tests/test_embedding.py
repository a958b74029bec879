"""Embedding cells with a tiny real ViT loaded through load_embedder."""

import gc
import os
import shutil
import threading
import warnings
import weakref
from importlib.resources import files

import numpy as np
import pytest
import torch
from _compiler import needs_a_cxx_compiler
from _model_fixtures import (  # noqa: F401  (fixtures)
    TINY_DIM,
    hub_cache,
    publish_to_cache,
    record_crops,
    save_folder,
    tiny_folder,
    tiny_vit,
)
from skimage.io import imread

from napari_reddino import embedding, segment_cells
from napari_reddino.cell_embeddings import EmbeddedCells
from napari_reddino.crops import CropInputError, background_colour, cell_crops, prepare_crops
from napari_reddino.image_input import LabelsInputError
from napari_reddino.embedding import EmbeddingCancelled, clear_embedder_cache, load_embedder, resolve_dtype
from napari_reddino.model_errors import CheckpointError
from napari_reddino.models import LoadedModel, trained_crops
from napari_reddino.steps import run_steps

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_embedder_cache()
    yield
    clear_embedder_cache()


@pytest.fixture
def embedder(tiny_folder):
    """fp32 on every machine ("auto" is bf16 on CPUs with native bf16)."""
    return load_embedder(tiny_folder[1], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def real_smear():
    image = imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg")
    return image, segment_cells(image)


def three_cells():
    """Cells labelled 7, 2, 5 (not in order) on a flat background."""
    image = np.full((90, 120, 3), 210, np.uint8)
    labels = np.zeros((90, 120), np.int32)
    rows, cols = np.ogrid[:90, :120]
    for label, (row, col, radius, colour) in {
        7: (20, 20, 9, (150, 40, 90)),
        2: (60, 50, 12, (120, 60, 110)),
        5: (30, 95, 7, (170, 30, 80)),
    }.items():
        inside = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        image[inside], labels[inside] = colour, label
    return image, labels


def test_embedder_describes_its_model(embedder, tiny_folder):
    assert embedder.model_id.startswith(f"{tiny_folder[1].name}@sha256:")
    assert (embedder.dim, embedder.input_size) == (TINY_DIM, (56, 56))
    assert embedder.device == torch.device("cpu") and embedder.dtype == torch.float32
    np.testing.assert_allclose(embedder.mean, MEAN)
    np.testing.assert_allclose(embedder.std, STD)


def test_embeddings_are_the_class_token_of_each_cells_crop_in_label_order(embedder, tiny_folder):
    image, labels = three_cells()
    ids, embeddings = embedder.embed(image, labels, batch_size=2)
    np.testing.assert_array_equal(ids, [2, 5, 7])
    assert ids.dtype == np.int64 and embeddings.dtype == np.float32 and embeddings.shape == (3, TINY_DIM)
    # known answer: the saved model's class token, on the documented crops, normalised by hand
    _, crops = cell_crops(image, labels, 56)
    inputs = torch.from_numpy(((crops - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        expected = tiny_folder[0].forward_features(inputs)[:, 0].numpy()
    np.testing.assert_allclose(embeddings, expected, rtol=1e-4, atol=1e-5)


TRAINED = {"mode": "context", "scale": "cell", "margin": 0.5}


def test_a_model_that_records_its_training_crops_cuts_cells_so_unless_told_otherwise(tiny_folder, hub_cache):
    image, labels = three_cells()
    plain = load_embedder(tiny_folder[1], device="cpu", dtype="float32")
    assert trained_crops(tiny_folder[1]) is None and plain.trained_crops is None
    assert plain.crops == {"mode": "masked", "scale": "smear", "margin": 0.25}  # the plugin's defaults
    defaults = plain.embed(image, labels)[1]
    as_trained = plain.embed(image, labels, **TRAINED)[1]
    assert not np.allclose(defaults, as_trained, atol=1e-3)  # the settings matter for these cells
    folder = record_crops(shutil.copytree(tiny_folder[1], hub_cache.parent / "trained"), TRAINED)
    assert trained_crops(folder) == TRAINED
    embedder = load_embedder(folder, device="cpu", dtype="float32")
    assert embedder.trained_crops == embedder.crops == TRAINED
    assert load_embedder(folder, device="cpu", dtype="float32", compile=True).crops == TRAINED  # its twin's record
    np.testing.assert_allclose(embedder.embed(image, labels)[1], as_trained, rtol=1e-5, atol=1e-6)
    # each setting given wins over the record, the others still come from it
    np.testing.assert_allclose(embedder.embed(image, labels, mode="masked")[1],
                               plain.embed(image, labels, mode="masked", scale="cell", margin=0.5)[1], rtol=1e-5, atol=1e-6)
    # a Hub model's record is read from the cache, offline, without its weights
    publish_to_cache(folder, hub_cache, "lab/trained")
    assert trained_crops("hf_hub:lab/trained") == TRAINED
    assert trained_crops(hub_cache / "models--lab--trained") == TRAINED  # that cache's folder, copied and browsed to
    assert trained_crops("hf_hub:lab/not-downloaded") is None and trained_crops("hf_hub:not a repo") is None


@pytest.mark.parametrize("record", [
    {"mode": "blurred", "scale": "cell", "margin": 0.5}, {"mode": "context", "scale": "cell", "margin": 9},
    {"mode": "context", "scale": "cell"}, {"mode": "context", "scale": "cell", "margin": True}, "context",
])
def test_a_training_crops_record_that_is_not_one_names_the_file_and_is_not_passed_over(tiny_folder, record):
    record_crops(tiny_folder[1], record)
    for read in (trained_crops, load_embedder):
        with pytest.raises(CheckpointError, match=rf"{tiny_folder[1] / 'config.json'} records the model's training "
                                                  r"crops as reddino_crops=.*remove reddino_crops"):
            read(tiny_folder[1])


def test_same_input_gives_identical_embeddings_and_batching_does_not_matter(embedder):
    image, labels = three_cells()
    first = embedder.embed(image, labels)[1]
    np.testing.assert_array_equal(embedder.embed(image, labels)[1], first)
    np.testing.assert_allclose(embedder.embed(image, labels, batch_size=1)[1], first, rtol=1e-5, atol=1e-6)


def test_masked_mode_changes_only_cells_with_neighbours_in_their_window(embedder):
    image, labels = three_cells()
    context = embedder.embed(image, labels, mode="context", margin=0.1, scale="cell")[1]
    masked = embedder.embed(image, labels, mode="masked", margin=0.1, scale="cell")[1]
    np.testing.assert_allclose(masked, context, atol=1e-6)  # at a 10 % margin no window holds a neighbour
    wide = embedder.embed(image, labels, mode="context", margin=2.0)[1]
    assert np.abs(embedder.embed(image, labels, mode="masked", margin=2.0)[1] - wide).max() > 1e-3


@pytest.mark.parametrize(("mode", "scale"), [("masked", "smear"), ("context", "cell")])
def test_embedding_some_cells_gives_their_rows_of_embedding_every_cell(embedder, mode, scale):
    image, labels = three_cells()
    every_id, every = embedder.embed(image, labels, mode=mode, scale=scale, margin=2.0)
    ids, chosen = embedder.embed(image, labels, mode=mode, scale=scale, margin=2.0, ids=[7, 2])
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_allclose(chosen, every[np.isin(every_id, [2, 7])], rtol=1e-5, atol=1e-6)


def count_forwards(embedder) -> list[int]:
    """The batch sizes that go through ``embedder``'s model from now on."""
    sizes = []
    embedder.model.register_forward_pre_hook(lambda _, inputs: sizes.append(len(inputs[0])))
    return sizes


def test_an_earlier_run_lends_its_embeddings_to_cells_whose_crops_are_unchanged(embedder):
    image, labels = three_cells()
    first = run_steps(embedder.embed_steps(image, labels))
    assert first.reused == 0 and first.checks.shape == (3, 2) and len(np.unique(first.checks, axis=0)) == 3
    forwards = count_forwards(embedder)
    again = run_steps(embedder.embed_steps(image, labels, reuse=first))
    assert again.reused == 3 and forwards == []  # nothing changed: the model did not run
    np.testing.assert_array_equal(again.embeddings, first.embeddings)

    moved = labels.copy()
    moved[moved == 5] = 0
    rows, cols = np.nonzero(labels == 5)
    moved[rows, cols + 3] = 5  # cell 5 painted 3 px to the right: its window moves, the others' do not
    painted = run_steps(embedder.embed_steps(image, moved, reuse=first))
    assert painted.reused == 2 and forwards == [1]
    np.testing.assert_array_equal(painted.embeddings[[0, 2]], first.embeddings[[0, 2]])  # cells 2 and 7
    np.testing.assert_allclose(painted.embeddings, embedder.embed(image, moved)[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(painted.embeddings[1], first.embeddings[1], atol=1e-3)


def test_a_stroke_that_moves_the_background_colour_a_level_re_embeds_only_the_cells_it_reaches(embedder):
    # 35 cells on a grainy slide whose median lies at the edge of a level: erasing half of cell 1
    # moves the median of the unlabelled pixels a level, which once changed most crops by float
    # rounding (34 of 35 cells embedded again).
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(204.99, 6, (300, 400, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((300, 400), np.int32)
    rows, cols = np.ogrid[:300, :400]
    for label, (row, col) in enumerate(((r, c) for r in range(30, 300, 55) for c in range(28, 400, 57)), start=1):
        inside = (rows - row) ** 2 + (cols - col) ** 2 <= 81
        image[inside], labels[inside] = (150, 40, 90), label
    first = run_steps(embedder.embed_steps(image, labels))
    erased = labels.copy()
    cell_rows, cell_cols = np.nonzero(labels == 1)
    top = cell_rows < np.median(cell_rows)
    erased[cell_rows[top], cell_cols[top]] = 0
    assert not np.array_equal(background_colour(image, erased), first.background)  # the stroke moved it

    painted = run_steps(embedder.embed_steps(image, erased, reuse=first))
    np.testing.assert_array_equal(painted.background, first.background)
    again = painted.ids[~(painted.embeddings == first.embeddings).all(axis=1)]
    windows, _ = prepare_crops(image, erased, size=embedder.input_size)
    corner, far = np.floor(windows.boxes[:, :2]) - 1, np.ceil(windows.boxes[:, 2:]) + 1
    reaches = [((corner[i, 0] <= cell_cols[top]) & (cell_cols[top] <= far[i, 0])
                & (corner[i, 1] <= cell_rows[top]) & (cell_rows[top] <= far[i, 1])).any() for i in range(len(windows))]
    assert 1 in again and set(again) <= set(windows.ids[reaches]) and painted.reused == 35 - len(again)
    fresh = run_steps(embedder.embed_steps(image, erased))  # a run of its own takes the median as it now is
    assert not np.array_equal(fresh.background, first.background)
    np.testing.assert_allclose(painted.embeddings, fresh.embeddings, atol=0.05 * np.abs(fresh.embeddings).max())


def test_an_earlier_run_of_another_model_or_without_its_vectors_lends_nothing(embedder, tiny_folder, tmp_path):
    image, labels = three_cells()
    first = run_steps(embedder.embed_steps(image, labels))
    copied = load_embedder(shutil.copytree(tiny_folder[1], tmp_path / "a colleague's copy"), device="cpu",
                           dtype="float32")
    assert copied.model_id != first.model_id  # the same weights by another name lend everything
    assert run_steps(copied.embed_steps(image, labels, reuse=first)).reused == 3
    other = load_embedder(save_folder(tiny_vit(seed=1), tmp_path / "other"), device="cpu", dtype="float32")
    assert run_steps(other.embed_steps(image, labels, reuse=first)).reused == 0
    dropped = EmbeddedCells(first.ids, first.embeddings[:, :0], first.checks, first.model_id)  # reddino-analyse's
    assert run_steps(embedder.embed_steps(image, labels, reuse=dropped)).reused == 0


def test_asking_for_cells_that_are_not_in_the_labels_names_them(embedder):
    image, labels = three_cells()
    with pytest.raises(CropInputError, match=r"No cell has label 3, 4 \(2 of the 3 asked for\)"):
        embedder.embed(image, labels, ids=[2, 3, 4])
    with pytest.raises(CropInputError, match=r"No cell has label 9 \(1 of the 2 asked for\)"):
        embedder.embed(image, labels, ids=[7, 9])  # above the largest label
    with pytest.raises(CropInputError, match="ids must be whole label ids, not float64 values"):
        embedder.embed(image, labels, ids=[2.5, 7])  # not cut to cell 2
    np.testing.assert_array_equal(embedder.embed(image, labels, ids=[7, 2, 7])[0], [2, 7])  # each cell once


def test_a_batch_size_below_one_or_not_whole_is_refused_with_the_reason(embedder):
    for size in (0, 1.5, "8"):
        with pytest.raises(ValueError, match=f"batch_size must be a positive whole number of cells, not {size!r}"):
            embedder.embed(*three_cells(), batch_size=size)


def test_no_cells_give_an_empty_result_of_the_right_width(embedder):
    image, labels = three_cells()
    ids, embeddings = embedder.embed(image, np.zeros_like(labels))
    assert ids.shape == (0,) and embeddings.shape == (0, TINY_DIM) and embeddings.dtype == np.float32


def test_labels_that_do_not_match_the_image_are_refused(embedder):
    image, labels = three_cells()
    with pytest.raises(LabelsInputError, match="labels have shape"):
        embedder.embed(image, labels[:-1])


def test_progress_counts_cells_and_should_stop_cancels_between_batches(embedder):
    image, labels = three_cells()
    seen = []
    embedder.embed(image, labels, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 3), (3, 3)]

    stop, seen = threading.Event(), []

    def stop_after_first_batch(done, total):
        seen.append(done)
        stop.set()

    with pytest.raises(EmbeddingCancelled):
        embedder.embed(image, labels, batch_size=1, progress=stop_after_first_batch, should_stop=stop.is_set)
    assert seen == [1]


def test_closing_the_step_generator_stops_the_work(embedder):
    image, labels = three_cells()
    forwards = count_forwards(embedder)
    steps = embedder.embed_steps(image, labels, batch_size=1)
    assert next(steps) == (1, 3)
    steps.close()
    assert forwards == [1]  # the other two cells never went through the model
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("reddino-crops")]


def test_models_are_cached_per_model_device_and_dtype_and_reloaded_when_changed(tiny_folder, tmp_path):
    model, folder = tiny_folder
    first = load_embedder(folder, device="cpu", dtype="float32")
    assert load_embedder(folder, device="cpu", dtype=torch.float32) is first
    assert load_embedder(folder, device="cpu", dtype="bfloat16") is not first
    auto = resolve_dtype("auto", torch.device("cpu"))
    assert load_embedder(folder, device="cpu") is load_embedder(folder, device="cpu", dtype=auto)
    save_folder(tiny_vit(seed=1), tmp_path / "retrained")
    (tmp_path / "retrained" / "model.safetensors").replace(folder / "model.safetensors")
    second = load_embedder(folder, device="cpu", dtype="float32")
    assert second is not first
    first = weakref.ref(first)
    gc.collect()
    assert first() is None  # the older weights were let go, not kept beside the new ones
    save_folder(tiny_vit(seed=2), folder)  # rewritten in place: the folder's own time stays
    third = load_embedder(folder, device="cpu", dtype="float32")
    assert third is not second
    image, labels = three_cells()
    assert not np.allclose(third.embed(image, labels)[1], second.embed(image, labels)[1])
    twin = save_folder(tiny_vit(seed=3), tmp_path / "twin") / "model.safetensors"
    before = (folder / "model.safetensors").stat()
    os.utime(twin, ns=(before.st_atime_ns, before.st_mtime_ns))  # saved in the same instant, of the same size
    shutil.copy2(twin, folder / "model.safetensors")  # cp -p: size and time as before, only the inode's ctime moves
    assert (folder / "model.safetensors").stat().st_mtime_ns == before.st_mtime_ns
    fourth = load_embedder(folder, device="cpu", dtype="float32")
    assert fourth is not third and fourth.model_id != third.model_id


def test_the_three_models_used_last_stay_loaded_and_an_older_one_is_let_go(tmp_path):
    folders = [save_folder(tiny_vit(seed=seed), tmp_path / f"m{seed}") for seed in range(4)]
    loaded = [load_embedder(folder, device="cpu", dtype="float32") for folder in folders[:3]]
    assert load_embedder(folders[0], device="cpu", dtype="float32") is loaded[0]  # used again: now the newest
    load_embedder(folders[3], device="cpu", dtype="float32")  # a fourth: the one used longest ago goes
    assert load_embedder(folders[0], device="cpu", dtype="float32") is loaded[0]
    assert load_embedder(folders[2], device="cpu", dtype="float32") is loaded[2]
    gone = weakref.ref(loaded.pop(1))
    gc.collect()
    assert gone() is None  # not held by the cache any more


def test_a_hub_model_is_loaded_again_when_the_cache_holds_a_newer_commit(hub_cache, tmp_path):
    publish_to_cache(save_folder(tiny_vit(seed=3), tmp_path / "v1"), hub_cache, "lab/tiny-rbc")
    first = load_embedder("hf_hub:lab/tiny-rbc", device="cpu", dtype="float32")
    assert load_embedder("hf_hub:lab/tiny-rbc", device="cpu", dtype="float32") is first
    publish_to_cache(save_folder(tiny_vit(seed=4), tmp_path / "v2"), hub_cache, "lab/tiny-rbc", revision="b" * 40)
    second = load_embedder("hf_hub:lab/tiny-rbc", device="cpu", dtype="float32")
    assert second is not first and second.model_id != first.model_id


def test_a_batch_holds_what_half_the_free_memory_holds_up_to_the_device_s_cap(tiny_folder, monkeypatch):
    embedder = load_embedder(tiny_folder[1], device="cpu", dtype="float32")
    free = {}
    monkeypatch.setattr(embedding, "_free_memory", lambda device: free["bytes"])
    sizes = {}
    for free["bytes"] in (None, 0, 10**6, 10**7, 10**8, 10**12):
        sizes[free["bytes"]] = embedder.auto_batch_size()
    assert sizes[None] == sizes[10**12] == embedding._MAX_BATCH["cpu"]  # unknown, or plenty: the cap
    assert sizes[0] == sizes[10**6] == 1  # never none
    assert sizes[10**6] <= sizes[10**7] <= sizes[10**8] <= sizes[10**12]
    per_image = embedder.input_size[0] * embedder.input_size[1] * 3 * 4 * embedding._ACTIVATION_FACTOR
    assert sizes[10**7] == max(1, min(10**7 // 2 // per_image, 8))  # half the free memory, the rest for the model


def test_bfloat16_stays_within_one_percent_of_float32(tiny_folder, real_smear):
    image, labels = real_smear
    fp32 = load_embedder(tiny_folder[1], device="cpu", dtype="float32").embed(image, labels)[1]
    embedder = load_embedder(tiny_folder[1], device="cpu", dtype="bfloat16")
    assert embedder.dtype == torch.bfloat16
    bf16 = embedder.embed(image, labels)[1]
    error = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert 1e-4 < error.max() < 1e-2  # it did run in bf16 (the error is not nil), and within one percent


@needs_a_cxx_compiler
def test_a_compiled_model_embeds_as_the_model_does_compiled_once_for_every_batch_size(tiny_folder, real_smear):
    image, labels = real_smear
    expected = load_embedder(tiny_folder[1], device="cpu", dtype="float32").embed(image, labels)[1]
    compiled = load_embedder(tiny_folder[1], device="cpu", dtype="float32", compile=True)
    assert compiled.compiled and repr(compiled).endswith(", compiled)")
    torch._dynamo.reset()  # nothing compiled by an earlier test
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # running uncompiled would warn
        for batch_size in (8, 5, 1):  # each with a last, shorter batch; 1 is padded to 2
            np.testing.assert_allclose(compiled.embed(image, labels, batch_size=batch_size)[1], expected,
                                       rtol=1e-4, atol=1e-5)
    assert compiled.compiled and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@needs_a_cxx_compiler
def test_a_model_the_compiler_fails_on_runs_uncompiled_with_a_warning(tiny_folder):
    # a machine without a C++ compiler (config.patch, not monkeypatch: that leaves the cache
    # setting deleted, and every later compile in the process fails)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("/no/such/c++",), "fx_graph_cache": False})
    torch._dynamo.reset()
    image, labels = three_cells()
    expected = load_embedder(tiny_folder[1], device="cpu", dtype="float32").embed(image, labels)[1]
    compiled = load_embedder(tiny_folder[1], device="cpu", dtype="float32", compile=True)
    try:
        with no_compiler, pytest.warns(RuntimeWarning, match=r"could not compile .* it runs uncompiled"):
            found = compiled.embed(image, labels)[1]
    finally:
        torch._dynamo.reset()  # the failed compile leaves nothing for later tests
    assert not compiled.compiled
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6)


@needs_a_cxx_compiler
def test_the_model_s_own_errors_come_through_the_compiled_path_and_it_stays_compiled(tiny_folder):
    compiled = load_embedder(tiny_folder[1], device="cpu", dtype="float32", compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not compile": the model itself refuses these inputs
        with pytest.raises(RuntimeError, match="channels"):
            compiled.embed_crops(torch.zeros(2, 4, 56, 56))  # four channels, where the patch embedding takes three
    assert compiled.compiled


class OutOfMemoryInTheCompiler(torch.nn.Module):
    """What a compiled network raises when the compiler runs out of CUDA memory above two images:
    the out-of-memory error wrapped in the compiler's own."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if len(x) > 2:
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            except torch.cuda.OutOfMemoryError as error:
                raise RuntimeError("backend compiler failed") from error
        return self.model(x)


def test_out_of_memory_in_the_compiler_halves_the_batch_as_it_does_uncompiled(embedder, tiny_folder):
    crops = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    expected = embedder.embed_crops(crops).numpy()
    compiled = load_embedder(tiny_folder[1], device="cpu", dtype="float32", compile=True)
    compiled.network = OutOfMemoryInTheCompiler(compiled.model)
    np.testing.assert_allclose(compiled.embed_crops(crops).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert compiled._fitting_batch == 2 and compiled.compiled  # halved to two images, still compiled


def test_a_compiled_and_a_plain_embedder_share_weights_and_go_together_when_the_files_change(tiny_folder):
    model, folder = tiny_folder
    plain = load_embedder(folder, device="cpu", dtype="float32")
    compiled = load_embedder(folder, device="cpu", dtype="float32", compile=True)
    assert compiled is not plain and compiled.model is plain.model and compiled.compiled and not plain.compiled
    assert load_embedder(folder, device="cpu", dtype="float32", compile=True) is compiled
    compiled, plain = weakref.ref(compiled), weakref.ref(plain)
    save_folder(tiny_vit(seed=2), folder)
    load_embedder(folder, device="cpu", dtype="float32")  # the new weights, uncompiled
    gc.collect()
    assert compiled() is None and plain() is None  # neither kept the old weights


class RunsOutOfMemoryAbove(torch.nn.Module):
    """A real model on a device that can hold only ``limit`` images at once."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.batches = model, limit, []
        self.num_features = model.num_features

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append(len(x))
        return self.model(x)


def test_out_of_memory_halves_the_batch_instead_of_failing(embedder):
    image, labels = three_cells()
    expected = embedder.embed(image, labels)[1]
    small = RunsOutOfMemoryAbove(embedder.model, limit=1)
    loaded = LoadedModel(embedder.model_id, small, embedder.input_size, embedder.mean, embedder.std)
    limited = type(embedder)(loaded, device=embedder.device, dtype=embedder.dtype)
    np.testing.assert_allclose(limited.embed(image, labels, batch_size=3)[1], expected, rtol=1e-5, atol=1e-6)
    assert small.batches == [1, 1, 1]
    small.limit, small.batches = 3, []  # the other program let its memory go: the next smear tries in full
    np.testing.assert_allclose(limited.embed(image, labels, batch_size=3)[1], expected, rtol=1e-5, atol=1e-6)
    assert small.batches == [3]


def test_real_smear_gives_one_embedding_per_segmented_cell(embedder, real_smear):
    image, labels = real_smear
    ids, embeddings = embedder.embed(image, labels, mode="masked")
    np.testing.assert_array_equal(ids, np.unique(labels)[1:])
    assert embeddings.shape == (len(ids), TINY_DIM) and np.isfinite(embeddings).all()
    # distinct cells give distinct embeddings
    assert len(np.unique(embeddings.round(5), axis=0)) == len(ids)
