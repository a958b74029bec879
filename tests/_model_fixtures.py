"""Small real models on disk, in the layouts users meet: a save_for_hf folder and a Hub cache.

Weights cannot be downloaded in tests, so every model here is made in the test session and
written the way timm and huggingface_hub write them; the loading code under test then reads
them through its ordinary path with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

TINY_ARGS = dict(img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=0)
TINY_DIM = 32
REVISION = "0123456789abcdef0123456789abcdef01234567"
# The config.json of Snarcy/RedDino-small as published: no model_args, so timm sizes the
# model from pretrained_cfg (input_size with fixed_input_size).
REDDINO_SMALL_CONFIG = {
    "architecture": "vit_small_patch14_dinov2",
    "num_classes": 0,
    "num_features": 384,
    "global_pool": "token",
    "pretrained_cfg": {
        "tag": "lvd142m",
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "cc-by-nc-4.0",
    },
}


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A DINOv2-style ViT small enough for tests (56 px input, 32-d), with seeded weights.

    Layer scale starts at 1 rather than DINOv2's 1e-5 so the blocks change the output.
    """
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch14_dinov2", init_values=1.0, **{**TINY_ARGS, **overrides}).eval()


def save_folder(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` in timm's Hub layout: config.json + model.safetensors."""
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def record_crops(folder: Path, crops) -> Path:
    """``folder``'s config.json with the training crops recorded, where and as ``reddino-train
    export`` records them (``tests/train/test_export.py`` checks that it does)."""
    from napari_reddino.models import CROPS_KEY

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, CROPS_KEY: crops}, indent=2))
    return folder


def publish_to_cache(folder: Path, cache: Path, repo_id: str, revision: str = REVISION) -> Path:
    """Lay ``folder``'s files out as huggingface_hub caches a download of ``repo_id``.

    ``models--org--name/blobs/<sha256>`` holds the content, ``snapshots/<revision>/<file>`` links
    to it and ``refs/main`` names the revision.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for directory in (repo / "blobs", repo / "refs", snapshot):
        directory.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def vit_small_224_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the shapes of RedDino-small (ViT-S/14 at 224 px, 384-d)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, init_values=1.0)
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


PROXY_VARIABLES = [name for kind in ("HTTP", "HTTPS", "ALL", "NO")
                   for name in (f"{kind}_PROXY", f"{kind.lower()}_proxy")]


def without_proxies(monkeypatch) -> None:
    """No proxy settings of the machine's (urllib prefers the lower-case ones to a test's own)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline, as the loading code will find it."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def reddino_small_files(tmp_path_factory) -> Path:
    """A folder with RedDino-small's published config.json and random ViT-S/14 224 px weights."""
    folder = tmp_path_factory.mktemp("reddino_small")
    safetensors.torch.save_file(vit_small_224_state(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(REDDINO_SMALL_CONFIG))
    return folder


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = tiny_vit()
    return model, save_folder(model, tmp_path / "tiny_model")


@pytest.fixture
def serving_hub(hub_cache, monkeypatch) -> Iterator[Callable[[str, Path], None]]:
    """A local stand-in for the Hugging Face Hub, online, with an empty cache: the loading code
    downloads from it as from the Hub. ``serving_hub(repo_id, folder, pause=0)`` publishes a
    folder's files, sent a MiB at a time with ``pause`` seconds between; a file it does not hold
    is answered as the Hub answers one (404, EntryNotFound)."""
    repos: dict[str, dict[str, bytes]] = {}
    pauses: dict[str, float] = {}

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(with_body=False)

        def do_GET(self):
            self._answer(with_body=True)

        def _answer(self, with_body: bool) -> None:
            parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")  # org/name/resolve/revision/file
            content = repos.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))
            self.send_response(404 if content is None else 200)
            if content is None:
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
            else:
                self.send_header("X-Repo-Commit", REVISION)
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content or b"")))
            self.end_headers()
            for start in range(0, len(content or b"") if with_body else 0, 2**20):
                time.sleep(pauses["/".join(parts[:2])] * (start > 0))
                try:
                    self.wfile.write(content[start:start + 2**20])
                except (BrokenPipeError, ConnectionResetError):  # the download was given up
                    return

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, when it was imported
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    without_proxies(monkeypatch)
    # huggingface_hub fetches its list of agent harnesses from huggingface.co once per process
    # (through an https proxy, where one is set): known empty, as offline, so tests see only the stand-in
    agents = importlib.import_module("huggingface_hub.utils._detect_agent")
    if hasattr(agents, "_registry"):
        monkeypatch.setattr(agents, "_registry", {"standardEnvVars": [], "harnesses": {}})

    def publish(repo_id: str, folder: Path, pause: float = 0.0) -> None:
        repos[repo_id], pauses[repo_id] = {file.name: file.read_bytes() for file in folder.iterdir()}, pause

    yield publish
    server.shutdown()
