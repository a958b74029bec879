"""Fixtures of the training tests: small real blood-smear images and a single-threaded torch.

One intra-op thread keeps the tiny models fast on a shared CPU and their results
bit-for-bit repeatable between runs of a test.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

DATA = Path(__file__).parents[1] / "data"
IMAGE_SIZE = 64


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smear_images(tmp_path_factory) -> Path:
    """16 crops of 64 x 64 px from the test smears, in two sub-folders and two formats."""
    root = tmp_path_factory.mktemp("smears")
    sources = sorted(DATA.glob("chula_rbc12/*.jpg")) + sorted(DATA.glob("aslan_bcd/*.png"))
    for source_index, source in enumerate(sources):
        folder = root / f"smear{source_index % 2}"
        folder.mkdir(exist_ok=True)
        with Image.open(source) as image:
            image = image.convert("RGB")
        for tile in range(4):
            left, top = tile * IMAGE_SIZE, tile * IMAGE_SIZE // 2
            box = (left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)
            suffix = ".png" if tile % 2 else ".jpg"
            image.crop(box).save(folder / f"{source.stem}_{tile}{suffix}")
    return root


@pytest.fixture
def terminate_after(monkeypatch):
    """``terminate_after(module, name, call=1)``: the ``call``-th call of ``module.name``, once
    done, sends this process SIGTERM, as a scheduler's time limit would. Until the test ends,
    SIGTERM is otherwise ignored: a command that does not handle it goes on (and its test fails)
    instead of ending the whole test run."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def arm(module, name: str, call: int = 1) -> None:
        real, calls = getattr(module, name), []

        def then_terminated(*args, **kwargs):
            result = real(*args, **kwargs)
            calls.append(name)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        monkeypatch.setattr(module, name, then_terminated)

    yield arm
    signal.signal(signal.SIGTERM, before)
