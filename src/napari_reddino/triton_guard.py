"""Keep torch from importing triton where that would crash napari.

Mesa's software OpenGL (llvmpipe: virtual and remote displays, machines without a GPU
driver) loads the system libLLVM into napari's process. torch and torchvision import triton
on import to see whether it is there; triton carries its own LLVM, and loading it next to
Mesa's segfaults the whole process. So when a system libLLVM is mapped at the moment torch is
first imported, triton is marked unavailable and torch runs without it (the widgets never use
torch.compile, the only thing that needs triton; the Python API and reddino-analyse offer it).
The check waits for torch's import, not the widgets': a script may import the widgets before
napari's window brings OpenGL in.
"""

import importlib.abc
import sys


class _BeforeTorch(importlib.abc.MetaPathFinder):
    """Runs the check when ``torch`` is looked up, then leaves the import to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            block_triton_if_llvm_loaded()
        return None


def guard_triton() -> None:
    """Check now, and again when torch is first imported (Linux; once per process)."""
    if sys.platform.startswith("linux") and not any(isinstance(f, _BeforeTorch) for f in sys.meta_path):
        block_triton_if_llvm_loaded()
        sys.meta_path.insert(0, _BeforeTorch())


def block_triton_if_llvm_loaded() -> bool:
    """True when triton was blocked because a libLLVM is already in this (Linux) process."""
    if "torch" in sys.modules or "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            llvm_loaded = any("libLLVM" in line for line in maps)
    except OSError:
        return False
    if llvm_loaded:
        sys.modules["triton"] = None  # `import triton` now raises ImportError
    return llvm_loaded
