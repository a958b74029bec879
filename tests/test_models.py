"""Model registry and loading, through the real loading code, offline, on models made here."""

import hashlib
import http.server
import json
import math
import re
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import timm
import torch
from _cpu_precision import CPUS, pretend_cpu
from _model_fixtures import (  # noqa: F401  (pytest fixtures)
    REVISION,
    TINY_DIM,
    hub_cache,
    publish_to_cache,
    reddino_small_files,
    save_folder,
    serving_hub,
    tiny_folder,
    tiny_vit,
    without_proxies,
)

from napari_reddino import CellClassifier, precision_speed
from napari_reddino.cell_classifier import HeadMismatchError
from napari_reddino.cell_embeddings import model_key
from napari_reddino.embedding import (
    DeviceError,
    clear_embedder_cache,
    iter_load_embedder,
    list_devices,
    load_embedder,
    resolve_device,
    resolve_dtype,
)
from napari_reddino.hub_files import _reporting_tqdm
from napari_reddino.model_errors import CheckpointError, ModelNotAvailableError, UnknownModelError
from napari_reddino.models import (
    KNOWN_MODELS,
    find_model_files,
    load_model,
    model_version,
)
from reddino_train.train import precision_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)


def class_token_after_norm(model, x):
    """The RedDino embedding contract, computed the long way."""
    with torch.inference_mode():
        return model.forward_features(x)[:, 0]


def features(loaded, x):
    with torch.inference_mode():
        return loaded.module(x)


def test_folder_in_save_for_hf_layout_loads_and_embeds_class_token(tiny_folder):
    model, folder = tiny_folder
    loaded = load_model(folder)
    x = torch.randn(3, 3, 56, 56)
    assert loaded.input_size == (56, 56)
    assert loaded.mean == pytest.approx(IMAGENET_MEAN)
    assert loaded.module.num_features == TINY_DIM
    torch.testing.assert_close(features(loaded, x), class_token_after_norm(model, x), rtol=0, atol=1e-6)
    # The same folder is what timm itself loads as local-dir:
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    torch.testing.assert_close(features(loaded, x), class_token_after_norm(reference, x), rtol=0, atol=1e-6)


def test_a_config_whose_input_size_disagrees_with_the_network_s_is_cut_at_the_network_s(tiny_folder):
    """Older save_for_hf exports kept the source model's input size beside the img_size they built."""
    model, folder = tiny_folder
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 112, 112]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder)
    assert loaded.input_size == (56, 56)
    x = torch.randn(2, 3, *loaded.input_size)
    torch.testing.assert_close(features(loaded, x), class_token_after_norm(model, x), rtol=0, atol=1e-6)
    # A network that takes any size is cut at the size its config asks for.
    flexible = save_folder(tiny_vit(dynamic_img_size=True), tiny_folder[1].parent / "flexible")
    config = json.loads((flexible / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 112, 112]
    (flexible / "config.json").write_text(json.dumps(config))
    assert load_model(flexible).input_size == (112, 112)


def test_a_model_is_named_by_its_weights_so_its_heads_work_wherever_it_is_copied(tiny_folder, tmp_path, hub_cache):
    _, folder = tiny_folder
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    original = load_model(folder).model_id
    assert original == f"tiny_model@sha256:{digest}"
    rng = np.random.default_rng(0)
    head = CellClassifier(["a", "b"], model_id=original).fit(rng.normal(size=(20, TINY_DIM)), ["a", "b"] * 10)
    head.save(tmp_path / "head")

    copy = shutil.copytree(folder, tmp_path / "colleague" / "s1-final")  # another machine, another name
    assert load_model(copy).model_id == f"s1-final@sha256:{digest}"
    assert CellClassifier.load(tmp_path / "head", model_id=load_model(copy).model_id).model_id == original
    publish_to_cache(copy, hub_cache, "lab/rbc-s1")  # pushed to the Hub and downloaded elsewhere
    pushed = load_model("hf_hub:lab/rbc-s1").model_id
    assert pushed == f"hf_hub:lab/rbc-s1@sha256:{digest}"
    CellClassifier.load(tmp_path / "head", model_id=pushed)
    save_folder(tiny_vit(seed=5), folder)  # other weights in the head's own folder: another model
    retrained = load_model(folder).model_id
    assert retrained.startswith("tiny_model@sha256:") and retrained != original
    with pytest.raises(HeadMismatchError, match=f"trained on embeddings of {original}"):
        CellClassifier.load(tmp_path / "head", model_id=retrained)
    weights = shutil.copy(copy / "model.safetensors", tmp_path / "bare.safetensors")
    single = find_model_files(weights, architecture="vit_small_patch14_dinov2").model_id
    assert single == f"bare.safetensors:vit_small_patch14_dinov2@sha256:{digest}"
    CellClassifier.load(tmp_path / "head", model_id=single)  # the same weights, as a bare file


def test_a_hub_models_key_follows_the_cached_commit(hub_cache, tmp_path):
    # Embeddings are recomputed when the cache holds newer weights of the same repo.
    assert model_key("hf_hub:lab/tiny-rbc") == "hf-hub:lab/tiny-rbc"  # not cached (yet)
    publish_to_cache(save_folder(tiny_vit(seed=3), tmp_path / "v1"), hub_cache, "lab/tiny-rbc")
    first = model_key("hf_hub:lab/tiny-rbc")
    assert first == f"hf-hub:lab/tiny-rbc@{REVISION}"
    publish_to_cache(save_folder(tiny_vit(seed=4), tmp_path / "v2"), hub_cache, "lab/tiny-rbc", revision="b" * 40)
    assert model_key("hf_hub:lab/tiny-rbc") == f"hf-hub:lab/tiny-rbc@{'b' * 40}"
    assert model_key("hf_hub:my lab/x") == "hf-hub:my lab/x"  # a name the Hub refuses: loading it says so


@pytest.fixture
def connections(monkeypatch) -> list:
    """The addresses of every network connection opened meanwhile (they are still opened)."""
    opened, connect = [], socket.create_connection

    def counted(address, *args, **kwargs):
        opened.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    return opened


def test_hub_id_loads_from_the_offline_cache(hub_cache, tmp_path, connections):
    model = tiny_vit(seed=3)
    snapshot = publish_to_cache(save_folder(model, tmp_path / "tiny"), hub_cache, "lab/tiny-rbc")
    loaded = load_model("hf_hub:lab/tiny-rbc")
    assert connections == []
    digest = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert loaded.model_id == f"hf_hub:lab/tiny-rbc@sha256:{digest}"
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(features(loaded, x), class_token_after_norm(model, x), rtol=0, atol=1e-6)


def test_reddino_name_loads_the_published_config_at_224_px(hub_cache, reddino_small_files):
    publish_to_cache(reddino_small_files, hub_cache, KNOWN_MODELS["reddino-small"].repo_id)
    loaded = load_model("reddino-small")
    assert loaded.input_size == (224, 224)
    assert loaded.module.pos_embed.shape == (1, 257, 384)  # 16 x 16 patches + class token
    assert loaded.module.num_features == KNOWN_MODELS["reddino-small"].dim == 384
    assert loaded.mean == pytest.approx(IMAGENET_MEAN)


def test_bare_safetensors_file_with_architecture_gets_its_trained_224_px_size(reddino_small_files):
    """timm builds vit_small_patch14_dinov2 at 518 px unless told; the weights say 224."""
    loaded = load_model(reddino_small_files / "model.safetensors", architecture="vit_small_patch14_dinov2")
    assert loaded.input_size == (224, 224)
    assert loaded.module.patch_embed.img_size == (224, 224)
    published = load_model(reddino_small_files)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(features(loaded, x), features(published, x), rtol=0, atol=0)


def test_bare_file_without_architecture_asks_for_one(tiny_folder):
    _, folder = tiny_folder
    with pytest.raises(ValueError, match="architecture="):
        load_model(folder / "model.safetensors")


# A loop that retries with back-off would take seconds; one try takes milliseconds. The bounds
# below are generous for a busy machine; the connections counted show there is no second try.
def test_offline_and_not_cached_fails_at_once_saying_what_to_do(hub_cache, connections):
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as error:
        load_model("reddino-small")
    assert time.perf_counter() - started < 5 and connections == []
    message = str(error.value)
    for expected in ("'reddino-small'", "Snarcy/RedDino-small", str(hub_cache), "HF_HUB_OFFLINE"):
        assert expected in message
    assert "(Embed cells: Browse…; Python: load_embedder('/path/to/folder'))" in message


def test_unreachable_hub_fails_at_once_without_retrying(hub_cache, monkeypatch, connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    without_proxies(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="cannot connect to 127.0.0.1:9"):
        load_model("hf_hub:lab/never-downloaded")
    assert time.perf_counter() - started < 5 and connections == [("127.0.0.1", 9)]


class CaptivePortal(http.server.BaseHTTPRequestHandler):
    """A hospital network's log-in page, served for every address until one logs in (or, with
    ``status`` 403, its proxy's refusal)."""

    status = 200

    def do_HEAD(self):
        self._page(with_body=False)

    def do_GET(self):
        self._page(with_body=True)

    def _page(self, with_body: bool) -> None:
        page = b"<html><body>Log in to the hospital network</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if with_body:
            self.wfile.write(page)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "said"), [(200, "missing the 'X-Repo-Commit' header"), (403, "403 Forbidden")])
def test_a_network_that_answers_for_the_hub_with_a_log_in_page_is_named_with_what_to_do(serving_hub,  # noqa: F811
                                                                                        monkeypatch, status, said):
    portal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Portal", (CaptivePortal,), {"status": status}))
    threading.Thread(target=portal.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{portal.server_address[1]}")
    try:
        with pytest.raises(ModelNotAvailableError, match=r"^Model 'hf_hub:lab/rbc' \(Hugging Face repo lab/rbc\) is not "
                                                         r"in the local cache .* cannot be downloaded: the download of "
                                                         r"config.json failed \(\w+: .+\)\. .*Browse…") as raised:
            load_model("hf_hub:lab/rbc")
    finally:
        portal.shutdown()
    assert said in str(raised.value)  # huggingface_hub's own words on why


class ProxyWantingALogIn(http.server.BaseHTTPRequestHandler):
    def do_CONNECT(self):
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="hospital"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_proxy_that_wants_a_log_in_is_named_with_what_to_do(serving_hub, monkeypatch):  # noqa: F811
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProxyWantingALogIn)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")  # answers: the probe passes
    try:
        with pytest.raises(ModelNotAvailableError, match=r"cannot be downloaded: the download of config.json failed "
                                                         r"\(\w*ProxyError: .*407.*\)\. .*Browse…"):
            load_model("hf_hub:lab/rbc")
    finally:
        proxy.shutdown()


def test_a_hub_repo_without_a_timm_config_is_refused_saying_so(serving_hub):  # noqa: F811
    with pytest.raises(CheckpointError, match=r"Hugging Face repo lab/not-timm has no config.json, so it is no timm "):
        load_model("hf_hub:lab/not-timm")


@pytest.mark.parametrize("proxies", [{"HTTPS_PROXY": "http://127.0.0.1:9"},  # only for https: the endpoint is http
                                     {"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}])  # a mirror
def test_the_hub_is_reached_as_huggingface_hub_reaches_it_past_proxies_it_does_not_use(serving_hub, proxies,
                                                                                         monkeypatch, connections):
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError, match="has no config.json"):  # the stand-in answered: not "cannot connect"
        load_model("hf_hub:lab/not-timm")
    assert ("127.0.0.1", 9) not in connections


def test_a_hub_model_downloads_once_saying_how_far_it_has_come_then_loads_from_the_cache(
        serving_hub, tiny_folder, hub_cache):  # noqa: F811
    serving_hub("lab/tiny-rbc", tiny_folder[1])
    steps = iter_load_embedder("hf_hub:lab/tiny-rbc", device="cpu", dtype="float32")
    reports = []
    with pytest.raises(StopIteration) as finished:
        while True:
            reports.append(next(steps))
    embedder = finished.value.value
    reports = [report for report in reports if report is not None]  # None: still loading
    last = {report.filename: report for report in reports}
    size = (tiny_folder[1] / "model.safetensors").stat().st_size
    assert set(last) == {"config.json", "model.safetensors"}
    assert (last["model.safetensors"].done, last["model.safetensors"].total) == (size, size)
    digest = hashlib.sha256((tiny_folder[1] / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert embedder.model_id == f"hf_hub:lab/tiny-rbc@sha256:{digest}"
    assert (hub_cache / "models--lab--tiny-rbc" / "snapshots" / REVISION / "model.safetensors").is_file()
    clear_embedder_cache()
    loaded_again = iter_load_embedder("hf_hub:lab/tiny-rbc", device="cpu", dtype="float32")
    assert not [step for step in loaded_again if step is not None]  # from the cache: no download


def test_a_download_given_up_stops_at_its_next_chunk_and_leaves_no_model_in_the_cache(
        serving_hub, tiny_folder, hub_cache, tmp_path):  # noqa: F811
    folder = tmp_path / "large"
    folder.mkdir()
    shutil.copy(tiny_folder[1] / "config.json", folder)
    (folder / "model.safetensors").write_bytes(bytes(30 * 2**20))  # never read: the download stops first
    serving_hub("lab/large-rbc", folder, pause=0.05)  # 30 MiB in 1.5 s
    steps = iter_load_embedder("hf_hub:lab/large-rbc", device="cpu")
    first = next(step for step in steps if step is not None and step.filename == "model.safetensors")
    assert 0 < first.done < first.total == 30 * 2**20
    steps.close()
    for loader in [thread for thread in threading.enumerate() if thread.name == "reddino-model-load"]:
        loader.join(timeout=10)
        assert not loader.is_alive()
    assert not list(hub_cache.glob("models--lab--large-rbc/snapshots/*/model.safetensors"))


def test_a_model_downloading_holds_up_no_other_model_s_load(serving_hub, tiny_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "large"
    folder.mkdir()
    shutil.copy(tiny_folder[1] / "config.json", folder)
    (folder / "model.safetensors").write_bytes(bytes(30 * 2**20))  # never read: the download is given up
    serving_hub("lab/large-rbc", folder, pause=0.2)  # 30 MiB in 6 s
    slow = iter_load_embedder("hf_hub:lab/large-rbc", device="cpu")
    next(step for step in slow if step is not None and step.filename == "model.safetensors")
    local = load_embedder(tiny_folder[1], device="cpu", dtype="float32")  # a folder on this computer
    downloading = [thread for thread in threading.enumerate() if thread.name == "reddino-model-load"]
    assert local.model_id.startswith("tiny_model@") and any(thread.is_alive() for thread in downloading)
    slow.close()
    for loader in downloading:
        loader.join(timeout=10)


def test_download_progress_reports_bytes_even_with_progress_bars_disabled():
    seen = []
    bar_class = _reporting_tqdm("model.safetensors", lambda *update: seen.append(update))
    with bar_class(total=300, disable=True) as bar:
        bar.update(100)
        bar.update(200)
    assert seen == [("model.safetensors", 100, 300), ("model.safetensors", 300, 300)]


def test_corrupt_weights_name_the_file(tiny_folder):
    _, folder = tiny_folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    with pytest.raises(CheckpointError, match=str(weights)):
        load_model(folder)


def test_a_hub_model_s_folder_of_a_copied_cache_loads_as_that_hub_model(hub_cache, tiny_folder, tmp_path):  # noqa: F811
    publish_to_cache(tiny_folder[1], hub_cache, "lab/tiny-rbc")
    from_hub = load_model("hf_hub:lab/tiny-rbc")
    copied = shutil.copytree(hub_cache / "models--lab--tiny-rbc", tmp_path / "usb stick" / "models--lab--tiny-rbc",
                             symlinks=True)
    browsed = load_model(copied)  # Embed cells: Browse… to the model's own folder of the cache
    assert browsed.model_id == from_hub.model_id and browsed.model_id.startswith("hf_hub:lab/tiny-rbc@sha256:")
    # A newer commit copied in is another version of the model; a cache without a main branch
    # (a tag downloaded) loads its newest whole snapshot.
    version = model_version(copied)
    newer = save_folder(tiny_vit(seed=5), tmp_path / "newer")
    publish_to_cache(newer, copied.parent, "lab/tiny-rbc", revision="b" * 40)
    assert model_version(copied) != version
    assert load_model(copied).model_id != browsed.model_id
    (copied / "refs" / "main").unlink()
    assert load_model(copied).model_id.startswith("hf_hub:lab/tiny-rbc@sha256:")


def test_damaged_weights_in_the_hub_cache_say_which_folder_to_delete(hub_cache, tiny_folder):  # noqa: F811
    snapshot = publish_to_cache(tiny_folder[1], hub_cache, "lab/tiny-rbc")
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # a download cut short
    repo = hub_cache / "models--lab--tiny-rbc"
    with pytest.raises(CheckpointError, match=re.escape(f"It is the Hugging Face cache's copy: delete the folder {repo} "
                                                        "and load the model again to download it anew.")):
        load_model("hf_hub:lab/tiny-rbc")


def test_unreadable_weights_name_the_file(tiny_folder, monkeypatch):
    # chmod 000 does not stop root (CI): the read fails as a file without read permission fails.
    _, folder = tiny_folder

    def permission_denied(handle, digest):
        raise PermissionError(13, "Permission denied", handle.name)

    monkeypatch.setattr(hashlib, "file_digest", permission_denied)
    with pytest.raises(CheckpointError, match=f"Cannot read the weights {folder / 'model.safetensors'}: Permission"):
        load_model(folder)


def test_weights_of_another_depth_list_missing_and_unexpected_keys(tmp_path):
    folder = save_folder(tiny_vit(), tmp_path / "config_from_depth_2")
    deeper = save_folder(tiny_vit(depth=3), tmp_path / "weights_from_depth_3")
    shutil.copy(deeper / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): blocks\.2\.") as error:
        load_model(folder)
    assert str(folder / "model.safetensors") in str(error.value)


def test_weights_of_another_width_report_the_shapes(tmp_path):
    folder = save_folder(tiny_vit(), tmp_path / "config_32")
    wider = save_folder(tiny_vit(embed_dim=48), tmp_path / "weights_48")
    shutil.copy(wider / "model.safetensors", folder / "model.safetensors")
    first_mismatch = r"shape mismatch \(\d+\): blocks\.0\.attn\.proj\.bias: file \(48,\), model \(32,\)"
    with pytest.raises(CheckpointError, match=first_mismatch):
        load_model(folder)


def test_weights_with_nan_or_inf_are_refused_naming_the_file_and_the_tensors(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 4] = float("nan")
        model.norm.bias[0] = float("inf")
    folder = save_folder(model, tmp_path / "diverged")
    with pytest.raises(CheckpointError, match=r"hold NaN or infinite values \(in the model's precision\), in 2 tensors") as error:
        load_model(folder)
    assert str(folder / "model.safetensors") in str(error.value)
    assert "blocks.1.mlp.fc2.weight" in str(error.value) and "norm.bias" in str(error.value)


def test_float64_weights_beyond_float32s_range_are_refused_once_cast(tmp_path):
    model = tiny_vit().double()
    with torch.no_grad():
        model.norm.weight[0] = 1e39  # finite as float64, infinite in the float32 model
    folder = save_folder(model, tmp_path / "float64")
    with pytest.raises(CheckpointError, match=r"\(in the model's precision\), in 1 tensor \(norm\.weight\)"):
        load_model(folder)


def test_config_naming_an_unknown_architecture_is_refused(tiny_folder):
    _, folder = tiny_folder
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "vit_made_up"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vit_made_up"):
        load_model(folder)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as error:
        load_model("reddino-huge")
    for name in ("reddino-small", "reddino-base", "reddino-large", "hf_hub:"):
        assert name in str(error.value)


def test_a_hub_name_the_hub_refuses_is_said_as_the_model_name_it_is(hub_cache):
    with pytest.raises(UnknownModelError, match=r"'hf_hub:my org/x' is no Hugging Face Hub model name \(org/name\): "
                                                r"Repo id must use alphanumeric chars"):
        load_model("hf_hub:my org/x")


def test_missing_path_is_reported_as_such(tmp_path):
    with pytest.raises(UnknownModelError, match="No such model file or folder"):
        load_model(tmp_path / "nothing.safetensors", architecture="vit_small_patch14_dinov2")


def test_cpu_is_always_listed_and_unavailable_devices_say_why():
    options = {option.name: option for option in list_devices()}
    assert options["cpu"].available
    assert all(option.detail for option in options.values())
    assert "mps" in options and any(name.startswith("cuda") for name in options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_device_falls_back_to_cpu_and_missing_gpus_are_refused():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="cuda:1.*Available here: cpu"):
        resolve_device("cuda:1")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu-please")


@pytest.mark.parametrize(("cpu_features", "bf16_speedup", "auto"), CPUS)
def test_dtype_auto_is_bf16_only_where_the_cpu_computes_it_faster_and_names_are_checked(
        monkeypatch, cpu_features, bf16_speedup, auto):
    pretend_cpu(monkeypatch, cpu_features, bf16_speedup)
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == auto
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_dtype("int8", cpu)


GPUS = [  # compute capability, what "auto" picks for embedding and for training
    ((6, 1), torch.float32, "fp32"),  # a GTX 1080: fp16 at a 64th of fp32
    ((6, 0), torch.float16, "fp16"),  # a P100
    ((7, 0), torch.float16, "fp16"),  # a V100
    ((7, 5), torch.float16, "fp16"),  # a T4: reports bf16 as supported, but emulates it slowly
    ((8, 0), torch.bfloat16, "bf16"),
    ((9, 0), torch.bfloat16, "bf16"),
]


@pytest.mark.parametrize(("capability", "auto", "training"), GPUS)
def test_dtype_auto_on_a_gpu_is_bf16_from_ampere_on_and_fp16_where_it_is_fast_before(
        monkeypatch, capability, auto, training):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert resolve_dtype("auto", torch.device("cuda:1")) == auto
    assert precision_for("auto", torch.device("cuda:1")) == training
    assert set(asked) == {torch.device("cuda:1")}  # the chosen GPU's, not the current one's


def test_the_bf16_probe_times_this_cpu_once_per_process():
    precision_speed.cpu_bf16_speedup.cache_clear()
    speedup = precision_speed.cpu_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0
    assert precision_speed.cpu_bf16_speedup() == speedup
    assert precision_speed.cpu_bf16_speedup.cache_info().misses == 1


def test_known_models_are_the_three_reddino_sizes():
    assert {name: (m.repo_id, m.dim) for name, m in KNOWN_MODELS.items()} == {
        "reddino-small": ("Snarcy/RedDino-small", 384),
        "reddino-base": ("Snarcy/RedDino-base", 768),
        "reddino-large": ("Snarcy/RedDino-large", 1024),
    }
    assert np.all([timm.is_model(m.architecture) for m in KNOWN_MODELS.values()])
