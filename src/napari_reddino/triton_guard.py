"""Keep torch from importing triton where that would crash napari.

Mesa's software OpenGL (llvmpipe: virtual and remote displays, machines without a GPU
driver) loads the system libLLVM into napari's process. torch and torchvision import triton
on import to see whether it is there; triton carries its own LLVM, and loading it next to
Mesa's segfaults the whole process. So when a system libLLVM is already mapped and torch is
not yet imported, triton is marked unavailable and torch runs without it (the plugin never
uses torch.compile, the only thing that needs triton).
"""

import sys


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
