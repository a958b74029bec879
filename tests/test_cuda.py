"""Cropping and embedding on an NVIDIA GPU, against the CPU's answers.

Skipped where there is no CUDA device (as on CI); ``benchmarks/gpu.sh`` runs them on a lent
GPU machine.
"""

import warnings
from importlib.resources import files

import numpy as np
import pytest
import torch
from _model_fixtures import reddino_small_files, save_folder, tiny_vit  # noqa: F401  (fixture)
from skimage.io import imread

from napari_reddino import segment_cells
from napari_reddino.crops import CROP_MODES, CropSampler, cell_windows, smear_home
from napari_reddino.embedding import EmbeddingCancelled, clear_embedder_cache, load_embedder
from napari_reddino.steps import run_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def real_smear():
    image = imread(files("napari_reddino") / "data" / "chula_rbc12" / "1.jpg")
    return image, segment_cells(image)


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_embedder_cache()
    yield
    clear_embedder_cache()


@pytest.mark.parametrize("mode", CROP_MODES)
def test_crops_cut_on_the_gpu_equal_the_cpus(real_smear, mode):
    image, labels = real_smear
    windows = cell_windows(labels)
    crops = {
        device: CropSampler(image, labels, size=(224, 224), mode=mode, device=device, mean=MEAN, std=STD)(
            windows.ids, windows.boxes
        )
        for device in ("cpu", "cuda")
    }
    assert crops["cuda"].device.type == "cuda"
    np.testing.assert_allclose(crops["cuda"].cpu().numpy(), crops["cpu"].numpy(), atol=1e-5)


def test_a_smear_the_gpu_cannot_hold_is_cut_on_the_cpu_into_the_same_crops(real_smear):
    image, labels = real_smear
    cuda = torch.device("cuda")
    free = torch.cuda.mem_get_info(cuda)[0]
    assert smear_home(cuda, free // 8) == cuda and smear_home(cuda, free // 2) == torch.device("cpu")
    windows = cell_windows(labels)
    expected = CropSampler(image, labels, size=(224, 224), device="cpu", mean=MEAN, std=STD)(windows.ids, windows.boxes)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # room for less than the smear's pixels: the upload itself runs out of memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + image.nbytes // 2) / total)
    try:
        sampler = CropSampler(image, labels, size=(224, 224), device="cuda", mean=MEAN, std=STD)
        crops = sampler(windows.ids, windows.boxes)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert sampler.home == torch.device("cpu") and sampler.device == cuda
    np.testing.assert_array_equal(crops.numpy(), expected.numpy())


def test_auto_precision_on_the_gpu_is_within_one_percent_of_fp32_on_the_cpu(reddino_small_files, real_smear):
    image, labels = real_smear
    gpu = load_embedder(reddino_small_files, device="cuda")
    major, minor = torch.cuda.get_device_capability()  # bf16 from Ampere on; fp16 on Volta, Turing and the P100
    fast_fp16 = (major, minor) == (6, 0) or major >= 7
    assert gpu.dtype == (torch.bfloat16 if major >= 8 else torch.float16 if fast_fp16 else torch.float32)
    assert gpu.device.type == "cuda"
    ids, on_gpu = gpu.embed(image, labels)
    cpu_ids, on_cpu = load_embedder(reddino_small_files, device="cpu", dtype="float32").embed(image, labels)
    np.testing.assert_array_equal(ids, cpu_ids)
    error = np.linalg.norm(on_gpu - on_cpu, axis=1) / np.linalg.norm(on_cpu, axis=1)
    assert error.max() < 1e-2


def test_gpu_batches_report_every_cell_once_in_order_and_give_what_one_batch_gives(reddino_small_files, real_smear):
    """On a GPU a batch's results come back while the next runs: the progress and the rows must not tell."""
    image, labels = real_smear
    embedder = load_embedder(reddino_small_files, device="cuda", dtype="float32")
    reports = []
    ids, batched = embedder.embed(image, labels, batch_size=16, progress=lambda done, total: reports.append(done))
    _, whole = embedder.embed(image, labels, batch_size=len(ids))
    assert reports == [*range(16, len(ids), 16), len(ids)]
    error = np.linalg.norm(batched - whole, axis=1) / np.linalg.norm(whole, axis=1)
    assert error.max() < 2e-3  # batch sizes round differently on a GPU (6.8e-4 on an H100)
    stops = iter([False, False, True])
    with pytest.raises(EmbeddingCancelled):
        embedder.embed(image, labels, batch_size=16, should_stop=lambda: next(stops))


def test_a_model_that_overflows_float16_goes_on_in_float32_with_a_warning(tmp_path, real_smear):
    image, labels = real_smear
    quiet = save_folder(tiny_vit(), tmp_path / "quiet")
    loud_model = tiny_vit()
    with torch.no_grad():
        loud_model.patch_embed.proj.weight.mul_(1e5)  # patch features near 1e5: float16 ends at 65,504
    loud = save_folder(loud_model, tmp_path / "loud")
    for folder in (quiet, loud):
        expected = load_embedder(folder, device="cuda", dtype="float32").embed(image, labels)[1]
        half = load_embedder(folder, device="cuda", dtype="float16")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = half.embed(image, labels)[1]
        overflowed = [str(w.message) for w in caught if "overflowed float16" in str(w.message)]
        assert len(overflowed) == (folder == loud) and half.dtype == (torch.float32 if folder == loud else torch.float16)
        error = np.linalg.norm(found - expected, axis=1) / np.linalg.norm(expected, axis=1)
        assert error.max() < (1e-5 if folder == loud else 1e-2)


def test_a_real_out_of_memory_error_halves_the_batch(reddino_small_files, real_smear):
    """Memory capped at 400 MB above what the model holds: a batch of 512 ViT-S inputs does not
    fit, a smaller one does, and the embeddings are those of the unconstrained run."""
    image, labels = real_smear
    embedder = load_embedder(reddino_small_files, device="cuda")
    windows = cell_windows(labels)
    sampler = CropSampler(image, labels, size=embedder.input_size, mean=embedder.mean, std=embedder.std)
    crops = sampler(windows.ids, windows.boxes).repeat(512 // len(windows) + 1, 1, 1, 1)[:512]
    expected = embedder.embed_crops(crops[:8]).cpu().numpy()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 400 * 2**20) / total)
    try:
        capped = embedder.embed_crops(crops).cpu().numpy()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert embedder._fitting_batch is not None and embedder._fitting_batch < 512
    error = np.linalg.norm(capped[:8] - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert error.max() < 1e-2


def test_a_brush_stroke_re_embeds_on_the_gpu_only_the_cells_whose_crops_it_changed(reddino_small_files, real_smear):
    image, labels = real_smear
    embedder = load_embedder(reddino_small_files, device="cuda")
    first = run_steps(embedder.embed_steps(image, labels))
    painted = labels.copy()
    cell = first.ids[len(first.ids) // 2]
    rows, cols = np.nonzero(painted == cell)
    painted[rows[rows < np.median(rows)], cols[rows < np.median(rows)]] = 0
    again = run_steps(embedder.embed_steps(image, painted, reuse=first, batch_size=16))  # batches: some all kept
    assert len(first.ids) - 8 <= again.reused < len(first.ids)
    fresh = run_steps(embedder.embed_steps(image, painted))
    np.testing.assert_array_equal(again.checks, fresh.checks)  # crops cut on the GPU: the same checks
    changed = (again.embeddings != first.embeddings).any(axis=1)
    error = np.linalg.norm(again.embeddings - fresh.embeddings, axis=1) / np.linalg.norm(fresh.embeddings, axis=1)
    assert changed.sum() == len(first.ids) - again.reused and error.max() < 1e-2
